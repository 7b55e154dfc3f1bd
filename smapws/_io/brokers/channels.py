"""The trio side of per-user subscriptions (``SMAPWS_SUBSCRIBE_MODE=user``).

:class:`UserChannels` wraps the sans-IO bookkeeping
(:mod:`smapws._core.subscriptions`) for the hub and for the broker's links:

- the hub (``App``) says which users it serves (:meth:`acquire` /
  :meth:`release`), waits before the upgrade until a user's subscription is
  confirmed (:meth:`wait_subscribed`), and marks a tab that starts receiving
  before that (:meth:`mark_gap`);
- each link (one subscribing connection: to the one Redis, or to one cluster
  node) runs :meth:`send_commands` next to its read loop, and its read loop
  hands every (un)subscribe confirmation to :meth:`confirmed`,
  synchronously, in the order Redis sent them;
- when a link ends, :meth:`lost` puts what it carried back to "not
  subscribed".

Confirmations arrive on the asyncio side of the bridge, in the read loop;
everything here is synchronous and runs on the trio thread, so a
confirmation takes effect (waiters woken, the user's ``resync`` queued)
before the read loop reads the next message.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Hashable
from typing import Final

import trio

from smapws._core.subscriptions import (
    BATCH,
    DROPPED,
    ENDED,
    READY,
    SUBSCRIBE,
    Subscriptions,
)

#: How long a user's channel stays subscribed after their last connection on
#: this hub closed (``SMAPWS_SUBSCRIBE_LINGER``). A reload (close, then open)
#: within it costs no command, and the current-state cache keeps following
#: the user meanwhile.
LINGER: Final = 5.0

#: Lingering channels are unsubscribed this long after the first of them is
#: due, together with every other one due by then: the releases of one moment
#: (a drain, a network blip) leave in one command, not one each.
EXPIRY_WINDOW: Final = 0.1

#: Redis commands for each verb: plain, or sharded (Redis Cluster).
VERBS: Final = {
    False: {SUBSCRIBE: "subscribe", "unsubscribe": "unsubscribe"},
    True: {SUBSCRIBE: "ssubscribe", "unsubscribe": "sunsubscribe"},
}

#: The confirmation kinds Redis sends, and whether each means "subscribed".
CONFIRMATIONS: Final = {
    "subscribe": True,
    "ssubscribe": True,
    "unsubscribe": False,
    "sunsubscribe": False,
}


class UserChannels:
    """What the hub's connections want, and the links' view of it.

    ``on_resync(reason, gap_s, channel)`` is called when a channel whose
    holders may have missed messages is subscribed again;
    ``on_forget(channel)`` when a channel is no longer subscribed nor wanted
    (the current state held for its user is stale from then on);
    ``on_drop(where, group)`` when a link's server dropped a wanted channel
    of ``group`` by itself (a cluster slot moved: the sharded broker sets
    this one);
    ``on_commands(command, n)`` for each command sent (``n`` channels)."""

    def __init__(
        self,
        prefix: bytes,
        *,
        reason: str,
        sharded: bool = False,
        group: Callable[[bytes], Hashable] | None = None,
        linger: float = LINGER,
        batch: int = BATCH,
        on_resync: Callable[[str, float, bytes], object] = lambda reason, gap_s, ch: None,
        on_forget: Callable[[bytes], object] = lambda channel: None,
        on_drop: Callable[[Hashable, Hashable], object] = lambda where, group: None,
        on_commands: Callable[[str, int], object] = lambda command, n: None,
    ) -> None:
        self.prefix = prefix
        self.sharded = sharded
        self.verbs = VERBS[sharded]
        self.core = (
            Subscriptions(linger=linger, batch=batch)
            if group is None
            else Subscriptions(linger=linger, batch=batch, group=group)
        )
        self._group = group
        self._reason = reason
        self._on_resync = on_resync
        self._on_forget = on_forget
        self.on_drop = on_drop
        self._on_commands = on_commands
        self._work = trio.lowlevel.ParkingLot()
        self._waiters: dict[bytes, trio.Event] = {}
        self._waiting: dict[bytes, int] = {}

    def channel(self, user_id: str) -> bytes:
        return self.prefix + user_id.encode()

    # -- the hub's side ------------------------------------------------------

    def acquire(self, user_id: str) -> None:
        """One more connection (or upgrade) of ``user_id`` on this hub."""
        if self.core.acquire(self.channel(user_id)):
            self._work.unpark_all()

    def release(self, user_id: str) -> None:
        """One fewer; the last one starts the linger."""
        self.core.release(self.channel(user_id), trio.current_time())
        self._work.unpark_all()  # the links recompute when to expire

    def is_subscribed(self, user_id: str) -> bool:
        return self.core.is_subscribed(self.channel(user_id))

    def mark_gap(self, user_id: str) -> None:
        """A tab of ``user_id`` starts receiving before the user's
        subscription is confirmed: it gets a ``resync`` when it is."""
        self.core.mark_gap(self.channel(user_id), trio.current_time())

    async def wait_subscribed(self, user_id: str) -> bool:
        """Until ``user_id``'s subscription is confirmed (True) or the link
        that was to carry it is lost (False). The caller bounds the wait;
        ``user_id`` must be held (:meth:`acquire`) meanwhile."""
        channel = self.channel(user_id)
        if self.core.is_subscribed(channel):
            await trio.lowlevel.checkpoint()
            return True
        event = self._waiters.get(channel)
        if event is None:
            event = self._waiters[channel] = trio.Event()
        waiting = self._waiting
        waiting[channel] = waiting.get(channel, 0) + 1
        try:
            await event.wait()
        finally:
            n = waiting.pop(channel) - 1
            if n:
                waiting[channel] = n
            else:  # nobody waits for it any more (a wait cut short leaves nothing)
                self._waiters.pop(channel, None)
        return self.core.is_subscribed(channel)

    @property
    def subscribed(self) -> int:
        """Channels Redis has confirmed subscribed."""
        return self.core.subscribed

    # -- a link's side -------------------------------------------------------

    async def send_commands(
        self,
        send: Callable[[list[tuple[str, tuple[bytes, ...]]]], Awaitable[object]],
        *,
        where: Hashable = None,
        accept: Callable[[Hashable], bool] | None = None,
        send_timeout: float,
    ) -> None:
        """Forever: send (with ``send([(command, channels), ...])``, under
        ``send_timeout``) what link ``where`` has to send, then wait for more.
        Everything that changed while a send was under way goes out in the
        next one. Expires lingering channels on time (gathered over
        :data:`EXPIRY_WINDOW`). Raises what ``send``
        raises, and :class:`trio.TooSlowError`."""
        core = self.core
        verbs = self.verbs
        while True:
            core.expire(trio.current_time())
            commands = core.take(where, accept)
            if commands:
                batch = [(verbs[c.verb], c.channels) for c in commands]
                with trio.fail_after(send_timeout):
                    await send(batch)
                for command, channels in batch:
                    self._on_commands(command, len(channels))
                continue
            expiry = core.next_expiry()
            with trio.move_on_at(math.inf if expiry is None else expiry + EXPIRY_WINDOW):
                await self._work.park()

    def confirmed(self, kind: str, channel: bytes, where: Hashable = None) -> None:
        """Redis confirmed ``kind`` (``subscribe``, ``sunsubscribe``...) for
        ``channel`` on link ``where``. Called by the read loop, in order."""
        subscribed = CONFIRMATIONS.get(kind)
        if subscribed is None:
            return
        result = self.core.confirm(channel, subscribed, trio.current_time(), where)
        outcome = result.outcome
        if outcome == READY:
            if result.gap_s is not None:
                self._on_resync(self._reason, result.gap_s, channel)
            self._wake(channel)
        elif outcome == ENDED:
            self._on_forget(channel)
        elif outcome == DROPPED:
            self._wake(channel)
            self.on_drop(where, None if self._group is None else self._group(channel))
        self._work.unpark_all()

    def lost(self, where: Hashable = None) -> None:
        """Link ``where`` is gone (see :meth:`Subscriptions.lost`): its
        channels wait for the next link, and whoever waits for one of them
        stops waiting."""
        core = self.core
        for channel in core.lost(trio.current_time(), where):
            self._on_forget(channel)
        for channel in [ch for ch in self._waiters if core.where(ch) == where]:
            self._wake(channel)
        self._work.unpark_all()

    def wake(self) -> None:
        """Links look again at what to send (their groups changed hands)."""
        self._work.unpark_all()

    def _wake(self, channel: bytes) -> None:
        event = self._waiters.pop(channel, None)
        if event is not None:
            event.set()
