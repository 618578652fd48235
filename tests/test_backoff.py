"""The one backoff formula: exponential, capped, with full jitter."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ephemera import backoff

attempts = st.integers(min_value=0, max_value=5000)
seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(attempt=attempts, base=seconds, cap=seconds, seed=st.integers())
def test_a_delay_lies_between_zero_and_the_capped_exponential(attempt: int, base: float, cap: float, seed: int) -> None:
    wait = backoff.delay(attempt, base, cap, random.Random(seed))
    assert 0.0 <= wait <= backoff.bound(attempt, base, cap) <= cap


@given(attempt=st.integers(min_value=0, max_value=60), base=seconds)
def test_the_bound_doubles_per_attempt_until_the_cap(attempt: int, base: float) -> None:
    assert backoff.bound(attempt, base, float("inf")) == base * 2**attempt
    assert backoff.bound(attempt + 1, base, 60.0) == min(60.0, 2 * backoff.bound(attempt, base, float("inf")))


@given(attempt=attempts, base=seconds, cap=seconds)
def test_the_bound_never_shrinks_with_more_attempts(attempt: int, base: float, cap: float) -> None:
    assert backoff.bound(attempt, base, cap) <= backoff.bound(attempt + 1, base, cap)


def test_huge_attempt_counts_reach_the_cap_without_overflow() -> None:
    assert backoff.bound(10**6, 0.5, 30.0) == 30.0
    assert backoff.bound(10**6, 0.0, 30.0) == 0.0


def test_the_jitter_is_full_spread_over_the_whole_interval() -> None:
    """Not a fixed wait, nor one near the bound: draws fill [0, bound] (the point of full jitter)."""
    rng = random.Random(15)
    draws = [backoff.delay(3, 1.0, 60.0, rng) for _ in range(2000)]
    assert min(draws) < 0.8  # bound 8: both outer tenths of the interval are reached
    assert max(draws) > 7.2
    assert 3.6 < sum(draws) / len(draws) < 4.4  # the mean is half the bound


def test_a_seeded_draw_is_the_same_every_time() -> None:
    assert backoff.delay(2, 60.0, 3600.0, random.Random("uid/t/2")) == backoff.delay(
        2, 60.0, 3600.0, random.Random("uid/t/2")
    )


@pytest.mark.parametrize(("attempt", "base", "cap"), [(-1, 1.0, 1.0), (0, -1.0, 1.0), (0, 1.0, -1.0)])
def test_negative_inputs_are_refused(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        backoff.delay(attempt, base, cap)
