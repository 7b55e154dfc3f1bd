"""What a subscription session subscribes, and what Redis's confirmations
mean: the broker's three roles, one class each.

- :class:`PatternSubscription`: ``PSUBSCRIBE prefix*``; messages flow once
  Redis confirms the pattern, and after an outage every connection is told
  once (``on_resync``).
- :class:`UserSubscriptions`: the channels the hub's
  :class:`~smapws._io.brokers.channels.UserChannels` asks for, sent by a
  task next to the pump; every confirmation is handed back to it, and when
  the session ends its channels are handed back too (the next session
  subscribes them again; each user's tabs get ``resync`` when theirs is
  confirmed).
- :class:`ShardedLink`: the same, on the link to one master of a cluster
  with sharded pub/sub, for the slots that master owns
  (:mod:`~smapws._io.brokers.cluster`).

A :class:`~smapws._io.brokers.redis.RedisBroker` runs one role; the read
loop, the probes and the reconnect policy are the same for all three.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol

import trio

from smapws._core.cluster import Address

if TYPE_CHECKING:
    from smapws._io.brokers.channels import UserChannels

#: The ``reason`` of the resync notice sent after a subscriber outage.
RESYNC_REASON: Final = "subscriber_reconnected"

#: ``mark()``: the session is subscribed now; returns for how long it was
#: not (``None`` when no earlier subscription was lost).
Mark = Callable[[], "float | None"]

#: Sends a batch of (un)subscribe commands through the session's pubsub.
SendBatch = Callable[[list[tuple[str, tuple[bytes, ...]]]], Awaitable[object]]


class Role(Protocol):
    """What :class:`~smapws._io.brokers.redis.RedisBroker` asks of a role."""

    @property
    def mode(self) -> str:
        """``pattern`` or ``user`` (``/health``'s ``mode``)."""

    @property
    def pattern(self) -> str | None:
        r"""What the session ``PSUBSCRIBE``\ s, if anything."""

    @property
    def channels(self) -> UserChannels | None:
        """The per-user subscriptions, or ``None``: every user's messages
        arrive."""

    def probe_subscribed(self, mark: Mark) -> None:
        """Redis confirmed the session's probe channel (subscribed last, on
        the same connection)."""

    def confirmed(self, kind: str, channel: bytes, mark: Mark) -> None:
        """Redis confirmed (or pushed) ``kind`` (``psubscribe``,
        ``ssubscribe``, ``sunsubscribe``...) of a channel other than the
        probe's. Called from the pump, before it reads the next reply."""

    def start(self, nursery: trio.Nursery, send: SendBatch, timeout: float) -> None:
        """The session is up: start whatever feeds it commands."""

    def ended(self) -> None:
        """The session is over (its link failed or it was cancelled)."""


class PatternSubscription:
    """Pattern mode: the session ``PSUBSCRIBE``\\ s ``pattern``. When Redis
    confirms it after an earlier session's subscription was lost,
    ``on_resync(RESYNC_REASON, down_s)`` is told how long the hub was deaf,
    synchronously, before the pump reads any message of the new
    subscription: every message queued after the resync was published after
    the subscription was back."""

    mode = "pattern"
    channels: None = None

    def __init__(
        self, pattern: str, on_resync: Callable[[str, float], object] = lambda reason, down_s: None
    ) -> None:
        self.pattern: str | None = pattern
        self._encoded = pattern.encode()
        self._on_resync = on_resync

    def probe_subscribed(self, mark: Mark) -> None:
        """Nothing: messages flow once the pattern is confirmed."""

    def confirmed(self, kind: str, channel: bytes, mark: Mark) -> None:
        if kind == "psubscribe" and channel == self._encoded:
            down = mark()
            if down is not None:
                self._on_resync(RESYNC_REASON, down)

    def start(self, nursery: trio.Nursery, send: SendBatch, timeout: float) -> None:
        """Nothing: the pattern was subscribed with the session."""

    def ended(self) -> None:
        """Nothing to hand back."""


class UserSubscriptions:
    """User mode on one Redis (or one node of a cluster): the session
    subscribes what ``channels`` asks for, as link ``link``, the channels
    ``accept`` accepts (all by default)."""

    mode = "user"
    pattern: None = None

    def __init__(
        self,
        channels: UserChannels,
        *,
        link: Hashable = None,
        accept: Callable[[Hashable], bool] | None = None,
    ) -> None:
        self.channels: UserChannels | None = channels
        self._user_channels = channels
        self._link = link
        self._accept = accept

    def probe_subscribed(self, mark: Mark) -> None:
        """The connection is subscribed; each user's gap is told when their
        own channel is back."""
        mark()

    def confirmed(self, kind: str, channel: bytes, mark: Mark) -> None:
        self._user_channels.confirmed(kind, channel, self._link)

    def start(self, nursery: trio.Nursery, send: SendBatch, timeout: float) -> None:
        nursery.start_soon(
            partial(
                self._user_channels.send_commands,
                send,
                where=self._link,
                accept=self._accept,
                send_timeout=timeout,
            )
        )

    def ended(self) -> None:
        """What this link carried waits for the next session."""
        self._user_channels.lost(self._link)


class ShardedLink(UserSubscriptions):
    """The link to one master of a cluster with sharded pub/sub: its channels
    are those of the slots ``accept`` says the master at ``address`` owns
    (``channels`` is sharded: ``SSUBSCRIBE``, one command per slot)."""

    def __init__(
        self, channels: UserChannels, *, address: Address, accept: Callable[[Hashable], bool]
    ) -> None:
        assert channels.sharded, "a sharded link needs sharded channels"
        super().__init__(channels, link=address, accept=accept)
