"""The one retry delay (tunneld/backoff.py): bounds, growth, cap, and the spread of its jitter."""

from __future__ import annotations

import statistics

import pytest

from tunneld.backoff import backoff, ceiling
from tunneld.docker.transport import REFILL_BACKOFF_CAP, REFILL_BACKOFF_START

pytestmark = pytest.mark.timeout(30)


def test_the_bound_doubles_from_start_up_to_the_cap() -> None:
    assert [ceiling(n, 10.0) for n in range(1, 9)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert [ceiling(n, 0.1) for n in range(1, 4)] == [0.1, 0.1, 0.1]  # a cap below start wins at once
    assert [ceiling(n, 5.0, 0.2) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


def test_no_failure_yet_waits_the_start() -> None:
    assert ceiling(0, 10.0) == ceiling(1, 10.0) == 0.25


def test_endless_failures_stay_at_the_cap_without_overflowing() -> None:
    for failures in (60, 1100, 10**9):
        assert ceiling(failures, 5.0) == 5.0
        assert 2.5 <= backoff(failures, 5.0) <= 5.0


def test_each_pause_lies_between_half_the_bound_and_the_bound() -> None:
    for failures, bound in ((1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (10, 5.0), (50, 5.0)):
        for _ in range(50):
            assert bound / 2 <= backoff(failures, 5.0) <= bound
    for d in (0.25, 4.0, 10.0):
        assert all(d / 2 <= backoff(1, d, d) <= d for _ in range(200))


def test_the_jitter_spreads_over_the_whole_random_half() -> None:
    """Equal jitter: uniform over [bound/2, bound], so retries of many clients do not line up."""
    pauses = [backoff(5, 10.0) for _ in range(4000)]  # bound 4 s
    assert min(pauses) < 2.1 and max(pauses) > 3.9
    assert 2.9 < statistics.fmean(pauses) < 3.1
    assert len(set(pauses)) > 3900
    # Each quarter of the random half gets its share (about a quarter of the samples each).
    quarters = [sum(2.0 + q * 0.5 <= p < 2.5 + q * 0.5 for p in pauses) for q in range(4)]
    assert all(800 < n < 1200 for n in quarters), quarters


def test_the_docker_pool_refill_keeps_its_old_bounds() -> None:
    """Before the one backoff it paused min(0.1 * 2**min(failures, 6), 5) s, without jitter: the same bounds."""
    for failures in range(1, 12):
        old = min(0.1 * 2 ** min(failures, 6), 5.0)
        assert ceiling(failures, REFILL_BACKOFF_CAP, REFILL_BACKOFF_START) == pytest.approx(old)
