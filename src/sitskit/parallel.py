"""Process pools for the per-patch work of data_prep and the simulator: results in input order, a bounded
number in flight, and signals left to the main process (which cleans up or keeps a --resume file)."""
from __future__ import annotations

import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor


def init_worker() -> None:
    """Pool initializer. Ctrl-C and SIGTERM are handled by the main process alone: a worker ignores SIGINT
    and dies on SIGTERM (the default, which the main process's `errors.raise_on_sigterm` handler would
    replace in a forked worker); on Linux a worker is SIGKILLed when the main process dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn(item) for each item, yielded in input order; in this process when workers <= 0, else in a pool of
    `workers` processes with at most 2 * workers items in flight (fn and items must be picklable)."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=init_worker) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
