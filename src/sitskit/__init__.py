import os as _os
import sys as _sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _v

try:
    __version__ = _v("sitskit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"

# torch's CPU allocator backs large tensors with 2 MiB transparent huge pages when this is set (read at
# its first large allocation). Without it every fresh activation buffer is page-faulted 4 KiB at a time:
# on the development host that was a third of an STCLN pre-training step (docs/models.md, "Performance").
# Opt out with THP_MEM_ALLOC_ENABLE=0.
if _sys.platform.startswith("linux"):
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
