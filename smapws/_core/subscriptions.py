"""Per-user subscriptions: which channels a hub wants, and the commands that get it there.

In ``SMAPWS_SUBSCRIBE_MODE=user`` a hub subscribes to ``prefix+user`` while
it serves that user, instead of ``PSUBSCRIBE prefix*``. This module is the
bookkeeping, sans-IO (no sockets, no clock: time is an argument):

- **Demand.** :meth:`Subscriptions.acquire` / :meth:`~Subscriptions.release`
  count the holders of a channel (connections, upgrades under way). When the
  last holder goes, the channel *lingers* for ``linger`` seconds before it is
  unsubscribed, so a tab that reloads (close, then open within the window)
  costs no command at all.
- **Commands.** :meth:`Subscriptions.take` returns what to send now to make
  the server's set match the wanted set: SUBSCRIBE / UNSUBSCRIBE commands of
  at most ``batch`` channels, each for one *group* (the whole hub on one
  Redis; one cluster hash slot for ``SSUBSCRIBE``, which refuses channels of
  several slots). Everything that changed while the previous commands were
  on their way goes out together, so batches grow with the load and no
  delay is added to the first one.
- **Confirmations.** Redis answers each channel of a command with one
  confirmation, in order. A channel has at most one command in flight; its
  state changes only when the confirmation arrives
  (:meth:`Subscriptions.confirm`), so the state always describes what the
  server has done, never what was merely asked.
- **Links.** The commands for a channel go over one subscribing connection
  (a *link*, named by the caller: ``where``). When a link is lost, every
  channel it carried is back to "not subscribed" (:meth:`Subscriptions.lost`),
  and the next :meth:`take` subscribes the wanted ones again.
- **Gaps.** A wanted channel that stops being subscribed without having been
  asked to (link lost, or a cluster slot moved away: an unsolicited
  unsubscribe), or whose holder started receiving before its subscription
  was confirmed (:meth:`Subscriptions.mark_gap`), is *in a gap*: when its
  subscription is confirmed again, :meth:`confirm` says for how long, so
  that the tabs of that user alone can be told to refetch their state.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final

#: Channels per command. Centrifugo's value: large enough that a hub that
#: reconnects with 10,000 users sends 20 commands, small enough that one
#: command's reply (one confirmation per channel) stays a few tens of KiB.
BATCH: Final = 512

#: The two verbs, whatever the Redis command (SUBSCRIBE or SSUBSCRIBE).
SUBSCRIBE: Final = "subscribe"
UNSUBSCRIBE: Final = "unsubscribe"

#: What :meth:`Subscriptions.confirm` reports.
NOTHING: Final = "nothing"
#: The channel is subscribed and no command for it is in flight: messages
#: on it reach the hub from now on.
READY: Final = "ready"
#: The channel was unsubscribed as asked and is forgotten.
ENDED: Final = "ended"
#: The server ended a wanted subscription by itself (a cluster slot moved):
#: the caller must find the channel's new home before it is taken again.
DROPPED: Final = "dropped"


@dataclass(frozen=True, slots=True)
class Command:
    """One command to send: ``verb`` for ``channels``, all in ``group``."""

    verb: str
    group: Hashable
    channels: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What a confirmation changed: ``outcome`` (:data:`READY`,
    :data:`ENDED`, :data:`DROPPED` or :data:`NOTHING`) and, for
    :data:`READY` after a gap, how long the gap lasted (``gap_s``)."""

    outcome: str
    gap_s: float | None = None


_NOTHING: Final = Confirmation(NOTHING)
_ENDED: Final = Confirmation(ENDED)
_DROPPED: Final = Confirmation(DROPPED)
_READY: Final = Confirmation(READY)


class _Channel:
    """One channel's state. ``on``: the server has confirmed it subscribed
    (on link ``where``). ``inflight``: the verb of the one command sent and
    not yet confirmed, or ``None``. ``gap_since``: when it stopped carrying
    messages to holders, or ``None``."""

    __slots__ = ("gap_since", "group", "inflight", "on", "refs", "where")

    def __init__(self, group: Hashable) -> None:
        self.group = group
        self.refs = 0
        self.on = False
        self.inflight: str | None = None
        self.where: Hashable = None
        self.gap_since: float | None = None


