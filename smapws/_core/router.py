"""Who gets what: the hub's routing decisions, sans-IO.

:class:`Router` holds what routing decides with: the registry of
connections (:class:`~smapws._core.hub.Hub`), each user's chain of ids
(:class:`~smapws._core.fleet.Chains`), the replay window
(:class:`~smapws._core.history.History`) and the current state
(:class:`~smapws._core.snapshot.Snapshots`). Its methods take a broker
message, a new tab or an outage and return what to do, as values:

- :meth:`Router.route`: a message's :class:`Routed` (its envelope, framed
  once with its id; the connections to offer it to; the entry to append to
  the fleet's log), after recording it in the window and the current state.
- :meth:`Router.register` / :meth:`Router.unregister`: a tab's
  :class:`Welcome` (what it missed or a gap, then its user's state).
- :meth:`Router.resync` and :meth:`Router.dropped` / :meth:`Router.drop_resync_due`:
  which tabs are owed a ``resync``, and the windows that can no longer
  replay across the hole.

The trio shell (:class:`smapws._io.app.App`) does the rest: it offers the
envelopes to the connections, appends to the log, counts and logs.
Connections are opaque here (hashable objects). Nothing reads a clock: the
monotonic ``now`` and the ``wall`` time (POSIX seconds) are arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Final, Generic, NamedTuple, TypeVar

from smapws._core.consult import Holding, Item
from smapws._core.envelope import (
    DEFAULT_MAX_JSON_DEPTH,
    DEFAULT_MAX_MESSAGE_BYTES,
    Envelope,
    InvalidMessage,
    encode_message,
    parse,
    user_from_channel,
)
from smapws._core.fleet import (
    Chains,
    Header,
    LogEntry,
    chain_after,
    chain_id,
    encode_entry,
    resolve,
    splice,
)
from smapws._core.history import AGE_TOLERANCE, FleetReplay, History, Resume, conflate
from smapws._core.hub import Hub
from smapws._core.snapshot import Snapshots

C = TypeVar("C")

#: Channels whose user :meth:`Router.user_of` remembers, at most: more than
#: the users a hub of 10,000 tabs receives for (at 2,048, a hub with 10,000
#: active users missed on most messages, and cleared the table every 2,048:
#: Router.route 0.90x per message with this bound, alternated in process).
#: At most ~12 MB with every user id at its 256-byte limit (a channel and its
#: user id are at most 256 bytes each, with ~200 of dict and objects), ~2 MB
#: for ids of a few dozen bytes.
CHANNEL_USERS: Final = 16384

#: Links the chain table keeps whatever the window holds (see
#: :meth:`Router.route`): a few hundred bytes each.
CHAINS_FLOOR: Final = 500

#: Seconds between two resyncs for messages dropped before the router: its
#: queue is full when that happens, and one resync covers every drop before
#: it (a frontend refetches once, not once per dropped message).
DROP_RESYNC_INTERVAL: Final = 1.0


class Routed(NamedTuple, Generic[C]):
    """What to do with one valid broker message."""

    user: str
    #: The message as every tab of ``user`` receives it (with its id).
    envelope: Envelope
    #: The tabs to offer it to (a snapshot; empty: nobody holds the user here).
    conns: tuple[C, ...]
    #: The fleet-log entry to append, or None (no log, or the log has it).
    append: bytes | None
    mid: str
    prev: str


class Welcome(NamedTuple):
    """What a new tab is offered, in this order: ``replayed`` (what it
    missed), a ``resync`` with reason ``history_gap`` when ``gap``, then
    ``state`` (its user's current state; after a gap, or without a
    resume)."""

    #: ``websocket_resumes_total{outcome}``: ``replayed``, ``fleet``, ``gap``
    #: or ``too_large``; None for a tab that did not resume.
    outcome: str | None
    replayed: list[Envelope]
    gap: bool
    state: list[Envelope]


def resync_envelope(reason: str, wall: float, now: float, **extra: object) -> Envelope:
    """``{"type": "resync", "payload": {"reason": ..., **extra}}``, stamped
    at ``wall`` (it has no id: it is no message of the chain)."""
    data = encode_message("resync", {"reason": reason, **extra})
    return parse(data, wall_time=wall, received_at=now)


@dataclasses.dataclass(frozen=True, slots=True)
class RouterLimits:
    """The bounds routing decides with (the hub's are its
    :class:`~smapws._config.Config`'s)."""

    #: ``SMAPWS_RESUME_MAX_BYTES``: a replay larger is a gap.
    resume_max_bytes: int
    #: A tab's send queue (``SMAPWS_SEND_QUEUE_BYTES`` / ``_MESSAGES``): a
    #: replay or a state is kept to half of it, or the tab would be closed
    #: 1013 at once, again on every reconnect.
    send_queue_bytes: int
    send_queue_messages: int
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    #: Messages held while the fleet's log is asked (:meth:`Router.hold`), at
    #: most: the broker's queue bounds (``SMAPWS_INGEST_QUEUE`` / ``_BYTES``),
    #: of which the hold is the continuation.
    hold_messages: int = 65536
    hold_bytes: int = 16 * 1024 * 1024


class Router(Generic[C]):
    """The routing decisions of one hub (see the module docstring).

    ``fleet_log``: whether the hub appends to a fleet log (then ``chains``
    distrusts old links and :meth:`to_consult` names the users to look up
    before their first message)."""

    def __init__(
        self,
        prefix: bytes,
        chains: Chains,
        limits: RouterLimits,
        *,
        hub: Hub[C] | None = None,
        history: History | None = None,
        snapshots: Snapshots | None = None,
        fleet_log: bool = False,
    ) -> None:
        self.prefix = prefix
        self.hub: Hub[C] = Hub() if hub is None else hub
        self.chains = chains
        self.history = history
        self.snapshots = snapshots
        self.fleet_log = fleet_log
        self.limits = limits
        #: The log's last entries for users whose chain this hub asked for,
        #: given by the shell (:meth:`consulted`) before it routes a batch.
        self._consulted: dict[str, Sequence[Header]] = {}
        #: The messages of users whose place in the chain the log is asked
        #: for (see :meth:`hold`).
        self.holding = Holding(limits.hold_messages, limits.hold_bytes)
        self._chain_trim_at = 2 * CHAINS_FLOOR
        #: channel -> user, of the channels of recent messages (see :meth:`user_of`).
        self._channel_users: dict[bytes, str] = {}
        #: Tabs replayed from the fleet's log further than this hub has
        #: routed -> the ids of that lead: sent already, not to be sent live
        #: again (see :meth:`_not_replayed`).
        self._ahead: dict[C, set[str]] = {}
        #: A message was dropped before the router: every tab is owed a
        #: resync (see :meth:`dropped`).
        self._resync_pending = False
        self._next_drop_resync = 0.0

    # -- broker messages ---------------------------------------------------

    def route(self, channel: bytes, data: bytes, *, wall: float, now: float) -> Routed[C]:
        """Decide one broker message: its id (the same on every hub, see
        :mod:`smapws._core.fleet`), computed before it is framed, so it is
        parsed and framed once; its place in the chain, the replay window
        and the current state; the tabs to offer it to.

        Raises :class:`InvalidMessage` (a bad channel, or any reason of
        :func:`~smapws._core.envelope.parse`) and then changes nothing."""
        user = self._channel_users.get(channel) or self._learn_user(channel)
        chains = self.chains
        recent = None
        prev = chains.prev(user, now)
        if prev is not None:
            mid = chain_id(channel, data, prev)
        else:
            recent = self._consulted.get(user)
            if recent is None:  # the log did not answer: carry on alone
                prev = chains.last(user)
                mid = chain_id(channel, data, prev)
            else:
                mid, prev = resolve(channel, data, recent, chains.floor_ms(user))
        limits = self.limits
        env = parse(
            data,
            wall_time=wall,
            received_at=now,
            max_bytes=limits.max_message_bytes,
            max_depth=limits.max_json_depth,
            message_id=mid,
        )
        written = False  # already in the fleet's log
        if recent is not None:
            del self._consulted[user]
            written = any(h.mid == mid for h in recent)
        if chains.advance(user, mid, now) and len(chains) > self._chain_trim_at:
            self._trim_chains()
        if self.history is not None:
            self.history.record(user, mid, prev, env, now)
        append = None
        if self.fleet_log and not written:
            append = encode_entry(mid, prev, int(wall * 1000), data)
        if env.kind and self.snapshots is not None:
            self.snapshots.observe(user, env, now)
        conns = self.hub.connections(user)
        targets = tuple(conns) if conns else ()
        if self._ahead and targets:
            targets = self._not_replayed(targets, mid)
        return Routed(user, env, targets, append, mid, prev)

    def _not_replayed(self, conns: tuple[C, ...], mid: str) -> tuple[C, ...]:
        """``conns`` without the tabs a fleet replay already sent ``mid``
        (the log was ahead of this hub: it had messages this hub routes only
        later). A tab's lead ends at its first live message the replay did
        not hold: from there on, everything is new to it."""
        ahead = self._ahead
        out = []
        for conn in conns:
            ids = ahead.get(conn)
            if ids is not None:
                if mid in ids:
                    ids.discard(mid)
                    if not ids:
                        del ahead[conn]
                    continue
                del ahead[conn]
            out.append(conn)
        return tuple(out)

    def _trim_chains(self) -> None:
        """Keep the chain table in proportion to what uses it: the users the
        replay window or a connection holds (a flood to distinct user ids
        took 74,506 links, 84 MiB, with the window at its bound). Trimmed to
        that many (at least :data:`CHAINS_FLOOR`) when it reaches twice
        as many, so the walk is paid once per that many new users."""
        history = self.history
        hub = self.hub
        held = hub.active_users + (0 if history is None else history.users())
        limit = max(CHAINS_FLOOR, held)

        def keep(user: str) -> bool:
            return bool(hub.connections(user)) or (
                history is not None and history.user_bytes(user) > 0
            )

        self.chains.trim(keep, limit)
        self._chain_trim_at = 2 * max(limit, len(self.chains))

    def user_of(self, channel: bytes) -> str:
        """:func:`~smapws._core.envelope.user_from_channel` of ``channel``
        (raises :class:`InvalidMessage` alike), remembered for the last
        :data:`CHANNEL_USERS` channels: with a fleet log each message's
        channel is read twice (:meth:`to_consult`, then :meth:`route`), and
        checking it costs more than the lookup (~0.5 µs against ~0.06).
        (The hot paths inline the lookup and call :meth:`_learn_user` on a
        miss.)"""
        return self._channel_users.get(channel) or self._learn_user(channel)

    def _learn_user(self, channel: bytes) -> str:
        """Check ``channel`` (:func:`user_from_channel`) and remember its user."""
        user = user_from_channel(channel, self.prefix)
        users = self._channel_users
        if len(users) >= CHANNEL_USERS:
            users.clear()  # all at once: cheaper than an LRU's bookkeeping
        users[channel] = user
        return user

    def to_consult(self, channels: Iterable[bytes], now: float) -> dict[str, bytes]:
        """The users of a batch (their ``channels``) whose chain this hub
        does not know, each with its channel: what to ask the fleet's log
        before routing the batch. Bad channels are skipped (:meth:`route`
        refuses them)."""
        wanted: dict[str, bytes] = {}
        users = self._channel_users
        for channel in channels:
            try:
                user = users.get(channel) or self._learn_user(channel)
            except InvalidMessage:
                continue
            if user not in wanted and self.chains.prev(user, now) is None:
                wanted[user] = channel
        return wanted

    def hold(
        self, batch: list[Item], now: float, *, ask: bool
    ) -> tuple[list[Item], dict[str, bytes]]:
        """Split a batch: the messages to route now, and the users to ask the
        fleet's log for (:meth:`to_consult`, when ``ask``), each with its
        channel. Their messages are held (:attr:`holding`), and so is every
        message of a user still held: it must not overtake the first. The
        shell gives the answers to :attr:`holding` and routes what
        :meth:`take` gives back."""
        holding = self.holding
        wanted = self.to_consult((channel for channel, _ in batch), now) if ask else {}
        if not wanted and not holding.messages:
            return batch, wanted
        for user in [user for user in wanted if user in holding]:
            del wanted[user]  # asked already
        out = []
        users = self._channel_users
        for item in batch:
            channel = item[0]
            try:
                user = users.get(channel) or self._learn_user(channel)
            except InvalidMessage:
                out.append(item)  # route() refuses it
                continue
            if user in holding:
                holding.hold(user, item)
            elif user in wanted:
                holding.wait(user, item)
            else:
                out.append(item)
        return out, wanted

    def take(self, n: int) -> list[Item]:
        """Up to ``n`` held messages whose answer came (or was given up on),
        to route now, in this order, before the next :meth:`batch_done`."""
        items, answers = self.holding.take(n)
        self._consulted.update(answers)
        return items

    def consulted(self, user: str, recent: Sequence[Header]) -> None:
        """The log's last entries of ``user`` (oldest first), for the
        user's next message in this batch."""
        self._consulted[user] = recent

    def batch_done(self) -> None:
        """The batch is routed: what the log said is stale from now on, but
        for a user still held (:meth:`take` gave a chunk that ended with
        their first messages, all invalid): it places their next one."""
        consulted = self._consulted
        if consulted:
            holding = self.holding
            kept = [(user, recent) for user, recent in consulted.items() if user in holding]
            consulted.clear()
            consulted.update(kept)

    # -- outages -----------------------------------------------------------

    def resync(self, channel: bytes | None, wall: float) -> Iterable[C]:
        """The subscription was down (with ``channel``: that channel's
        only): the tabs owed a ``resync``. No replay may cross the hole, so
        the window forgets what came before it, and the chains start anew.
        Raises :class:`InvalidMessage` for a bad ``channel``."""
        if channel is None:
            if self.history is not None:
                self.history.clear()
            self.chains.reset_all(wall)
            return self.hub.all_connections()
        user = user_from_channel(channel, self.prefix)
        conns = tuple(self.hub.connections(user))
        if self.history is not None:
            self.history.forget_user(user)  # that user's hole only
        self.chains.reset(user, wall)
        return conns

    def dropped(self) -> None:
        """A valid message was dropped before the router (which user's is
        not known): every tab is owed a resync, see :meth:`drop_resync_due`."""
        self._resync_pending = True

    def drop_resync_due(self, now: float) -> bool:
        """Whether to send that resync now (then :meth:`resync` with no
        channel): at most once per :data:`DROP_RESYNC_INTERVAL`, and drops
        meanwhile are covered by the next one."""
        if self._resync_pending and now >= self._next_drop_resync:
            self._resync_pending = False
            self._next_drop_resync = now + DROP_RESYNC_INTERVAL
            return True
        return False

    def forget_state(self, channel: bytes, wall: float) -> None:
        """``channel`` is no longer subscribed (user mode): its user's
        current state would go stale, and its chain may move on unseen.
        Raises :class:`InvalidMessage` for a bad ``channel``."""
        user = user_from_channel(channel, self.prefix)
        if self.snapshots is not None:
            self.snapshots.forget_user(user)
        self.chains.reset(user, wall)

    def off_chain(self, channel: bytes, wall: float) -> None:
        """The fleet's log took this hub's append after another entry than
        its predecessor: ask the log before the next message there."""
        with contextlib.suppress(InvalidMessage):
            self.chains.reset(user_from_channel(channel, self.prefix), wall)

    def sweep(self, now: float, idle: float) -> None:
        """Forget expired current state and window entries, and the chains
        idle for ``idle`` seconds."""
        if self.snapshots is not None:
            self.snapshots.sweep(now)
        if self.history is not None:
            self.history.sweep(now)
        self.chains.sweep(now, idle)

    # -- tabs --------------------------------------------------------------

    def register(self, user: str, conn: C, resume: Resume | None, now: float) -> Welcome:
        """Add ``conn`` (a tab of ``user``) and decide what it is offered
        before any live message (:class:`Welcome`): with ``resume``
        (``?since=``), what it missed, or a gap and the current state when
        neither the window nor ``resume``'s fleet replay can tell, or when
        the replay would not fit; without, the current state."""
        self.hub.add(user, conn)
        for held in (self.history, self.snapshots):  # its recovery goes last (issue 16)
            if held is not None:
                held.hold(user)
        if resume is None:
            return Welcome(None, [], False, self._current_state(user, now))
        outcome, missed, lead = self._missed(user, resume, now)
        if missed is not None and not self._fits(missed, self.limits.resume_max_bytes):
            missed, outcome = None, "too_large"
        if missed is not None:
            if lead:
                self._ahead[conn] = lead
            return Welcome(outcome, missed, False, [])
        return Welcome(outcome, [], True, self._current_state(user, now))

    def unregister(self, user: str, conn: C, now: float) -> bool:
        """Remove ``conn``; return whether ``user`` has other tabs here (when
        not, the user's window and state are no longer held)."""
        has_others = self.hub.remove(user, conn)
        self._ahead.pop(conn, None)
        if not has_others:
            for held in (self.history, self.snapshots):
                if held is not None:
                    held.release(user, now)
        return has_others

    def needs_fleet(self, user: str, resume: Resume | None, now: float) -> bool:
        """Whether a tab's ``resume`` needs the fleet's log: this hub's
        window does not hold its ``since``."""
        history = self.history
        if resume is None or history is None or not self.fleet_log:
            return False
        return history.after(user, resume, now) is None

    def with_fleet(
        self, resume: Resume, entries: Sequence[LogEntry], epoch: int, wall: float, now: float
    ) -> Resume | None:
        """``resume`` with what the log's ``entries`` (the user's, read
        while the window was in ``epoch``) hold after its ``since``; None
        when they cannot tell (``since`` not there, a broken chain, an id
        reused since the tab saw it). Raises :class:`InvalidMessage` when an
        entry is not what a hub wrote (then nothing is replayed from them)."""
        found = chain_after(entries, resume.since)
        if found is None:
            return None
        since, chain = found
        age = wall - since.wall_ms / 1000
        if resume.age is not None and age < resume.age - AGE_TOLERANCE:
            return None  # a message of the same id, from before the log expired
        limits = self.limits
        envelopes = tuple(
            parse(
                e.raw,
                wall_time=e.wall_ms / 1000,
                received_at=now,
                max_bytes=limits.max_message_bytes,
                max_depth=limits.max_json_depth,
                message_id=e.mid,
            )
            for e in chain
        )
        links = tuple((e.mid, e.prev) for e in chain)
        return dataclasses.replace(resume, fleet=FleetReplay(envelopes, links, epoch))

    def _missed(
        self, user: str, resume: Resume, now: float
    ) -> tuple[str, list[Envelope] | None, set[str]]:
        """What a resuming tab missed: from this hub's window (``replayed``)
        or from the fleet's log joined to this hub's window (``fleet``);
        None when neither can tell. Then the ids of the log's messages that
        this hub has not routed yet (its lead), which will come live too."""
        history = self.history
        if history is None:
            return "gap", None, set()
        local = history.after(user, resume, now)
        if local is not None:
            return "replayed", local, set()
        fleet = resume.fleet
        if fleet is None or fleet.epoch != history.epoch:
            return "gap", None, set()
        routed = history.chain(user, now)
        keep = splice(fleet.links, resume.since, [(mid, prev) for mid, prev, _ in routed])
        if keep is None:
            return "gap", None, set()
        lead = {mid for mid, _ in fleet.links}.difference(mid for mid, _, _ in routed)
        return "fleet", conflate([*fleet.envelopes, *(routed[i][2] for i in keep)]), lead

    def _fits(self, envs: list[Envelope], budget: int) -> bool:
        """Whether ``envs`` fit ``budget`` bytes and half a new tab's send
        queue."""
        limits = self.limits
        size = sum(len(env.frame) for env in envs)
        return (
            size <= min(budget, limits.send_queue_bytes // 2)
            and len(envs) <= limits.send_queue_messages // 2
        )

    def _current_state(self, user: str, now: float) -> list[Envelope]:
        """The user's current state, the most recently updated part that
        fits half the tab's send queue (the rest is left out, so that a
        state larger than the queue is not a 1013 on every connect)."""
        if self.snapshots is None:
            return []
        state = self.snapshots.for_user(user, now)
        while state and not self._fits(state, self.limits.send_queue_bytes):
            state = state[1:]  # oldest update first: keep the newest
        return state


__all__ = [
    "CHAINS_FLOOR",
    "DROP_RESYNC_INTERVAL",
    "Routed",
    "Router",
    "RouterLimits",
    "Welcome",
    "resync_envelope",
]
