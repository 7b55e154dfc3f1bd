"""The accept-rate token buckets and the per-address count (sans-IO)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smapws._core.ratelimit import KeyedBuckets, KeyedCount, TokenBucket


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


def test_one_keys_churn_leaves_the_others_their_tokens() -> None:
    """Issue 16: one user's churn spent the shared budget; each key has its own."""
    buckets = KeyedBuckets(rate=2, burst=2)
    assert [buckets.take("churner", 0.0) for _ in range(1000)].count(True) == 2
    assert buckets.take("other", 0.0) and buckets.take("other", 0.0)
    assert not buckets.take("churner", 0.25)  # half a token
    assert buckets.take("churner", 0.5)
    assert buckets.retry_after(0.0) == 1
    assert all(KeyedBuckets(rate=0, burst=0).take("k", 0.0) for _ in range(1000))


def test_keyed_buckets_forget_keys_whose_bucket_is_full_again() -> None:
    buckets = KeyedBuckets(rate=10, burst=10)  # full again 1 s after a take
    for i in range(5000):
        buckets.take(f"u{i}", i / 10_000)  # 5,000 users within 0.5 s
    assert len(buckets) == 5000  # all within their refill time
    for i in range(5000):
        buckets.take(f"v{i}", 10.0 + i / 10_000)
    assert len(buckets) <= 2 * 1024 + 5000  # the u* buckets were swept
    assert not any(k.startswith("u") for k in buckets._buckets)


def test_keyed_count_bounds_each_key() -> None:
    count = KeyedCount(limit=2)
    assert [count.acquire("a") for _ in range(3)] == [True, True, False]
    assert count.acquire("b")
    count.release("a")
    assert count.held("a") == 1 and count.acquire("a")
    for key in ("a", "a", "b"):
        count.release(key)
    assert len(count) == 0  # nothing held, nothing kept
    unbounded = KeyedCount(limit=0)
    assert all(unbounded.acquire("a") for _ in range(1000)) and len(unbounded) == 0
    unbounded.release("a")