def _one_group(channel: bytes) -> Hashable:
    return 0


class Subscriptions:
    """The wanted channels and the server's confirmed state (see the module
    docstring). Not thread-safe; used from one thread."""

    def __init__(
        self,
        *,
        linger: float,
        batch: int = BATCH,
        group: Callable[[bytes], Hashable] = _one_group,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._linger = linger
        self._batch = batch
        self._group = group
        self._channels: dict[bytes, _Channel] = {}
        #: Channels with no holder, in release order, with the time they
        #: stop being wanted (release order is deadline order: ``linger`` is
        #: one constant and time does not go back).
        self._lingering: dict[bytes, float] = {}
        #: Channels whose wanted state may differ from the server's.
        self._dirty: set[bytes] = set()
        self._on = 0

    # -- demand -----------------------------------------------------------

    def acquire(self, channel: bytes) -> bool:
        """One more holder of ``channel``. Returns whether this created work
        for :meth:`take` (the channel was neither wanted nor subscribed)."""
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel(self._group(channel))
        state.refs += 1
        if state.refs > 1:
            return False
        if self._lingering.pop(channel, None) is not None:
            return False  # a reload within the window: nothing to send
        self._dirty.add(channel)
        return not state.on or state.inflight is not None

    def release(self, channel: bytes, now: float) -> None:
        """One holder fewer. The last one leaves the channel wanted for
        ``linger`` more seconds (see :meth:`expire`). Releasing a channel
        with no holder is a bug (``KeyError``/``AssertionError``)."""
        state = self._channels[channel]
        assert state.refs > 0, "release without acquire"
        state.refs -= 1
        if state.refs == 0:
            self._lingering[channel] = now + self._linger

    def expire(self, now: float) -> bool:
        """Stop wanting the channels whose linger has run out by ``now``.
        Returns whether any did (there is work for :meth:`take`)."""
        lingering = self._lingering
        expired = False
        while lingering:
            channel, until = next(iter(lingering.items()))
            if until > now:
                break
            del lingering[channel]
            self._dirty.add(channel)
            expired = True
        return expired

    def next_expiry(self) -> float | None:
        """When :meth:`expire` next has something to do, or ``None``."""
        for until in self._lingering.values():
            return until
        return None

    def mark_gap(self, channel: bytes, now: float) -> None:
        """A holder of ``channel`` started receiving before its subscription
        was confirmed: it may miss messages until it is. Has no effect on a
        channel that is subscribed (:meth:`is_subscribed`) or unknown."""
        state = self._channels.get(channel)
        if state is not None and not self._ready(state) and state.gap_since is None:
            state.gap_since = now

    # -- what to send ----------------------------------------------------

    def take(
        self, where: Hashable = None, accept: Callable[[Hashable], bool] | None = None
    ) -> list[Command]:
        """The commands to send over link ``where`` now, marked in flight.

        SUBSCRIBE for wanted channels that are not subscribed and whose
        group ``accept`` takes (default: all); UNSUBSCRIBE for channels
        subscribed on ``where`` that are no longer wanted. Channels with a
        command in flight wait for its confirmation. Each command holds at
        most ``batch`` channels of one group."""
        by_key: dict[tuple[str, Hashable], list[bytes]] = {}
        done: list[bytes] = []
        channels = self._channels
        for channel in self._dirty:
            state = channels[channel]
            if state.inflight is not None:
                done.append(channel)  # confirm() marks it dirty again
                continue
            wanted = state.refs > 0 or channel in self._lingering
            if wanted and not state.on:
                if accept is not None and not accept(state.group):
                    continue  # another link's, or no link has its group yet
                verb = SUBSCRIBE
            elif not wanted and state.on:
                if state.where != where:
                    continue
                verb = UNSUBSCRIBE
            else:
                done.append(channel)
                if not wanted:
                    del channels[channel]
                continue
            done.append(channel)
            state.inflight = verb
            state.where = where
            by_key.setdefault((verb, state.group), []).append(channel)
        self._dirty.difference_update(done)
        size = self._batch
        return [
            Command(verb, group, tuple(chans[i : i + size]))
            for (verb, group), chans in by_key.items()
            for i in range(0, len(chans), size)
        ]

    # -- what the server said ---------------------------------------------

    def confirm(
        self, channel: bytes, subscribed: bool, now: float, where: Hashable = None
    ) -> Confirmation:
        """Redis confirmed, over link ``where``, that ``channel`` is now
        subscribed (``subscribed=True``) or not. A confirmation nobody asked
        for is taken as the truth about that link (an unsubscribe pushed by
        a cluster node whose slot moved is :data:`DROPPED`)."""
        state = self._channels.get(channel)
        if state is None:
            return _NOTHING
        asked = state.inflight is not None and state.where == where
        if asked:
            state.inflight = None
        if subscribed:
            if not state.on:
                state.on = True
                self._on += 1
            state.where = where
        else:
            if state.on and state.where == where:
                state.on = False
                self._on -= 1
            elif not asked:
                return _NOTHING  # about another link, or already off
        wanted = state.refs > 0 or channel in self._lingering
        if not wanted:
            if not state.on and state.inflight is None:
                del self._channels[channel]
                self._dirty.discard(channel)
                return _ENDED
            self._dirty.add(channel)
            return _NOTHING
        if not subscribed:
            self._dirty.add(channel)
            if asked:
                return _NOTHING  # wanted again while it was being dropped
            if state.gap_since is None:
                state.gap_since = now
            return _DROPPED
        if state.inflight is not None:
            return _NOTHING
        since, state.gap_since = state.gap_since, None
        return _READY if since is None else Confirmation(READY, now - since)

    def lost(self, now: float, where: Hashable = None) -> list[bytes]:
        """Link ``where`` is gone: whatever it carried is not subscribed, and
        what was in flight on it never will be confirmed. Wanted channels
        among them are in a gap from ``now`` and will be taken again;
        unwanted ones are forgotten, and returned (they were subscribed or
        on their way)."""
        forgotten: list[bytes] = []
        for channel, state in list(self._channels.items()):
            if state.where != where or not (state.on or state.inflight is not None):
                continue
            if state.on:
                state.on = False
                self._on -= 1
            state.inflight = None
            if state.refs > 0 or channel in self._lingering:
                if state.gap_since is None:
                    state.gap_since = now
                self._dirty.add(channel)
            else:
                del self._channels[channel]
                self._dirty.discard(channel)
                forgotten.append(channel)
        return forgotten

    # -- queries -----------------------------------------------------------

    @staticmethod
    def _ready(state: _Channel) -> bool:
        return state.on and state.inflight is None

    def is_subscribed(self, channel: bytes) -> bool:
        """Whether messages on ``channel`` reach the hub: the server has
        confirmed the subscription and no command for it is in flight."""
        state = self._channels.get(channel)
        return state is not None and self._ready(state)

    def is_wanted(self, channel: bytes) -> bool:
        """Whether ``channel`` has a holder or is lingering."""
        state = self._channels.get(channel)
        return state is not None and (state.refs > 0 or channel in self._lingering)

    def where(self, channel: bytes) -> Hashable:
        """The link ``channel`` is subscribed (or being subscribed) on."""
        state = self._channels.get(channel)
        return None if state is None else state.where

    @property
    def subscribed(self) -> int:
        """How many channels the server has confirmed subscribed."""
        return self._on

    @property
    def wanted(self) -> int:
        """How many channels have a holder or are lingering."""
        return sum(1 for c, s in self._channels.items() if s.refs > 0 or c in self._lingering)

    @property
    def pending(self) -> bool:
        """Whether :meth:`take` may have something to send."""
        return bool(self._dirty)

    def __len__(self) -> int:
        """Channels known: wanted, subscribed, or with a command in flight."""
        return len(self._channels)
