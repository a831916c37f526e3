"""Deadlines for the engine's iterative and ODE solves, so a caller can bound their wall time.

A caller that must answer in time (the service's batcher) wraps a call in ``time_limit``; every
fixed-point iteration, root-solve sweep and ODE function evaluation calls ``check_deadline``, which
raises ``SolverTimeout`` once the deadline has passed. The deadline is per thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import SolverTimeout

__all__ = ["time_limit", "check_deadline"]

_local = threading.local()


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Within this block, solves in this thread raise ``SolverTimeout`` after ``seconds``.

    Nested limits keep the earlier deadline. ``None`` sets no limit.

    Example:
        >>> import nfcore, torch
        >>> flow = nfcore.build({"preset": "cnf", "dim": 2, "hidden": [8]})
        >>> with nfcore.time_limit(1e-9):
        ...     flow.log_prob(torch.zeros(1, 2))
        Traceback (most recent call last):
            ...
        nfcore.errors.SolverTimeout: cnf: ODE solve ran past its time limit (1e-09 s)
    """
    if seconds is not None and not (isinstance(seconds, int | float) and seconds > 0):
        raise ValueError(f"Expected a positive number of seconds or None; got {seconds!r}")
    previous = getattr(_local, "deadline", None)
    if seconds is not None:
        deadline = (time.monotonic() + seconds, seconds)
        if previous is None or deadline[0] < previous[0]:
            _local.deadline = deadline
    try:
        yield
    finally:
        _local.deadline = previous


def check_deadline(what: str) -> None:
    """Raise ``SolverTimeout`` naming ``what`` if this thread's deadline has passed."""
    deadline = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() > deadline[0]:
        raise SolverTimeout(f"{what} ran past its time limit ({deadline[1]:g} s)")
