"""A connection's send queue and its delivery policy.

Progress updates are a stream where only the latest value matters;
completions, notifications and alerts are events where every one matters.
The queue treats them so (see the "Delivery" table of docs/design/delivery.rst):

- While the queue is below ``high_water`` every message is appended: a
  connection that keeps up receives every progress update, one by one.
- At or above ``high_water``, a new ``project_progress`` *replaces* the queued
  progress of the same project: the old entries are removed and the new one
  appended, so what is delivered is always a subsequence of what was
  published, in publish order.
- A ``project_completed`` removes any queued progress of its project (it is
  stale) and is itself never dropped.
- ``notification``, ``alert`` and unknown types are never conflated or dropped.
- When the lossless part passes ``max_messages``, when everything queued
  passes ``max_bytes``, or when progress of more than ``max_messages``
  projects is queued, :meth:`Outbox.push` refuses with :data:`OVERFLOW`: the
  caller closes the connection with 1013 (after flushing what is queued) and
  the client reconnects to fresh state. Nothing is dropped silently.

- All the queues of a hub share one budget, ``SMAPWS_SEND_QUEUE_TOTAL_BYTES``
  (:class:`QueueBudget`): a push that takes the total past it is refused with
  :data:`OVERFLOW` when the pushing queue would hold more than its fair share
  (the budget divided by the queues not empty), and accepted otherwise. So
  when many slow tabs together fill the budget, they are the ones closed 1013,
  while a tab that keeps up (its queue near empty) goes on receiving; and the
  total passes the budget only by queues each under its share (so by at
  most about the budget again).

The router pushes without ever waiting; the connection's writer takes
everything queued at once (:meth:`Outbox.take_all`) and writes it in one
``send_all``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from smapws._core.envelope import COMPLETED, PROGRESS, Envelope

#: Default bounds. 32 queued messages is several seconds of the seed's traffic
#: for one user, far more than a connection that keeps up ever has queued;
#: 256 lossless messages or 1 MiB bound the worst case per socket.
DEFAULT_HIGH_WATER: Final = 32
DEFAULT_MAX_MESSAGES: Final = 256
DEFAULT_MAX_BYTES: Final = 1024 * 1024


class Push(enum.IntFlag):
    """What :meth:`Outbox.push` did."""

    QUEUED = 1
    #: Queued, and older queued progress of the same project was removed.
    CONFLATED = 2
    #: Queued, and the queue has just reached its high-water mark.
    HIGH_WATER = 4
    #: Refused: a hard bound would be passed; the connection must be closed.
    OVERFLOW = 8


QUEUED: Final = Push.QUEUED
CONFLATED: Final = Push.CONFLATED
HIGH_WATER: Final = Push.HIGH_WATER
OVERFLOW: Final = Push.OVERFLOW


class QueueBudget:
    """The bytes queued in all the outboxes of a hub, against ``total``
    (see the module docstring). Mutable, one per hub."""

    __slots__ = ("queues", "total", "used")

    def __init__(self, total: int) -> None:
        if total <= 0:
            raise ValueError("need a positive total")
        self.total = total
        #: Bytes queued in all outboxes together.
        self.used = 0
        #: Outboxes holding at least one message.
        self.queues = 0

    def admits(self, queued: int, size: int) -> bool:
        """Whether a queue holding ``queued`` bytes may take ``size`` more."""
        if self.used + size <= self.total:
            return True
        sharing = self.queues + (queued == 0)
        return queued + size <= self.total // sharing


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Shared by all outboxes of a hub (one object, not one per connection).
    The defaults are the ``SMAPWS_SEND_QUEUE_*`` settings' (:mod:`smapws._config`
    reads them from here)."""

    high_water: int = DEFAULT_HIGH_WATER
    max_messages: int = DEFAULT_MAX_MESSAGES
    max_bytes: int = DEFAULT_MAX_BYTES
    #: The hub's budget for all queues together (None: no total bound).
    budget: QueueBudget | None = None

    def __post_init__(self) -> None:
        if not 0 < self.high_water <= self.max_messages:
            raise ValueError("need 0 < high_water <= max_messages")


class Outbox:
    """The queue of one connection. Sans-IO and synchronous."""

    __slots__ = ("_bytes", "_items", "_limits", "_lossless", "_progress")

    def __init__(self, limits: OutboxLimits) -> None:
        self._limits = limits
        self._items: list[Envelope] = []
        self._bytes = 0  # everything queued
        self._lossless = 0  # count of queued messages that are never dropped
        self._progress = 0  # count of queued progress messages

    def push(self, envelope: Envelope) -> Push:
        """Queue ``envelope`` under the policy above; never waits."""
        lim = self._limits
        size = len(envelope.frame)
        kind = envelope.kind
        before = len(self._items)
        result = QUEUED
        if kind == PROGRESS:
            if self._progress and len(self._items) >= lim.high_water:
                freed = self._drop_progress(envelope.key)
                if freed:
                    result |= CONFLATED
            if self._progress >= lim.max_messages or self._bytes + size > lim.max_bytes:
                return OVERFLOW
            self._progress += 1
        else:
            if self._lossless >= lim.max_messages:
                return OVERFLOW
            if kind == COMPLETED and self._progress and self._drop_progress(envelope.key):
                result |= CONFLATED
            if self._bytes + size > lim.max_bytes:
                return OVERFLOW
            self._lossless += 1
        budget = lim.budget
        if budget is not None:
            if not budget.admits(self._bytes, size):
                self._undo(kind)
                return OVERFLOW
            budget.used += size
            if not self._bytes:
                budget.queues += 1
        self._items.append(envelope)
        self._bytes += size
        if before < lim.high_water <= len(self._items):
            result |= HIGH_WATER
        return result

    def _undo(self, kind: int) -> None:
        """Take back the count :meth:`push` made for a message it refuses."""
        if kind == PROGRESS:
            self._progress -= 1
        else:
            self._lossless -= 1

    def _credit(self, freed: int) -> None:
        """``freed`` bytes left this queue: give them back to the budget."""
        budget = self._limits.budget
        if budget is not None and freed:
            budget.used -= freed
            if not self._bytes:
                budget.queues -= 1

    def _drop_progress(self, key: str | None) -> int:
        """Remove every queued progress message of project ``key``; return how
        many were removed. O(queue length): only runs above the high-water
        mark or on a completion, and the queue is bounded."""
        kept: list[Envelope] = []
        freed = freed_bytes = 0
        for e in self._items:
            if e.kind == PROGRESS and e.key == key:
                freed += 1
                freed_bytes += len(e.frame)
            else:
                kept.append(e)
        if freed:
            self._items = kept
            self._progress -= freed
            self._bytes -= freed_bytes
            self._credit(freed_bytes)
        return freed

    def take_all(self) -> list[Envelope]:
        """Remove and return everything queued, oldest first."""
        items = self._items
        if items:
            freed = self._bytes
            self._items = []
            self._bytes = self._lossless = self._progress = 0
            self._credit(freed)
        return items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Envelope]:
        """The queued envelopes, oldest first (for inspection)."""
        return iter(self._items)

    @property
    def queued_bytes(self) -> int:
        return self._bytes
