"""Exponential backoff: how long to wait after the Nth failure in a row.

`doubling` is the plain schedule (a restart after a crash: one process, nobody
to collide with); `full_jitter` draws uniformly below it, so that many clients
failing together do not come back together (deliveries to TikTok).
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Past 2**64 the cap has long won; stop before float overflow.
_MAX_EXPONENT = 64


def doubling(attempt: int, *, base: float, cap: float) -> float:
    """`base` seconds after the first failure (`attempt` is 1-based), doubling, at most `cap`."""
    exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
    return min(cap, base * 2.0**exponent)


def full_jitter(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 300.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """A random delay up to `doubling(attempt)`: full-jitter exponential backoff."""
    return rand() * doubling(attempt, base=base, cap=cap)
