"""SIGINT (Ctrl-C) and SIGTERM (Slurm, Kubernetes, `timeout`) ask a stage to save its state and stop.

The handler only sets a flag (and Accelerate's trigger, so every rank stops at the same batch boundary); the
loop checks it between batches. A second Ctrl-C stops at once without saving. Exit codes follow the shell
convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM).
"""
from __future__ import annotations

import signal

from typing_extensions import Self


class StopRequest:
    """Installed for the duration of a `with` block, in every process."""

    def __init__(self, accelerator=None, announce=print):
        self.accelerator = accelerator
        self.announce = announce
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without saving
        self.signum = self.signum or signum
        if self.accelerator is not None:
            self.accelerator.set_trigger()
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        self.announce(f"\n{name}: saving state after this batch (Ctrl-C again aborts without saving)")

    def check(self) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        if self.accelerator is not None:
            return bool(self.accelerator.check_trigger()) or self.requested
        return self.requested
