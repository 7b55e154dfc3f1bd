"""The accept-rate token bucket (sans-IO)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smapws._core.ratelimit import TokenBucket


def test_burst_then_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)
    assert not bucket.take(0.1)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_unlimited() -> None:
    bucket = TokenBucket(rate=0, burst=0, now=0.0)
    assert all(bucket.take(0.0) for _ in range(10_000))


def test_retry_after_is_spread_and_whole_seconds() -> None:
    bucket = TokenBucket(rate=100, burst=500, now=0.0)
    assert bucket.retry_after(0.0) == 5
    assert bucket.retry_after(0.99) == 10
    assert TokenBucket(rate=1000, burst=1, now=0).retry_after(0.5) == 1


@given(st.lists(st.floats(0, 2), max_size=200), st.floats(0.5, 50), st.floats(1, 20))
def test_never_more_than_burst_plus_rate_times_elapsed(
    gaps: list[float], rate: float, burst: float
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst, now=0.0)
    now, taken = 0.0, 0
    for gap in gaps:
        now += gap
        taken += bucket.take(now)
    assert taken <= max(1.0, burst) + rate * now + 1e-9
