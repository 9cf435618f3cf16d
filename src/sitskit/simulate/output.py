"""All-or-nothing output directories: write into a hidden sibling, rename when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from sitskit.errors import UserFacingError


@contextlib.contextmanager
def atomic_output_dir(out_dir):
    """Yield a temporary directory next to `out_dir`; it becomes `out_dir` only if the block succeeds.

    Refuses an existing non-empty `out_dir` (nothing is overwritten); on any error the partial output
    is removed, so a failed or interrupted run leaves nothing half-written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserFacingError(f"--out {out}: is a file; give a directory to create")
    if out.exists() and any(out.iterdir()):
        raise UserFacingError(f"--out {out}: already exists and is not empty; choose a new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise UserFacingError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like mkdir's
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
