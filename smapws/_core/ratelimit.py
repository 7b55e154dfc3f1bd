"""A token bucket for the accept rate (sans-IO: time is an argument).

After a pod restart or a network blip, thousands of tabs reconnect within a
second or two. Handshakes (TLS at the load balancer, then JWT verification
here) are the expensive part of a connection's life; admitting them at a
bounded rate keeps handshake latency and memory bounded, and the refused ones
are told when to come back (``Retry-After``), spread with jitter so that they
do not return as one wave.
"""

from __future__ import annotations

import math


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. ``rate <= 0``
    means unlimited."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._last = now

    def take(self, now: float) -> bool:
        """Take one token if there is one; never blocks."""
        if self.rate <= 0:
            return True
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def retry_after(self, jitter: float) -> int:
        """Whole seconds a refused client should wait: the time the bucket
        needs to refill, spread by ``jitter`` in [0, 1) over as long again
        (at least 1 s, as ``Retry-After`` counts whole seconds)."""
        if self.rate <= 0:
            return 1
        base = self.burst / self.rate
        return max(1, math.ceil(base * (1.0 + jitter)))


class KeyedBuckets:
    """One :class:`TokenBucket` per key (a user id): ``rate`` per second and
    key, ``burst`` saved up, so that one key spending its tokens as fast as it
    can leaves the shared budget to the others. ``rate <= 0`` means unlimited.

    Memory stays bounded by the keys seen within the refill time
    (``burst / rate``): a bucket that would be full again is the same as no
    bucket, and such buckets are dropped once the map has doubled since the
    last sweep (amortised O(1) per :meth:`take`)."""

    __slots__ = ("_buckets", "_sweep_at", "burst", "rate")

    #: Fewest buckets kept before a sweep is worth it.
    _MIN_SWEEP = 1024

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_at = self._MIN_SWEEP

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> bool:
        """Take one of ``key``'s tokens if it has one; never blocks."""
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now=now)
        return bucket.take(now)

    def retry_after(self, jitter: float) -> int:
        """As :meth:`TokenBucket.retry_after`, for one key's bucket."""
        return TokenBucket(self.rate, self.burst, now=0.0).retry_after(jitter)

    def _sweep(self, now: float) -> None:
        refill = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b._last < refill}
        self._sweep_at = max(self._MIN_SWEEP, 2 * len(self._buckets))


class KeyedCount:
    """How many of something each key (an address) holds, bounded per key:
    :meth:`acquire` refuses the ``limit``-th plus one. ``limit <= 0`` means
    unbounded (nothing is counted). A key holding nothing takes no memory."""

    __slots__ = ("_held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._held)

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def acquire(self, key: str) -> bool:
        """Count one more for ``key``, unless it holds ``limit`` already.
        Each True must be followed by one :meth:`release`."""
        if self.limit <= 0:
            return True
        n = self._held.get(key, 0)
        if n >= self.limit:
            return False
        self._held[key] = n + 1
        return True

    def release(self, key: str) -> None:
        if self.limit <= 0:
            return
        n = self._held.pop(key) - 1
        if n:
            self._held[key] = n
