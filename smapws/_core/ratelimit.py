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
