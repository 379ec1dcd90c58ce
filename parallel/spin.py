"""Waiting by polling, for the few milliseconds of a decode step.

A thread blocked in a socket read or a futex sleeps, and its core may drop into
a deep idle state; waking it costs tens of microseconds or more, on every step
and on both ends of every hand-over. While a step runs, the waiting side polls
instead, yielding the GIL between polls, and blocks only after `seconds`.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

logger = logging.getLogger(__name__)

def _spin_s_from_env(default: float = 0.05) -> float:
    raw = os.environ.get("TPSERVE_STEP_SPIN_S")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        logger.warning("TPSERVE_STEP_SPIN_S=%r is not a number of seconds >= 0 (0 turns "
                       "polling off); using %s", raw, default)
        return default
    return value


# long enough to cover a decode step (a few ms) and the gap between two; GPU ranks
# and the engine that drives them poll this long (TPSERVE_STEP_SPIN_S=0: never,
# to spare the CPU), CPU ranks not at all
STEP_SPIN_S = _spin_s_from_env()


def spin_until(ready: Callable[[], bool], seconds: float) -> bool:
    """Polls `ready()` for up to `seconds`; whether it came true."""
    if ready():
        return True
    if seconds <= 0:
        return False
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0)  # lets other threads take the GIL
        if ready():
            return True
    return False
