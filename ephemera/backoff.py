"""Exponential backoff with full jitter: the one formula every retry in Ephemera waits by.

"Full jitter" (AWS's "Exponential Backoff And Jitter"): the wait before retry number `attempt` is
drawn uniformly from [0, min(cap, base * 2**attempt)]. Callers that failed together (a database
outage, a GitHub rate limit, a burst of environments hitting the same fault) then come back spread
over the whole interval instead of in lock-step, and the expected wait is half the plain one.
"""

from __future__ import annotations

import random
from typing import Protocol

# 2.0**1024 overflows a float; past this exponent every finite cap has long been reached.
_MAX_EXPONENT = 1023


class Uniform(Protocol):
    """What `delay` draws from: the `random` module, or a `random.Random` (seeded for a stable draw)."""

    def uniform(self, a: float, b: float, /) -> float: ...


def bound(attempt: int, base: float, cap: float) -> float:
    """The longest wait before retry number `attempt` (0 for the first): base * 2**attempt, at most `cap`."""
    if attempt < 0 or base < 0 or cap < 0:
        raise ValueError(f"backoff needs attempt, base and cap >= 0, not {attempt}, {base}, {cap}")
    return min(cap, base * 2.0 ** min(attempt, _MAX_EXPONENT))


def delay(attempt: int, base: float, cap: float, rng: Uniform = random) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first): uniform in [0, `bound`]."""
    return rng.uniform(0.0, bound(attempt, base, cap))
