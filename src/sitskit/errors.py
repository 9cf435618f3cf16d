"""Errors that reach the user as one clear line (file/patch/key and what is wrong) and exit code 2, and
SIGTERM handled like Ctrl-C by the commands that are not training stages (data_prep, evaluate, predict,
sweep); training stages save their state instead (`sitskit.stage.signals`)."""
from __future__ import annotations

import signal


class UserFacingError(Exception):
    """Bad input or a refused operation; the message names the file/patch/key and the problem."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, Slurm, Kubernetes) raised as an exception, so that the clean-up written for
    Ctrl-C runs (partial outputs removed, or kept for --resume) before the command exits with 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread (default action: die on the spot, leaving
    temporary outputs behind). Pool workers reset it: see `sitskit.data_prep.runner`."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    """Shell convention, 128 + signal number: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
