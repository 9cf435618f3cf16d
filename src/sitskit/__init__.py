from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _v

try:
    __version__ = _v("sitskit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"
