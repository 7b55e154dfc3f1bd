"""The hub's shared state and its synchronous side: routing a broker
message, registering connections, health and readiness. Who gets what is
decided by :class:`smapws._core.router.Router` (sans-IO); this module offers
the envelopes, appends to the fleet's log, counts and logs.

Nothing here waits. The router task, the front door and each connection call
into one :class:`App`, all on the trio thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, NamedTuple

import trio
from trio_util import AsyncBool, AsyncValue, compose_values

from smapws import _version
from smapws._config import Config
from smapws._core.admission import Admission
from smapws._core.auth import VerifiedTokens
from smapws._core.envelope import Envelope, InvalidMessage
from smapws._core.fleet import Chains
from smapws._core.group import GroupView, WorkerReport, group_health
from smapws._core.history import History, HistoryLimits, Resume
from smapws._core.hub import Hub
from smapws._core.outbox import (
    CONFLATED,
    HIGH_WATER,
    OVERFLOW,
    QUEUED,
    OutboxLimits,
    QueueBudget,
)
from smapws._core.ratelimit import KeyedCount
from smapws._core.router import Router, RouterLimits, resync_envelope
from smapws._core.snapshot import SnapshotLimits, Snapshots
from smapws._core.wsconn import WsLimits
from smapws._io.brokers import Broker, Item, QueueBytes
from smapws._io.connection import Connection
from smapws._io.fleetlog import FleetLog
from smapws._io.tasktree import task_tree
from smapws._log import RateLimitedLog, fields, logger
from smapws.metrics import Metrics

#: At most one "invalid broker message" log line per reason, and one
#: "internal error" record per barrier, per this many seconds; the rest are
#: counted (metrics) and summarised in the next line.
INVALID_LOG_INTERVAL = 1.0

#: How long the oldest socket still sending its request head is left alone
#: once ``SMAPWS_MAX_PENDING_REQUESTS`` is reached, before a new one evicts it.
HEAD_EVICT_AGE = 2.0

#: Seconds a resuming tab waits for the fleet's log to give what it missed,
#: before carrying on without (a ``resync``).
CONSULT_TIMEOUT = 1.0

#: Seconds without asking the fleet's log where a user's messages go after it
#: failed to answer within ``SMAPWS_REDIS_TIMEOUT``: meanwhile, new users'
#: messages are not held, and go on this hub's own chain.
CONSULT_BACKOFF = 5.0

#: Users asked about in one consult at most (one pipeline): a hub that
#: starts under load may have thousands to ask about at once.
CONSULT_BATCH = 512

#: Most messages the router handles between two checkpoints (so that a
#: burst cannot keep other tasks, the writers included, waiting long).
ROUTER_BATCH = 64

#: Granularity of pings, pong deadlines and token expiry: one task visits every
#: connection this often (a few ms for 10,000 connections), instead of one
#: sleeping task per connection.
HEARTBEAT_TICK = 1.0

#: How often expired snapshot entries are swept (they are also skipped, and
#: forgotten, whenever a new tab asks for its user's state).
SWEEP_INTERVAL = 10.0


def _has_input(fd: int) -> bool:
    """Whether socket ``fd`` has bytes (or an EOF) waiting to be read, without
    reading them. One ``poll`` with no timeout; False without a socket."""
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return False


class _Counted(AbstractContextManager[None]):
    """An entry of one of the hub's tables of sockets (the request heads
    being read, the lingering closes) while a block runs, with the hub's
    count of them kept up to date. (A class: the generator behind
    ``contextlib.contextmanager`` was a noticeable part of a handshake.)"""

    __slots__ = ("_app", "_key", "_table", "_value")

    def __init__(self, app: App, table: dict[int, Any], key: int, value: object) -> None:
        self._app, self._table, self._key, self._value = app, table, key, value

    def __enter__(self) -> None:
        self._table[self._key] = self._value
        self._app._count_pending()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        app = self._app
        if self._table.pop(self._key, None) is not None or app._cut.pop(self._key, None):
            app._count_pending()


class HubState(NamedTuple):
    """What readiness depends on, as one observable value (:attr:`App.state`)."""

    #: The broker subscription: ``connected``, ``connecting`` or ``down``.
    broker: str
    draining: bool

    @property
    def ready(self) -> bool:
        return self.broker == "connected" and not self.draining


class Membership(NamedTuple):
    """What a worker of a group (``SMAPWS_WORKERS`` > 1) gives its
    :class:`App` at construction."""

    #: The worker's place in the group (its reports carry it).
    worker_index: int
    #: The group as the supervisor first described it (see
    #: :meth:`App.update_group` for the later descriptions).
    view: GroupView
    #: What ``/metrics`` answers: the group's registry, collected by the
    #: supervisor (``None`` when it cannot be).
    render_metrics: Callable[[], Awaitable[bytes | None]]


class App:
    """State shared by every task of one hub. ``member``: this hub is a
    worker of a group (None: a lone hub)."""

    def __init__(
        self,
        config: Config,
        broker: Broker,
        metrics: Metrics | None = None,
        fleet: FleetLog | None = None,
        member: Membership | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.hub: Hub[Connection] = Hub()
        self.metrics = metrics or Metrics()
        self.metrics.bind_gauges(lambda: self.hub.active_connections, lambda: self.hub.active_users)
        self.metrics.subscriber_up.set_function(lambda: float(broker.status == "connected"))
        #: What every connection's send queue holds, against
        #: SMAPWS_SEND_QUEUE_TOTAL_BYTES (shared through the limits).
        self.queue_budget = budget = QueueBudget(config.send_queue_total_bytes)
        self.metrics.send_queue_bytes.set_function(lambda: budget.used)
        self.limits = OutboxLimits(
            config.send_queue_high_water,
            config.send_queue_messages,
            config.send_queue_bytes,
            budget,
        )
        #: What every connection's state machine shares (smapws._core.wsconn).
        self.ws_limits = WsLimits(
            config.ping_interval,
            config.pong_wait,
            config.max_client_message_bytes,
            config.max_client_frame_rate,
        )
        self.snapshots: Snapshots | None = None
        if config.snapshot_ttl > 0 and config.snapshot_max_entries > 0:
            snapshots = self.snapshots = Snapshots(
                SnapshotLimits(
                    ttl=config.snapshot_ttl,
                    completed_ttl=config.snapshot_completed_ttl,
                    per_user=config.snapshot_per_user,
                    max_entries=config.snapshot_max_entries,
                    per_user_bytes=config.snapshot_per_user_bytes,
                    max_bytes=config.snapshot_max_bytes,
                )
            )
            self.metrics.snapshot_entries.set_function(lambda: len(snapshots))
            self.metrics.snapshot_bytes.set_function(lambda: snapshots.bytes)
        self.history: History | None = None
        history_limits = HistoryLimits(
            ttl=config.history_ttl,
            per_user=config.history_per_user,
            max_bytes=config.history_max_bytes,
            per_user_bytes=config.history_per_user_bytes,
        )
        if history_limits.enabled:
            history = self.history = History(history_limits)
            self.metrics.history_entries.set_function(lambda: len(history))
            self.metrics.history_bytes.set_function(lambda: history.bytes)
        #: The fleet's replay log in Redis (None: the embedded broker, or
        #: SMAPWS_FLEET_HISTORY off, or no window at all).
        self.fleet = fleet if self.history is not None else None
        #: The last id of each user's chain (:mod:`smapws._core.fleet`). With
        #: a fleet log, one older than half the window is asked for again.
        self.chains = Chains(
            None if self.fleet is None else config.history_ttl / 2, floor_wall=time.time()
        )
        self.prefix = config.channel_prefix.encode()
        #: Who gets what (sans-IO): this App offers, appends, counts and logs.
        self.routing: Router[Connection] = Router(
            self.prefix,
            self.chains,
            RouterLimits(
                resume_max_bytes=config.resume_max_bytes,
                send_queue_bytes=config.send_queue_bytes,
                send_queue_messages=config.send_queue_messages,
                max_message_bytes=config.max_message_bytes,
                max_json_depth=config.max_json_depth,
                hold_messages=config.ingest_queue,
                hold_bytes=config.ingest_queue_bytes,
            ),
            hub=self.hub,
            history=self.history,
            snapshots=self.snapshots,
            fleet_log=self.fleet is not None,
        )
        self._consult_after = 0.0
        #: Users whose messages are held for :meth:`_consulting` to ask
        #: the log about, with their channel; a lot it waits in.
        self._to_ask: dict[str, bytes] = {}
        self._consult_wake = trio.lowlevel.ParkingLot()
        #: Where :meth:`_routing_held` waits for held messages to be ready.
        self._ready_wake = trio.lowlevel.ParkingLot()
        #: The consult in flight (cancelled when the hub gives up waiting).
        self._consult_scope = trio.CancelScope()
        self._draining = AsyncBool(False)
        #: The broker's status and the drain flag as one observable value:
        #: the systemd notifier and a worker's reports wait on its changes
        #: instead of polling. Derived synchronously from both (trio-util's
        #: ``compose_values``), held for the life of the app.
        self._observers = contextlib.ExitStack()
        self.state: AsyncValue[HubState] = self._observers.enter_context(
            compose_values(
                broker=broker.status_value,
                draining=self._draining,
                _transform_=lambda v: HubState(v.broker, v.draining),
            )
        )
        #: In a worker of a group (``SMAPWS_WORKERS`` > 1): the group as the
        #: supervisor last described it, which ``/ready`` and ``/health``
        #: answer for; ``None`` in a lone hub.
        self._group: GroupView | None = None if member is None else member.view
        self._worker_index = 0 if member is None else member.worker_index
        self._render_metrics: Callable[[], Awaitable[bytes | None]] = (
            self._render_own_metrics if member is None else member.render_metrics
        )
        #: Per-user subscriptions (``SMAPWS_SUBSCRIBE_MODE=user``), or None.
        self.channels = broker.channels
        assert config.auth is not None, "the hub needs JWT_SECRET or JWT_PUBLIC_KEY_FILE"
        self.tokens = VerifiedTokens(config.auth)
        #: The upgrade decision (``frontdoor`` asks it with this App as the
        #: load) and its accept-rate buckets: the shared one and each user's
        #: share, spent before the shared one.
        self.admission = Admission(
            self.tokens,
            allowed_origins=config.allowed_origins,
            rate=config.max_accept_rate,
            rate_per_user=config.max_accept_rate_per_user,
            max_connections_per_user=config.max_connections_per_user,
            now=trio.current_time(),
        )
        #: Sockets each client address holds before its request is answered
        #: or while its answer lingers (``SMAPWS_MAX_PENDING_PER_ADDRESS``).
        self.pending_by_address = KeyedCount(config.max_pending_per_address)
        #: Answered sockets in their lingering close (see ``frontdoor._send``),
        #: oldest first: they count against ``SMAPWS_MAX_PENDING_REQUESTS``
        #: and are the first cut short when it is reached.
        self.lingering: dict[int, trio.CancelScope] = {}
        self.pending_upgrades = 0
        self._pending_by_user: dict[str, int] = {}
        #: The sockets still sending their request head, oldest first: each
        #: one's cancel scope and the time it was accepted (bounded by
        #: ``SMAPWS_MAX_PENDING_REQUESTS``, see :meth:`head_slot`), and their
        #: number as an observable value for the listeners to wait on.
        self.pending_heads: dict[int, tuple[trio.CancelScope, float, int]] = {}
        #: Sockets accepted whose task has not started yet (file
        #: descriptors): a listener accepts a burst before its tasks run, and
        #: they count against the same bound (:meth:`accepted`).
        self.unstarted: set[int] = set()
        #: Heads evicted and lingers cut short by :meth:`head_slot`, until
        #: their tasks have left the block that counted them (their sockets
        #: close then): counted still, so a burst of accepts cannot outrun
        #: the closes that made room for it.
        self._cut: dict[int, object] = {}
        self.pending_head_count = AsyncValue(0)
        self.metrics.pending_heads.set_function(lambda: len(self.pending_heads))
        self.metrics.lingering.set_function(lambda: len(self.lingering))
        self.metrics.tasks.set_function(lambda: task_tree().tasks)
        self.started_at = trio.current_time()
        self._invalid_log = RateLimitedLog(INVALID_LOG_INTERVAL)
        self._error_log = RateLimitedLog(INVALID_LOG_INTERVAL)
        self._empty = trio.Event()
        #: Whether per-message debug lines are wanted (read once: the check
        #: costs more than routing a message to a connection).
        self.debug = logger.isEnabledFor(logging.DEBUG)

    @property
    def draining(self) -> bool:
        return bool(self._draining.value)

    def start_drain(self) -> bool:
        """From now on this hub is draining (``/ready`` 503, new upgrades
        refused, ``websocket_draining`` 1); False when it already was."""
        if self._draining.value:
            return False
        self._draining.value = True
        self.metrics.draining.set(1)
        return True

    # -- connections -----------------------------------------------------

    def at_capacity(self) -> bool:
        return self.hub.active_connections + self.pending_upgrades >= self.config.max_connections

    def user_at_limit(self, user_id: str) -> bool:
        """Whether ``user_id`` holds ``SMAPWS_MAX_CONNECTIONS_PER_USER``
        connections on this hub, open or being upgraded."""
        held = len(self.hub.connections(user_id)) + self._pending_by_user.get(user_id, 0)
        return held >= self.config.max_connections_per_user

    async def head_slot(self) -> None:
        """Until one more accepted socket may read its request head: fewer
        than ``SMAPWS_MAX_PENDING_REQUESTS`` are doing so. The listeners call
        this before each ``accept()``, so that a burst waits in the kernel's
        backlog rather than in the hub's memory.

        When the bound is reached and the oldest has been at it
        :data:`HEAD_EVICT_AGE` s or more *with nothing to read*, it is
        evicted (its task answers 408 at once): a browser sends its head as
        soon as it connects, so slow or silent sockets cannot hold the slots
        against new clients. A socket whose bytes are waiting is not silent,
        only not served yet (the hub is behind): it is left alone, and
        accepting waits."""
        limit = self.config.max_pending_requests
        pending = self.pending_heads
        lingering = self.lingering
        cut = self._cut
        while self.pending_head_count.value >= limit:
            if cut or not (lingering or pending):
                # Sockets cut short that have not closed yet, or accepted
                # ones whose tasks have not started: both run next.
                await trio.lowlevel.checkpoint()
                continue
            if lingering:
                # Already answered: cutting its linger short costs at most
                # that client an RST after its response.
                key = next(iter(lingering))
                cut[key] = scope = lingering.pop(key)
                scope.cancel()
                continue
            key = next(iter(pending))
            scope, accepted_at, fd = pending[key]
            wait = accepted_at + HEAD_EVICT_AGE - trio.current_time()
            if wait <= 0:
                if not _has_input(fd):
                    cut[key] = pending.pop(key)
                    scope.cancel()
                    continue
                wait = HEAD_EVICT_AGE / 4  # look again, unless a slot frees first
            with trio.move_on_after(wait):
                await self.pending_head_count.wait_value(lambda n: n < limit)

    def _count_pending(self) -> None:
        self.pending_head_count.value = (
            len(self.pending_heads) + len(self.lingering) + len(self.unstarted) + len(self._cut)
        )

    def accepted(self, fd: int) -> None:
        """A listener accepted the socket ``fd``; its task is to start
        (:meth:`started`). Counted against ``SMAPWS_MAX_PENDING_REQUESTS``
        meanwhile."""
        self.unstarted.add(fd)
        self._count_pending()

    def started(self, fd: int) -> None:
        """The task of the socket ``fd`` started (it reads its head next,
        without an await in between: :meth:`reading_head` counts it then)."""
        if fd in self.unstarted:
            self.unstarted.discard(fd)
            self._count_pending()

    def reading_head(self, scope: trio.CancelScope, fd: int) -> AbstractContextManager[None]:
        """Count this socket (file descriptor ``fd``, -1 when it has none)
        among those still sending their request head while the block runs
        (see :meth:`head_slot`); ``scope`` is what an eviction cancels."""
        return _Counted(self, self.pending_heads, id(scope), (scope, trio.current_time(), fd))

    def lingering_close(self, scope: trio.CancelScope) -> AbstractContextManager[None]:
        """Count an answered socket in its lingering close against
        ``SMAPWS_MAX_PENDING_REQUESTS`` while the block runs; ``scope`` is
        what :meth:`head_slot` cancels to make room."""
        return _Counted(self, self.lingering, id(scope), scope)

    async def wait_empty(self) -> None:
        """Until no connection is open and no upgrade is under way."""
        while self.hub.active_connections or self.pending_upgrades:
            if self._empty.is_set():
                self._empty = trio.Event()
            await self._empty.wait()

    def upgrade_started(self, user_id: str) -> None:
        """An upgrade of ``user_id`` is under way (in user mode, its
        subscription is asked for now, while the handshake goes on)."""
        self.pending_upgrades += 1
        self._pending_by_user[user_id] = self._pending_by_user.get(user_id, 0) + 1
        if self.channels is not None:
            self.channels.acquire(user_id)

    def upgrade_finished(self, user_id: str) -> None:
        self.pending_upgrades -= 1
        n = self._pending_by_user.pop(user_id) - 1
        if n:
            self._pending_by_user[user_id] = n
        if self.channels is not None:
            self.channels.release(user_id)  # register() holds it next
        self._maybe_empty()

    def upgrade_waits(self, user_id: str, resume: Resume | None) -> bool:
        """Whether an upgrade of ``user_id`` may have to wait before its 101:
        in user mode for the subscription (:meth:`until_subscribed`), or
        for the fleet's log (:meth:`prepare_resume`). False: both return at
        once, and the front door writes the 101 without a deadline."""
        return self._subscription_waits() or self._resume_waits(user_id, resume)

    def _subscription_waits(self) -> bool:
        """User mode with the subscriber connected: a new tab's subscription
        is to be confirmed before its 101."""
        return self.channels is not None and self.broker.status == "connected"

    def _resume_waits(self, user_id: str, resume: Resume | None) -> bool:
        """``resume`` asks for an id this hub's window does not hold, and
        the fleet's log may: it is read before the 101."""
        return (
            resume is not None
            and self.history is not None
            and self.fleet is not None
            and self.routing.needs_fleet(user_id, resume, trio.current_time())
        )

    async def until_subscribed(self, user_id: str, deadline: float) -> None:
        """User mode: until Redis has confirmed ``user_id``'s subscription,
        so that the tab receives everything published after its upgrade.
        Returns early when the subscriber is not connected (nothing would
        confirm it soon), when the link that was to carry it is lost, or at
        ``deadline``; the tab is then registered all the same, and receives
        ``resync`` once the subscription is confirmed. At once in pattern
        mode, without a checkpoint (the handshake's next step writes the 101
        without one too: a pass through the scheduler per step was most of
        a handshake's cost, see :mod:`smapws._io.sockio`)."""
        channels = self.channels
        if channels is None or not self._subscription_waits():
            return
        with trio.move_on_at(deadline):
            await channels.wait_subscribed(user_id)

    def _maybe_empty(self) -> None:
        if not self.hub.active_connections and not self.pending_upgrades:
            self._empty.set()

    def register(self, conn: Connection, resume: Resume | None = None) -> None:
        """Add ``conn`` to the hub and queue what it needs before any live
        message can be queued (no await in between): with ``resume``
        (``?since=``), what it missed from the replay window, or a ``resync``
        (reason ``history_gap``) and the current state when the window
        cannot tell; without, the user's current state. In user mode a tab
        registered before its user's subscription is confirmed is marked: it
        receives ``resync`` when it is."""
        channels = self.channels
        if channels is not None:
            channels.acquire(conn.user_id)
            if not channels.is_subscribed(conn.user_id):
                channels.mark_gap(conn.user_id)
                self.chains.reset(conn.user_id, time.time())
        welcome = self.routing.register(conn.user_id, conn, resume, trio.current_time())
        m = self.metrics
        m.connections_total.inc()
        if welcome.outcome is not None:
            m.resumes.labels(welcome.outcome).inc()
        for env in welcome.replayed:
            conn.offer(env)
        if welcome.replayed:
            m.replayed_messages.inc(len(welcome.replayed))
        if welcome.gap:
            conn.offer(resync_envelope("history_gap", time.time(), trio.current_time()))
        for env in welcome.state:
            conn.offer(env)
        if welcome.state:
            m.snapshot_sent.inc(len(welcome.state))
        if self.draining:
            conn.go_away()

    def unregister(self, conn: Connection) -> None:
        has_others = self.routing.unregister(conn.user_id, conn, trio.current_time())
        if not has_others and self.fleet is not None and self.fleet.outstanding:
            self.fleet.hurry()  # the tab may be resuming elsewhere, from the log
        if self.channels is not None:
            self.channels.release(conn.user_id)
        unsent = len(conn.outbox)
        if unsent:
            self.metrics.messages_failed.inc(unsent)
            conn.outbox.take_all()
        self.metrics.connections_closed.labels(conn.cause or "unknown").inc()
        self._maybe_empty()
        if self.debug:  # (its fields cost more than the rest of this)
            logger.debug(
                "connection closed",
                extra=fields(
                    user=conn.user_id,
                    cause=conn.cause or "unknown",
                    has_other_connections=has_others,
                    remote=conn.remote,
                ),
            )

    def resync(self, reason: str, down_s: float, channel: bytes | None = None) -> int:
        """Tell every open connection (or, with ``channel``, those of that
        channel's user) that messages may have been missed (the subscription
        was down for ``down_s`` seconds): one ``resync`` message,
        ``{"type": "resync", "payload": {"reason": ..., "down_s": ...}}``, so
        that a frontend can refetch its state. Returns how many were queued."""
        conns = self.routing.resync(channel, time.time())
        env = resync_envelope(reason, time.time(), trio.current_time(), down_s=round(down_s, 3))
        queued = self._offer_all(conns, env)
        self.metrics.resync_messages.inc(queued)
        if queued and channel is None:
            logger.info("resync sent", extra=fields(reason=reason, connections=queued))
        elif queued and self.debug:  # user mode: one user's tabs, after each outage
            logger.debug("resync sent", extra=fields(reason=reason, connections=queued))
        return queued

    def forget_state(self, channel: bytes) -> None:
        """User mode: ``channel`` is no longer subscribed, so what the
        current-state cache holds for its user would go stale: forget it."""
        self.routing.forget_state(channel, time.time())

    def off_chain(self, channel: bytes) -> None:
        """The fleet's log took an append of this hub's after another entry
        than its predecessor: ask the log before the next message there."""
        self.routing.off_chain(channel, time.time())

    # -- barriers ----------------------------------------------------------

    def internal_error(self, where: str, exc: BaseException, **context: object) -> None:
        """What every barrier does with an unexpected exception (a bug, or an
        input no parser foresaw): count it in
        ``websocket_internal_errors_total{where}`` and log it as one record
        with its traceback, at most once a second per ``where``. The caller
        then drops what failed (a message, a connection) and goes on."""
        self.metrics.internal_errors.labels(where).inc()
        suppressed = self._error_log.allow(where, trio.current_time())
        if suppressed is None:
            return
        logger.error(
            "internal error",
            exc_info=exc,
            extra=fields(where=where, suppressed_since_last=suppressed, **context),
        )

    # -- routing ---------------------------------------------------------

    def route(self, channel: bytes, data: bytes, *, wall_time: float, now: float) -> int:
        """Deliver one broker message to every connection of its user.

        Returns the number of connections it was queued for. An invalid
        message is counted and logged (rate-limited) and dropped. This is a
        barrier: any other exception while routing drops this message alone
        (:meth:`internal_error`, ``where="route"``) and returns 0."""
        try:
            return self._route(channel, data, wall_time, now)
        except Exception as exc:
            self.internal_error("route", exc, channel=channel[:300].decode("utf-8", "replace"))
            return 0

    def _route(self, channel: bytes, data: bytes, wall_time: float, now: float) -> int:
        m = self.metrics
        m.broker_received.inc()
        try:
            routed = self.routing.route(channel, data, wall=wall_time, now=now)
        except InvalidMessage as exc:
            m.broker_invalid.labels(exc.reason).inc()
            self._log_invalid(exc.reason, channel, len(data), now)
            return 0
        if routed.append is not None and self.fleet is not None:
            self.fleet.append_nowait(channel, routed.append)
        conns = routed.conns
        if not conns:
            m.messages_unrouted.inc()
            return 0
        queued = self._offer_all(conns, routed.envelope)
        if self.debug:
            logger.debug(
                "Routed message",
                extra=fields(user=routed.user, type=routed.envelope.type, connections=queued),
            )
        return queued

    def _offer_all(self, conns: Iterable[Connection], env: Envelope) -> int:
        """Offer ``env`` to each of ``conns`` and count what happened; return
        how many queued (or wrote) it."""
        m = self.metrics
        queued = 0
        for conn in conns:
            try:
                result = conn.offer(env)
            except Exception as exc:  # a barrier: this connection alone
                self.internal_error("offer", exc, user=conn.user_id)
                m.messages_failed.inc()
                conn.fail()
                continue
            if result == QUEUED:  # the common case: nothing else to count
                queued += 1
            elif not result or result & OVERFLOW:  # closing (the connection counts 1013s)
                m.messages_failed.inc()
            else:
                queued += 1
                if result & CONFLATED:
                    m.progress_conflated.inc()
                if result & HIGH_WATER:
                    m.queue_high_water.inc()
        return queued

    def too_large(self, channel: bytes, size: int) -> None:
        """A broker message over ``SMAPWS_MAX_MESSAGE_BYTES``, discarded by
        the read loop unparsed: counted and logged like any invalid one."""
        self.metrics.broker_received.inc()
        self.metrics.broker_invalid.labels("too_large").inc()
        self._log_invalid("too_large", channel, size, trio.current_time())

    def dropped(self) -> None:
        """A valid broker message was dropped before the router (its queue
        was full: the router fell behind). Counted and logged (rate-limited),
        and nobody's window may replay across it: every tab gets a ``resync``
        (reason ``dropped``) and the replay windows are cleared, by the
        router's next batch or the next heartbeat tick, whichever is first,
        at most once per :data:`DROP_RESYNC_INTERVAL` (drops meanwhile are
        covered by the next one). Which user's message it was is not known
        here. (The windows are cleared when the resync is sent, not exactly
        where the message was lost: a tab that resumes in between, within
        that second, may be replayed across it.)"""
        self.metrics.broker_dropped.inc()
        self.routing.dropped()
        now = trio.current_time()
        suppressed = self._invalid_log.allow("dropped", now)
        if suppressed is not None:
            logger.warning(
                "broker message dropped: the router's queue is full; every tab gets resync",
                extra=fields(suppressed_since_last=suppressed),
            )

    def _resync_if_dropped(self, now: float) -> None:
        if self.routing.drop_resync_due(now):
            self.resync("dropped", 0.0)

    def _log_invalid(self, reason: str, channel: bytes, size: int, now: float) -> None:
        suppressed = self._invalid_log.allow(reason, now)
        if suppressed is None:
            return
        logger.warning(
            "invalid broker message dropped",
            extra=fields(
                reason=reason,
                channel=channel[:300].decode("utf-8", "replace"),
                bytes=size,
                suppressed_since_last=suppressed,
            ),
        )

    async def router(
        self, receive: trio.MemoryReceiveChannel[Item], queued: QueueBytes | None = None
    ) -> None:
        """The router task: drain the broker's queue into connections,
        giving each message's bytes back to ``queued`` (the broker's bound
        of the queue in bytes, when it has one).

        Messages that arrived together are routed together, up to
        :data:`ROUTER_BATCH`, with one clock reading and one checkpoint:
        they were received in the same instant. With a fleet log, the
        messages of a user whose chain this hub does not know are held
        while a task of the router's asks the log (:meth:`_consulting`),
        and the rest of the batch goes on."""
        receive_nowait = receive.receive_nowait
        give = (lambda n: None) if queued is None else queued.give
        async with trio.open_nursery() as nursery:
            if self.fleet is not None:
                nursery.start_soon(self._consulting, self.fleet)
                nursery.start_soon(self._routing_held)
            async for item in receive:
                give(len(item[1]))
                batch = [item]
                for _ in range(ROUTER_BATCH):
                    try:
                        batch.append(receive_nowait())
                    except trio.WouldBlock:
                        break
                    give(len(batch[-1][1]))
                if self.fleet is not None:
                    batch = self._hold(batch)
                self._route_batch(batch)
            # The broker is gone: what is held goes on this hub's chain.
            self.routing.holding.give_up()
            while batch := self.routing.take(ROUTER_BATCH):
                self._route_batch(batch)
            nursery.cancel_scope.cancel()

    def _route_batch(self, batch: list[Item]) -> None:
        """Route ``batch``, received in one instant (one clock reading)."""
        route = self.route
        wall, now = time.time(), trio.current_time()
        self._resync_if_dropped(now)
        for channel, data in batch:
            route(channel, data, wall_time=wall, now=now)
        self.routing.batch_done()

    def _hold(self, batch: list[Item]) -> list[Item]:
        """What of ``batch`` to route now: the messages of users whose chain
        this hub does not know are held (:meth:`Router.hold`) for
        :meth:`_consulting` to ask the fleet's log about, unless it failed
        to answer in the last :data:`CONSULT_BACKOFF`. When more is held
        than the broker's queue may hold, nobody waits any longer (counted
        as a failed consult), and what is over the bound is routed here and
        now. A barrier, like :meth:`route`."""
        routing = self.routing
        holding = routing.holding
        try:
            now = trio.current_time()
            batch, wanted = routing.hold(batch, now, ask=now >= self._consult_after)
            if wanted:
                self._to_ask.update(wanted)
                self._consult_wake.unpark_all()
            if holding.over:
                if holding.waiting:
                    self.metrics.fleet_errors.labels("consult").inc()
                    self._give_up_consulting()
                # A user whose messages keep coming stays held, waiting for
                # nothing, and the helper routes a chunk a round while the
                # router holds a batch: the router keeps the bound itself.
                while holding.over and (ready := routing.take(ROUTER_BATCH)):
                    self._route_batch(ready)
        except Exception as exc:
            self.internal_error("route", exc)
        return batch

    def _give_up_consulting(self) -> None:
        """Route every held message on this hub's own chain, and ask the log
        nothing for :data:`CONSULT_BACKOFF`."""
        self._consult_after = trio.current_time() + CONSULT_BACKOFF
        self._to_ask.clear()
        self.routing.holding.give_up()
        self._consult_scope.cancel()
        self._ready_wake.unpark_all()

    async def _consulting(self, fleet: FleetLog) -> None:
        """A helper task of the router's with a fleet log: ask the log for
        the last entries of each user :meth:`_hold` names, all that came
        meanwhile in one round trip (:data:`CONSULT_BATCH` users at most),
        within ``SMAPWS_REDIS_TIMEOUT`` (then every held message goes on
        this hub's own chain, and the log is not asked for
        :data:`CONSULT_BACKOFF`). Not the task that routes what was
        answered (:meth:`_routing_held`): a user whose messages keep coming
        would keep it from asking. A barrier, like :meth:`route`."""
        while True:
            while not self._to_ask:
                await self._consult_wake.park()
            try:
                await self._ask(fleet)
            except Exception as exc:
                self.internal_error("route", exc)
                self._give_up_consulting()

    async def _routing_held(self) -> None:
        """The other helper: route the held messages whose answer came (or
        was given up on), :data:`ROUTER_BATCH` at a time, a checkpoint
        after each. A barrier, like :meth:`route`."""
        routing, holding = self.routing, self.routing.holding
        while True:
            while not holding.ready:
                await self._ready_wake.park()
            try:
                self._route_batch(routing.take(ROUTER_BATCH))
            except Exception as exc:
                self.internal_error("route", exc)
                self._give_up_consulting()
            await trio.lowlevel.checkpoint()

    async def _ask(self, fleet: FleetLog) -> None:
        """One consult of the users :meth:`_hold` named (see :meth:`_consulting`)."""
        asked = dict(itertools.islice(self._to_ask.items(), CONSULT_BATCH))
        for user in asked:
            del self._to_ask[user]
        found = None
        with trio.CancelScope() as self._consult_scope:
            with trio.move_on_after(self.config.redis_timeout) as deadline:
                found = await fleet.consult(list(asked.values()))
            if deadline.cancelled_caught:
                self.metrics.fleet_errors.labels("consult").inc()
        if found is None:
            self._give_up_consulting()
        else:
            self.routing.holding.answer({user: found[ch] for user, ch in asked.items()})
            self._ready_wake.unpark_all()

    async def prepare_resume(self, user: str, resume: Resume | None) -> Resume | None:
        """``resume`` with what the fleet's log holds after its ``since``,
        when this hub's window does not hold that id (at most
        :data:`CONSULT_TIMEOUT`; then :meth:`register` answers a gap)."""
        history, fleet = self.history, self.fleet
        if not self._resume_waits(user, resume):
            return resume  # (at once, no checkpoint: see until_subscribed)
        assert resume is not None and history is not None and fleet is not None
        epoch = history.epoch
        entries = None
        with trio.move_on_after(min(CONSULT_TIMEOUT, self.config.redis_timeout)) as scope:
            entries = await fleet.read(self.prefix + user.encode())
        if scope.cancelled_caught:
            self.metrics.fleet_errors.labels("read").inc()
        if entries is None:
            return resume
        try:
            joined = self.routing.with_fleet(
                resume, entries, epoch, time.time(), trio.current_time()
            )
        except InvalidMessage:  # not what a hub wrote: no replay from it
            self.metrics.fleet_errors.labels("read").inc()
            return resume
        return resume if joined is None else joined

    async def maintain(self) -> None:
        """The hub's periodic duties, in one task: a heartbeat tick for every
        connection (pings, pong and token deadlines) every
        :data:`HEARTBEAT_TICK` at most, and a sweep of expired current-state
        entries every :data:`SWEEP_INTERVAL`."""
        cfg = self.config
        tick = min(HEARTBEAT_TICK, cfg.ping_interval / 4, cfg.pong_wait / 4)
        next_tick = trio.current_time()
        next_sweep = next_tick + SWEEP_INTERVAL
        while True:
            next_tick += tick
            await trio.sleep_until(next_tick)
            now = trio.current_time()
            self._resync_if_dropped(now)  # when no message came since the drop
            for conn in self.hub.all_connections():
                try:
                    conn.heartbeat(now)
                except Exception as exc:  # a barrier: this connection alone
                    self.internal_error("heartbeat", exc, user=conn.user_id)
                    conn.fail()
            if now >= next_sweep:
                self.routing.sweep(now, max(cfg.history_ttl, SWEEP_INTERVAL))
                next_sweep = now + SWEEP_INTERVAL

    # -- health ----------------------------------------------------------

    @property
    def group(self) -> GroupView | None:
        """The group this worker belongs to, as last described (None: a lone hub)."""
        return self._group

    @property
    def worker_index(self) -> int:
        return self._worker_index

    def update_group(self, view: GroupView) -> None:
        """The supervisor describes the group anew."""
        self._group = view

    async def render_metrics(self) -> bytes | None:
        """What ``/metrics`` answers: this hub's registry, or in a worker
        the group's, collected by the supervisor (``None`` when it cannot
        be)."""
        return await self._render_metrics()

    def ready(self) -> bool:
        """What ``/ready`` answers: this hub is subscribed and not draining,
        and, in a worker, so is every other worker of the group."""
        if not self.state.value.ready:
            return False
        return self.group is None or self.group.with_report(self.report()).ready

    def report(self) -> WorkerReport:
        """This hub's state for the supervisor of its group."""
        state = self.state.value
        return WorkerReport(
            index=self.worker_index,
            pid=os.getpid(),
            backend=self.broker.backend,
            broker=state.broker,
            draining=state.draining,
            connections=self.hub.active_connections,
            users=self.hub.active_users,
            pending_upgrades=self.pending_upgrades,
        )

    async def _render_own_metrics(self) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self.metrics.render()

    def health(self) -> dict[str, Any]:
        """The ``/health`` document; in a worker, the group's
        (:func:`~smapws._core.group.group_health`)."""
        own = self._own_health()
        if self.group is None:
            return own
        return group_health(self.group, own, self.report())

    def _own_health(self) -> dict[str, Any]:
        sub = self.broker.info()
        ok = sub["status"] == "connected" and not self.draining
        return {
            "status": "ok" if ok else "degraded",
            "version": _version.__version__,
            "uptime_s": round(trio.current_time() - self.started_at, 3),
            "draining": self.draining,
            "subscriber": sub,
            "websocket": {
                "active_connections": self.hub.active_connections,
                "active_users": self.hub.active_users,
                "max_connections": self.config.max_connections,
                "pending_upgrades": self.pending_upgrades,
            },
        }
