"""Backoff schedules: doubling up to a cap, and full jitter below it."""

from __future__ import annotations

import pytest

from gateway.backoff import doubling, full_jitter


@pytest.mark.parametrize(
    ("attempt", "delay"), [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (6, 10.0), (2000, 10.0)]
)
def test_doubling_doubles_then_caps(attempt: int, delay: float) -> None:
    assert doubling(attempt, base=0.5, cap=10.0) == delay


def test_doubling_starts_at_base_for_attempts_below_one() -> None:
    assert doubling(0, base=0.5, cap=10.0) == 0.5
    assert doubling(-3, base=0.5, cap=10.0) == 0.5


@pytest.mark.parametrize(
    ("attempt", "bound"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (9, 256.0), (10, 300.0), (50, 300.0)],
)
def test_full_jitter_upper_bound_doubles_then_caps(attempt: int, bound: float) -> None:
    assert full_jitter(attempt, rand=lambda: 1.0) == bound
    assert full_jitter(attempt, rand=lambda: 0.0) == 0.0
    assert full_jitter(attempt, rand=lambda: 0.5) == bound / 2


def test_full_jitter_base_and_cap() -> None:
    assert full_jitter(1, base=0.1, cap=5.0, rand=lambda: 1.0) == pytest.approx(0.1)
    assert full_jitter(4, base=0.1, cap=5.0, rand=lambda: 1.0) == pytest.approx(0.8)
    assert full_jitter(30, base=0.1, cap=5.0, rand=lambda: 1.0) == 5.0


def test_full_jitter_extremes_do_not_break() -> None:
    assert full_jitter(100_000, rand=lambda: 1.0) == 300.0  # no float overflow
    assert full_jitter(0, rand=lambda: 1.0) == 1.0  # attempts start at 1
    assert full_jitter(-3, rand=lambda: 1.0) == 1.0


def test_full_jitter_default_jitter_stays_in_bounds() -> None:
    delays = [full_jitter(4, base=1.0, cap=300.0) for _ in range(500)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 1  # actually random
