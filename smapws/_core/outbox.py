"""A connection's bounded send queue.

The router pushes messages without ever waiting; the connection's writer takes
everything queued at once and writes it in one ``send_all``. When a push would
pass either bound (messages or bytes), it is refused: the caller closes that
connection with 1013 (try again later), so one slow reader costs bounded
memory and never slows the router or anyone else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from smapws._core.envelope import Envelope

#: Default bounds. 256 messages is ~50 s of the seed's progress rate for ten
#: concurrently running projects; 1 MiB bounds the worst case per socket.
DEFAULT_MAX_MESSAGES: Final = 256
DEFAULT_MAX_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Shared by all outboxes of a hub (one object, not one per connection)."""

    max_messages: int = DEFAULT_MAX_MESSAGES
    max_bytes: int = DEFAULT_MAX_BYTES


class Outbox:
    """FIFO of envelopes bounded by count and bytes."""

    __slots__ = ("_bytes", "_items", "_limits")

    def __init__(self, limits: OutboxLimits) -> None:
        self._limits = limits
        self._items: list[Envelope] = []
        self._bytes = 0

    def push(self, envelope: Envelope) -> bool:
        """Queue ``envelope``; return False (and queue nothing) when that would
        pass ``max_messages`` or ``max_bytes``."""
        size = len(envelope.frame)
        if (
            len(self._items) >= self._limits.max_messages
            or self._bytes + size > self._limits.max_bytes
        ):
            return False
        self._items.append(envelope)
        self._bytes += size
        return True

    def take_all(self) -> list[Envelope]:
        """Remove and return everything queued, oldest first."""
        items = self._items
        if items:
            self._items = []
            self._bytes = 0
        return items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        return self._bytes
