"""Message brokers: where published messages come from.

A broker runs a subscriber task that hands ``(channel, data)`` pairs to the
router through a bounded trio memory channel (never waiting: a full channel
drops and counts), and offers :meth:`Broker.publish` for the publish API.

- :class:`~smapws._io.brokers.memory.MemoryBroker`: the embedded single-node
  broker, used when no Redis is configured.
- :class:`~smapws._io.brokers.redis.RedisBroker`: ``PSUBSCRIBE prefix*`` on
  Redis through trio-asyncio, reconnecting with capped backoff; or, in user
  mode, ``SUBSCRIBE prefix+user`` for the users the hub serves
  (:mod:`~smapws._io.brokers.channels`), on one Redis or one cluster node.
- :class:`~smapws._io.brokers.cluster.ShardedBroker`: user mode on a Redis
  Cluster with sharded pub/sub, one link per master.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import trio
from trio_util import AsyncValue

from smapws._errors import SmapwsError

if TYPE_CHECKING:
    from smapws._io.brokers.channels import UserChannels

#: What the router receives: (channel, data).
Item = tuple[bytes, bytes]


class QueueBytes:
    r"""The router queue's bound in bytes (``SMAPWS_INGEST_QUEUE_BYTES``):
    the broker's read loop :meth:`take`\ s a message's size before queueing
    it (refused: dropped and counted, as when the queue is full), the router
    :meth:`give`\ s it back when it takes the message out. One thread."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class BrokerError(SmapwsError):
    """Publishing failed (broker unreachable or too slow). The message never
    contains credentials."""


class Broker(Protocol):
    backend: str
    #: :attr:`status` as an observable value (wait on its changes).
    status_value: AsyncValue[str]

    @property
    def channels(self) -> UserChannels | None:
        """The per-user subscriptions (``SMAPWS_SUBSCRIBE_MODE=user``), or
        ``None``: the broker delivers every user's messages."""

    @property
    def status(self) -> str:
        """``connected``, ``connecting`` or ``down``."""

    def info(self) -> dict[str, Any]:
        """The ``subscriber`` object of ``/health``."""

    async def run(
        self,
        sink: trio.MemorySendChannel[Item],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe and feed ``sink`` until cancelled. Reports started at
        once, before the first connection attempt, so that the hub serves
        ``/health`` while the broker is still unreachable."""

    async def publish(self, channel: bytes, data: bytes) -> int:
        """Publish ``data`` on ``channel``; return the number of receivers the
        broker reports. Raises :class:`BrokerError`."""
