"""What a training loop tells the code that launched it: the evaluation callback and early stop."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

CHECKPOINT = "checkpoint.pt"
"""A loop's resumable state in its run folder; the runner removes it once the record is written."""

OnEval = Callable[[int, dict], None]
"""``on_eval(iteration, scores)``, called by every loop after each evaluation."""


class StopRun(Exception):
    """Raised by an ``on_eval`` callback to stop a run early (an Optuna pruning decision)."""


class Interrupted(BaseException):
    """A stop was asked for (SIGINT or SIGTERM to a job): the loop saved a checkpoint and left, so
    the cell has no record and its next run resumes. A BaseException: no ``except Exception``
    records it as a failure."""


_stop = threading.Event()


def stop_requested() -> bool:
    """Whether a stop signal arrived since ``stop_on_signals`` began."""
    return _stop.is_set()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM only set the stop flag, which the loops read at the end
    of each iteration (checkpoint, then ``Interrupted``); the previous handlers come back after.
    Outside the main thread, where handlers cannot be set, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stop.clear()
    previous = {sig: signal.signal(sig, lambda *_: _stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
