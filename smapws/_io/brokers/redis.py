"""The Redis subscriber: ``PSUBSCRIBE {prefix}*`` (pattern mode) or the users'
own channels (user mode) through trio-asyncio, proven alive by probes,
reconnecting with capped backoff, optionally via Sentinel or to any node of
a Redis Cluster.

Shape of one subscription ("session")::

    run (trio, the broker task)                 reconnect loop, backoff, status
    └── session nursery
        ├── pump (asyncio side, via aio_as_trio) reads pmessages -> send_nowait
        └── watch_probes (trio)                 PUBLISH a probe every interval,
                                                raise ProbeLost when one is late

- The read loop runs on the asyncio side of the bridge and hands each message
  to trio with ``send_nowait``: crossing the bridge once per message costs ~4x
  more (DESIGN.md §1). It reads RESP2 replies straight from the hiredis
  reader of redis-py's connection (:func:`_fast_reader`), not through
  ``get_message``, whose layers cost more than the rest of a delivery.
- **Liveness.** A half-open TCP link (peer gone, no RST) gives redis-py no error
  and no message for as long as it lasts. So the subscribing connection also
  ``SUBSCRIBE``\\ s ``smapws:probe:<node id>``, and every ``probe_interval`` the
  hub ``PUBLISH``\\ es a probe there (on a second connection of the same
  client). A probe that has not come back through the subscription within one
  ``probe_interval`` of being sent, while nothing else came through either,
  ends the session (:class:`ProbeLost`): a link that goes silent is dropped
  within two intervals. A probe late behind a backlog of messages that are
  still arriving is waited for (the link is slow, not dead; Redis's
  output-buffer limit bounds that case). The subscription counts as
  ``connected`` (and ``/ready`` is 200) only once a probe has made the round
  trip.
- **Reconnect.** When a session ends for any link reason the trio side closes
  its clients, waits :func:`backoff_delay` (capped, jittered, exponential) and
  starts a new session with new clients. It never falls back to the
  in-process broker.
- **Gap notice.** When Redis confirms the ``PSUBSCRIBE`` of a session after an
  earlier session's subscription was lost, ``on_resync`` is told how long the
  hub was deaf (the app then offers every open connection a ``resync``
  message). The pump calls it synchronously as it reads the confirmation,
  before it can read any message of the new subscription: every message
  queued after the resync was published after the subscription was back.
- **Sentinel.** With a :class:`SentinelTarget` each session asks the Sentinels
  for the current master (``redis.asyncio.sentinel``); after a failover the
  old master's link fails (or its probes stop) and the next session finds the
  new master.
- **User mode.** Instead of the pattern, the session subscribes the
  channels the hub's :class:`~smapws._io.brokers.channels.UserChannels`
  asks for: a task next to the pump sends the batched (un)subscribe
  commands, the pump hands every confirmation back synchronously, and when
  the session ends its channels are handed back (the next session
  subscribes them again; each user's tabs get ``resync`` when theirs is
  confirmed). One class serves both modes: the read loop, the probes and
  the reconnect policy are the same.
- **Cluster.** With a :class:`ClusterTarget` a session connects to one node
  (a plain ``PUBLISH`` is relayed to every node) and learns the others
  (``CLUSTER SLOTS``); each new session tries the next node. Sharded pub/sub
  runs one of these per master (:mod:`~smapws._io.brokers.cluster`).
- **Deadlines.** Every bounded call across the bridge (connect + subscribe,
  probe publish, publish, close) runs under ``trio.fail_after`` /
  ``move_on_after``. The pump is the one unbounded call: it is a stream, and
  the probe watchdog next to it cancels it when the link goes quiet.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, NoReturn

import redis.asyncio as aioredis
import redis.exceptions
import trio
import trio_asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from trio_util import AsyncValue

from smapws._config import redact_url
from smapws._core.cluster import Address, SlotMap
from smapws._io.brokers import BrokerError, Item, QueueBytes
from smapws._io.brokers.channels import UserChannels
from smapws._log import fields, logger

try:  # redis-py internals, for the pump's fast path (see _fast_reader)
    from redis._parsers import hiredis as _redis_hiredis
except ImportError:  # pragma: no cover - another redis-py layout: no fast path
    _redis_hiredis = None  # type: ignore[assignment]
_HIREDIS_PARSER: type | None = getattr(_redis_hiredis, "_AsyncHiredisParser", None)
_NOT_ENOUGH_DATA: object | None = getattr(_redis_hiredis, "NOT_ENOUGH_DATA", None)

#: First reconnect delay ceiling; doubles per failed attempt up to
#: ``reconnect_max``. Small, so that a one-off drop (``CLIENT KILL``, a
#: proxy restart) costs ~0.1 s of deafness; repeated failures back off.
BACKOFF_BASE: Final = 0.1

#: A session that stayed up this long resets the backoff. A shorter one does
#: not: a link that connects and dies at once (Redis killing us for a full
#: output buffer, a flapping proxy) keeps backing off instead of reconnecting
#: ten times a second.
STABLE_AFTER: Final = 10.0

#: Channel namespace of the liveness probes; a node id is appended.
PROBE_CHANNEL_PREFIX: Final = "smapws:probe:"

#: The ``reason`` of the resync notice sent after a subscriber outage.
RESYNC_REASON: Final = "subscriber_reconnected"


class ProbeLost(Exception):
    """A liveness probe did not come back through the subscription within
    its deadline: the link is considered dead (it may be half-open)."""


class _SubscriptionEnded(Exception):
    """The pump returned: redis-py ended the subscription without an error."""


#: Errors that mean "the Redis link failed", as opposed to a bug of ours.
_LINK_ERRORS: Final = (
    redis.exceptions.RedisError,
    OSError,
    EOFError,
    trio.TooSlowError,
    ProbeLost,
    _SubscriptionEnded,
)


def backoff_delay(attempt: int, *, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): "equal jitter",
    half fixed and half random, of ``min(cap, BACKOFF_BASE * 2**attempt)``.

    Guarantees ``ceiling / 2 <= delay <= ceiling <= cap``: the fixed half
    rules out a busy loop (at most ``2 / cap`` attempts a second once
    capped); the random half spreads the reconnects of many pods after a
    shared Redis restart."""
    ceiling = min(cap, BACKOFF_BASE * (2 ** min(attempt, 30)))
    return float(ceiling / 2 + rng() * ceiling / 2)


@dataclass(frozen=True)
class SentinelTarget:
    """Find the master through Sentinel: ``sentinels`` are ``(host, port)``
    pairs, ``master`` the monitored name; ``password`` and ``db`` apply to the
    master (the Sentinels themselves are reached without a password)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    password: str | None = field(default=None, repr=False)
    db: int = 0

    @property
    def display(self) -> str:
        """``sentinel://host:port,.../master``: no secret, safe to log."""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
        return f"sentinel://{hosts}/{self.master}"


@dataclass(frozen=True)
class ClusterTarget:
    """A Redis Cluster, known by some of its nodes (``(host, port)`` seeds);
    ``password`` applies to every node."""

    nodes: tuple[Address, ...]
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        """``cluster://host:port,...``: no secret, safe to log."""
        return "cluster://" + ",".join(
            f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes
        )


Target = str | SentinelTarget | ClusterTarget


class Progress:
    """How many messages the pump has read; the pump counts, the prober
    compares (one integer increment per message)."""

    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages = 0


class ProbeTracker:
    """The trio side's view of the probes of one session.

    :meth:`seen` is called by the pump (asyncio side, same thread) with each
    message that arrives on the probe channel; the prober waits on
    :meth:`wait_answer`. Only the probe most recently sent counts: a late
    answer to an older one proves nothing about the link now."""

    def __init__(self, tag: str) -> None:
        self._tag = tag
        self._seq = 0
        self._expected: bytes | None = None
        self._answered = trio.Event()

    def next(self) -> bytes:
        """The payload of a new probe, which becomes the one awaited."""
        self._seq += 1
        self._expected = f"{self._tag}:{self._seq}".encode()
        self._answered = trio.Event()
        return self._expected

    def seen(self, data: bytes) -> None:
        """A message arrived on the probe channel."""
        if data == self._expected:
            self._answered.set()

    @property
    def answered(self) -> bool:
        return self._answered.is_set()

    async def wait_answer(self) -> None:
        """Until the probe last made by :meth:`next` has come back."""
        await self._answered.wait()


async def watch_probes(
    publish: Callable[[bytes], Awaitable[object]],
    tracker: ProbeTracker,
    *,
    interval: float,
    on_answer: Callable[[float], None],
    progress: Progress | None = None,
) -> NoReturn:
    """Prove a subscription alive, forever: every ``interval`` seconds
    ``publish`` a probe and wait for it to come back through the subscription.

    The rule: the link is dead when a probe has been outstanding for a whole
    ``interval`` during which nothing came through the subscription, neither
    the probe nor any message counted in ``progress``. While messages keep
    arriving (a backlog ahead of the probe, or a slow PUBLISH reply under
    load) the probe gets another interval; a publish cut short by its
    deadline is sent again with a new payload. ``on_answer(rtt)`` is called
    for each probe that came back.

    Raises :class:`ProbeLost` when the rule says so: a link that stops
    carrying bytes is given up between one and two intervals after it
    stopped. Errors of ``publish`` propagate. Time is read only through
    ``trio.current_time()``."""
    progress = progress or Progress()
    while True:
        sent_at = trio.current_time()
        deadline = sent_at + interval
        token = tracker.next()
        seen = progress.messages
        published = False
        while True:
            with trio.move_on_at(deadline):
                if not published:
                    await publish(token)
                    published = True
                await tracker.wait_answer()
            if tracker.answered:
                break
            if progress.messages == seen:
                what = "answered" if published else "published"
                raise ProbeLost(f"probe not {what} within {interval:g} s, and no message either")
            seen = progress.messages
            deadline += interval
            if not published:
                token = tracker.next()  # the cut-off publish may never have been sent
        on_answer(trio.current_time() - sent_at)
        await trio.sleep_until(sent_at + interval)


class RedisBroker:
    """Subscriber and publisher on one Redis (a URL, a master found through
    Sentinel, or any node of a cluster).

    In pattern mode (``channels`` is ``None``) a session ``PSUBSCRIBE``\\ s
    ``pattern``. In user mode the session subscribes what ``channels`` (the
    hub's :class:`UserChannels`) asks for, on link ``link``, restricted to the
    groups ``accept`` takes (a cluster node's slots); when it ends, those
    channels are handed back (:meth:`UserChannels.lost`). With a
    :class:`ClusterTarget` each session connects to the next node of the
    cluster in turn (``PUBLISH`` reaches every node of a cluster).

    ``status`` is ``connecting`` while a session is being set up and until
    its first probe has come back, ``connected`` from then on, ``down``
    between sessions (waiting out the backoff). Callbacks run on the trio
    thread and must not block or raise: ``on_reconnect()`` before each
    reconnect attempt, ``on_drop()`` per message dropped because the
    router's queue was full, ``on_resync(reason, down_s)`` (pattern mode)
    when Redis confirms a new subscription after one was lost ``down_s``
    seconds earlier (called from the pump, before any message of the new
    subscription is handed on).
    """

    backend = "redis"

    def __init__(
        self,
        target: Target,
        pattern: str,
        *,
        timeout: float,
        reconnect_max: float,
        probe_interval: float = 5.0,
        on_reconnect: Callable[[], None] = lambda: None,
        on_drop: Callable[[], None] = lambda: None,
        on_resync: Callable[[str, float], object] = lambda reason, down_s: None,
        on_error: Callable[[BaseException], object] = lambda exc: None,
        node_id: str | None = None,
        channels: UserChannels | None = None,
        link: Hashable = None,
        accept: Callable[[Hashable], bool] | None = None,
        max_message_bytes: int | None = None,
        on_too_large: Callable[[bytes, int], object] = lambda channel, size: None,
        on_disconnect: Callable[[str], object] = lambda cause: None,
        queued: QueueBytes | None = None,
    ) -> None:
        self._target = target
        self._max_bytes = max_message_bytes
        self._on_too_large = on_too_large
        self._on_disconnect = on_disconnect
        self._limits_checked = False
        self._queued = queued
        self._where = target if isinstance(target, str) else target.display
        self._where = redact_url(self._where)
        self._pattern = pattern
        self._timeout = timeout
        self._reconnect_max = reconnect_max
        self._probe_interval = probe_interval
        self._on_reconnect = on_reconnect
        self._on_drop = on_drop
        self._on_resync = on_resync
        self._on_error = on_error
        #: The hub's per-user subscriptions (user mode), or ``None``.
        self.channels = channels
        self._link = link
        self._accept = accept
        self.node_id = node_id or secrets.token_hex(6)
        self.probe_channel = (PROBE_CHANNEL_PREFIX + self.node_id).encode()
        #: ``status`` as an observable value: readiness waits on its changes.
        self.status_value: AsyncValue[str] = AsyncValue("connecting")
        self._reconnects = 0
        self._last_error: str | None = None
        self._connected_at: float | None = None
        self._subscribed_at: float | None = None
        self._lost_at: float | None = None
        #: When :meth:`run` began: the subscription is down since then until
        #: it is first subscribed (``down_for_s`` counts from here).
        self._started_at: float | None = None
        self._server: str | None = None
        self._probe_rtt: float | None = None
        #: Cluster nodes to try, in turn (a :class:`ClusterTarget` only).
        self._nodes: list[Address] = list(target.nodes) if isinstance(target, ClusterTarget) else []
        self._next_node = 0
        self._node: Address | None = None
        self._publisher = PublishClient(target, timeout=timeout)

    @property
    def status(self) -> str:
        return self._status

    @property
    def _status(self) -> str:
        return str(self.status_value.value)

    @_status.setter
    def _status(self, value: str) -> None:
        self.status_value.value = value

    def info(self) -> dict[str, Any]:
        """The ``subscriber`` object of ``/health``; never holds a password."""
        now = trio.current_time()
        up, lost = self._connected_at, self._lost_at
        if lost is None and self._subscribed_at is None:
            lost = self._started_at  # never subscribed yet: down since start
        channels = self.channels
        return {
            "backend": self.backend,
            "status": self._status,
            "url": self._where,
            "server": self._server,
            "mode": "pattern" if channels is None else "user",
            "pattern": self._pattern if channels is None else None,
            "subscribed_channels": None if channels is None else channels.subscribed,
            "reconnects": self._reconnects,
            "last_error": self._last_error,
            "connected_for_s": None if up is None else round(now - up, 3),
            "down_for_s": None if lost is None else round(now - lost, 3),
            "probe_interval_s": self._probe_interval,
            "probe_rtt_ms": None if self._probe_rtt is None else round(self._probe_rtt * 1e3, 3),
        }

    def _clients(self) -> _Clients:
        """New, unconnected clients for the configured target (no I/O); for a
        cluster, for its next node."""
        target = self._target
        if isinstance(target, ClusterTarget):
            host, port = self._node = self._nodes[self._next_node % len(self._nodes)]
            self._next_node += 1
            client = aioredis.Redis(
                host=host, port=port, password=target.password, **client_options(self._timeout)
            )
            return _Clients(client, None)
        return clients_for(target, self._timeout)

    async def run(
        self,
        sink: trio.MemorySendChannel[Item],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe and feed ``sink`` until cancelled, reconnecting forever.
        Reports started at once. Never raises but for cancellation: link
        errors are retried, and so is anything unexpected (a bug, or a reply
        no parser foresaw), after ``on_error(exc)`` (this loop is the
        broker's barrier)."""
        task_status.started()
        self._started_at = trio.current_time()
        attempt = 0
        while True:
            self._status = "connecting"
            clients = self._clients()
            cause = "internal"
            try:
                await self._session(clients, sink)
            except* _LINK_ERRORS as group:
                exc = _first(group)
                cause = disconnect_cause(exc)
                self._last_error = f"{type(exc).__name__}: {self._safe_error(exc)}"
            except* Exception as group:
                exc = _first(group)
                self._last_error = f"internal error: {type(exc).__name__}"
                self._on_error(group)
            finally:
                self._status = "down"
                self._server = None
                with trio.CancelScope(shield=True), trio.move_on_after(self._timeout):
                    await clients.aclose()
            now = trio.current_time()
            self._connected_at = None
            since, self._subscribed_at = self._subscribed_at, None
            if since is not None:  # messages may be missed from now on
                self._lost_at = now
                if now - since >= STABLE_AFTER:
                    attempt = 0
                self._dropped(cause)
            delay = backoff_delay(attempt, cap=self._reconnect_max)
            attempt += 1
            self._reconnects += 1
            self._on_reconnect()
            logger.warning(
                "Redis subscription down, reconnecting",
                extra=fields(url=self._where, error=self._last_error, retry_in_s=round(delay, 3)),
            )
            await trio.sleep(delay)

    def _dropped(self, cause: str) -> None:
        """A subscription that was up is lost: count and log it, with its
        cause (:func:`disconnect_cause`)."""
        self._on_disconnect(cause)
        hint = _DROP_HINTS.get(cause)
        logger.warning(
            "Redis subscription dropped",
            extra=fields(url=self._where, cause=cause, error=self._last_error, hint=hint),
        )

    async def _check_limits(self, client: aioredis.Redis) -> None:
        """Once per broker: read the server's ``client-output-buffer-limit``
        and ``proto-max-bulk-len`` (``CONFIG GET``, where allowed) and log one
        warning naming the fix when they let Redis drop this subscription
        (:func:`limit_problems`)."""
        if self._limits_checked or self._max_bytes is None:
            return
        self._limits_checked = True
        try:
            with trio.fail_after(self._timeout):
                got = await trio_asyncio.aio_as_trio(_config_get)(client)
            problems = limit_problems(got, self._max_bytes)
        except (redis.exceptions.RedisError, OSError, trio.TooSlowError, ValueError) as exc:
            # CONFIG refused (managed Redis, ACL), or a reply not understood.
            logger.info(
                "Redis limits not checked",
                extra=fields(url=self._where, error=type(exc).__name__),
            )
            return
        if problems:
            logger.warning(
                "Redis can drop this hub's subscription: " + "; ".join(problems),
                extra=fields(url=self._where, fix=RECOMMENDED_REDIS_CONFIG),
            )

    async def _session(self, clients: _Clients, sink: trio.MemorySendChannel[Item]) -> NoReturn:
        """One subscription, from connect to failure. Always raises."""
        channels = self.channels
        try:
            await self._subscribed_session(clients, sink)
        finally:
            if channels is not None:  # what this link carried waits for the next
                channels.lost(self._link)

    async def _subscribed_session(
        self, clients: _Clients, sink: trio.MemorySendChannel[Item]
    ) -> NoReturn:
        client = clients.client
        assert isinstance(client, aioredis.Redis), "a session talks to one node"
        pubsub = client.pubsub()
        clients.pubsub = pubsub
        tracker = ProbeTracker(secrets.token_hex(4))
        progress = Progress()
        subscribed = trio.Event()
        probe = self.probe_channel
        pattern = self._pattern.encode()
        channels = self.channels
        link = self._link

        def on_control(kind: str, channel: bytes) -> None:
            if channel == probe:
                if kind == "subscribe":
                    if channels is not None:
                        self._session_subscribed()
                    subscribed.set()
            elif channels is not None:
                channels.confirmed(kind, channel, link)
            elif kind == "psubscribe" and channel == pattern:
                self._pattern_subscribed()

        with trio.fail_after(self._timeout):
            await trio_asyncio.aio_as_trio(_subscribe)(
                pubsub, None if channels is not None else self._pattern, probe
            )
        self._server = _address(pubsub)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, pubsub, sink, progress, tracker.seen, on_control)
            # The probe channel is subscribed after the pattern on the same
            # connection, so its confirmation proves both are in place.
            with trio.fail_after(self._timeout):
                await subscribed.wait()
            if isinstance(self._target, ClusterTarget):
                await self._learn_nodes(client)
            await self._check_limits(client)
            if channels is not None:
                nursery.start_soon(
                    partial(
                        channels.send_commands,
                        partial(trio_asyncio.aio_as_trio(_send), pubsub),
                        where=link,
                        accept=self._accept,
                        send_timeout=self._timeout,
                    )
                )
            publish = partial(trio_asyncio.aio_as_trio(client.publish), probe)
            await watch_probes(
                publish,
                tracker,
                interval=self._probe_interval,
                on_answer=self._probe_answered,
                progress=progress,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _learn_nodes(self, client: aioredis.Redis) -> None:
        """Remember every node of the cluster (the seeds may be gone when
        this session ends): the current one first, the next attempt goes to
        another."""
        current = self._node
        assert current is not None
        with trio.fail_after(self._timeout):
            slots = await fetch_slots(client, current)
        self._nodes = list(dict.fromkeys([current, *slots.nodes, *self._nodes]))
        self._next_node = 1

    async def _pump(
        self,
        pubsub: aioredis.client.PubSub,
        sink: trio.MemorySendChannel[Item],
        progress: Progress,
        on_probe: Callable[[bytes], None],
        on_control: Callable[[str, bytes], None],
    ) -> NoReturn:
        await trio_asyncio.aio_as_trio(_pump)(
            pubsub,
            sink,
            self._on_drop,
            progress,
            self.probe_channel,
            on_probe,
            on_control,
            self._max_bytes,
            self._on_too_large,
            self._queued,
        )
        raise _SubscriptionEnded("subscription ended")

    def _pattern_subscribed(self) -> None:
        """Redis confirmed the users' pattern: messages flow from here on."""
        now = self._subscribed_at = trio.current_time()
        lost, self._lost_at = self._lost_at, None
        if lost is not None:
            self._on_resync(RESYNC_REASON, now - lost)

    def _session_subscribed(self) -> None:
        """User mode: the session's connection is subscribed (its probe
        channel). Each user's gap is told when their channel is back."""
        self._subscribed_at = trio.current_time()
        self._lost_at = None

    def _probe_answered(self, rtt: float) -> None:
        self._probe_rtt = rtt
        if self._status == "connected":
            return
        now = trio.current_time()
        self._status = "connected"
        self._connected_at = now
        self._last_error = None
        logger.info(
            "Redis subscribed",
            extra=fields(
                url=self._where,
                server=self._server,
                pattern=self._pattern if self.channels is None else None,
                mode="pattern" if self.channels is None else "user",
                probe_rtt_ms=round(rtt * 1e3, 3),
            ),
        )

    def _safe_error(self, exc: BaseException) -> str:
        return safe_error(self._target, exc)

    async def publish(self, channel: bytes, data: bytes) -> int:
        """PUBLISH through a long-lived client (see :class:`PublishClient`)."""
        return await self._publisher.publish(channel, data)

    async def aclose(self) -> None:
        """Close the publishing client (the subscriber closes its own)."""
        await self._publisher.aclose()


#: How many messages of ``SMAPWS_MAX_MESSAGE_BYTES`` Redis must be able to
#: hold for this hub while it is briefly not reading (a GC pause, a busy
#: core, a burst of publishes in one event-loop turn) without dropping it:
#: a thousand 64 KiB messages is 64 MiB.
BURST_MESSAGES: Final = 1000

#: The settings the README recommends, named in the start-up warning.
RECOMMENDED_REDIS_CONFIG: Final = (
    "CONFIG SET client-output-buffer-limit 'pubsub 256mb 128mb 60' "
    "and CONFIG SET proto-max-bulk-len 1mb (or in redis.conf)"
)

#: What a dropped subscription's log record suggests, by cause.
_DROP_HINTS: Final = {
    "closed_by_server": (
        "Redis closed the link: a pub/sub client past client-output-buffer-limit "
        "is closed so (see the README's Redis section)"
    ),
}


def disconnect_cause(exc: BaseException) -> str:
    """The ``cause`` label of ``websocket_broker_disconnects_total`` for the
    exception that ended a session: ``probe_lost`` (the link went silent),
    ``closed_by_server`` (Redis closed it: ``CLIENT KILL``, a restart, or
    its output-buffer limit), ``timeout``, ``error_reply`` or ``link_error``."""
    if isinstance(exc, ProbeLost):
        return "probe_lost"
    if isinstance(exc, trio.TooSlowError | redis.exceptions.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, _SubscriptionEnded):
        return "closed_by_server"
    if isinstance(exc, redis.exceptions.ConnectionError) and "closed by server" in str(exc):
        return "closed_by_server"
    if isinstance(exc, redis.exceptions.ResponseError):
        return "error_reply"
    return "link_error"


def _size(text: str) -> int:
    """Redis's size notation (``32mb``, ``8388608``, ``1gb``) in bytes."""
    text = text.strip().lower()
    for suffix, factor in (("gb", 1 << 30), ("mb", 1 << 20), ("kb", 1 << 10), ("b", 1)):
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def limit_problems(config: dict[str, str], max_message_bytes: int) -> list[str]:
    """What in a Redis server's ``config`` (``CONFIG GET`` replies:
    ``client-output-buffer-limit``, ``proto-max-bulk-len``) lets it drop a
    subscriber that accepts messages of ``max_message_bytes``: a pubsub
    limit (hard, or soft) under :data:`BURST_MESSAGES` such messages, or a
    ``proto-max-bulk-len`` that lets one publish pass the hard limit. Empty
    when nothing does (a 0 limit is none)."""
    problems: list[str] = []
    words = config.get("client-output-buffer-limit", "").split()
    hard = soft = 0
    for i, word in enumerate(words[:-3]):
        if word == "pubsub":
            hard, soft = _size(words[i + 1]), _size(words[i + 2])
    burst = BURST_MESSAGES * max_message_bytes
    for name, limit in (("hard", hard), ("soft", soft)):
        if 0 < limit < burst:
            problems.append(
                f"client-output-buffer-limit pubsub {name} limit {limit} bytes is under "
                f"{BURST_MESSAGES} messages of SMAPWS_MAX_MESSAGE_BYTES ({burst} bytes)"
            )
    bulk = config.get("proto-max-bulk-len")
    if bulk is not None and hard and _size(bulk) >= hard:
        problems.append(
            f"proto-max-bulk-len {_size(bulk)} lets one PUBLISH pass the pubsub hard "
            f"limit ({hard} bytes) and drop every subscriber"
        )
    return problems


def safe_error(target: Target, exc: BaseException) -> str:
    """The text of ``exc`` with any password of ``target`` removed, should
    redis-py or the OS ever quote it; at most 200 characters."""
    text = str(exc)
    if isinstance(target, str):
        text = text.replace(target, redact_url(target))
    elif target.password:
        text = text.replace(target.password, "***")
    return text[:200]


def client_options(timeout: float) -> dict[str, Any]:
    """What every client of the hub is made with: no retries inside redis-py
    (the reconnect policy is ours alone), raw bytes, and RESP2: with RESP3
    (redis-py's default since 8.0) every pub/sub message goes through its
    push-notification handler, which formats the whole message for a debug
    log line whether or not anyone logs: 15% of the hub's CPU at 24,000
    deliveries/s."""
    return {
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
        "protocol": 2,
    }


def clients_for(target: str | SentinelTarget, timeout: float) -> _Clients:
    """New, unconnected clients for a URL or a Sentinel-found master."""
    common = client_options(timeout)
    if isinstance(target, str):
        return _Clients(aioredis.Redis.from_url(target, **common), None)
    # Asking every Sentinel in turn must fit the connect deadline.
    per_sentinel = timeout / max(1, len(target.sentinels))
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": per_sentinel,
            "socket_connect_timeout": per_sentinel,
            "retry": Retry(NoBackoff(), 0),
        },
    )
    client = sentinel.master_for(target.master, password=target.password, db=target.db, **common)
    return _Clients(client, sentinel)


async def fetch_slots(client: aioredis.Redis, asked: Address) -> SlotMap:
    """``CLUSTER SLOTS`` through ``client`` (trio side; the caller bounds it)."""
    reply = await trio_asyncio.aio_as_trio(client.execute_command)("CLUSTER SLOTS")
    return SlotMap.parse(reply, asked)


class PublishClient:
    """The hub's publishing client: ``PUBLISH`` (or ``SPUBLISH`` with
    ``sharded``) through one long-lived client, under ``timeout``. For a
    cluster, redis-py's cluster client, which sends ``SPUBLISH`` to the
    node owning the channel's slot and follows its redirections."""

    def __init__(
        self,
        target: Target,
        *,
        timeout: float,
        sharded: bool = False,
    ) -> None:
        self._target = target
        self._timeout = timeout
        self._command = "spublish" if sharded else "publish"
        self._clients: _Clients | None = None

    def _new(self) -> _Clients:
        target = self._target
        if not isinstance(target, ClusterTarget):
            return clients_for(target, self._timeout)
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            password=target.password,
            socket_timeout=self._timeout,
            **client_options(self._timeout),
        )
        return _Clients(client, None)

    async def publish(self, channel: bytes, data: bytes) -> int:
        """Publish; return the receivers Redis reports. Raises
        :class:`BrokerError` (no credentials in it) when Redis fails; the
        client is then replaced, so the next call reconnects (with Sentinel,
        finds the current master; with a cluster, its current topology)."""
        n = await self._call(
            "publish", lambda client: getattr(client, self._command)(channel, data)
        )
        return int(n)

    async def pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one pipeline (no transaction; a cluster's is
        split by node) and return each reply, or the error Redis answered
        it with as an exception object. Raises :class:`BrokerError` as
        :meth:`publish` does when the link fails."""
        return list(await self._call("command", lambda client: _pipeline(client, commands)))

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        clients = self._clients
        if clients is None:
            clients = self._clients = self._new()
        try:
            with trio.fail_after(self._timeout):
                return await trio_asyncio.aio_as_trio(fn)(clients.client)
        except (*_LINK_ERRORS, redis.exceptions.RedisClusterException) as exc:
            if self._clients is clients:
                self._clients = None
                with trio.CancelScope(shield=True), trio.move_on_after(self._timeout):
                    await clients.aclose()
            raise BrokerError(f"Redis {what} failed: {type(exc).__name__}") from None

    async def aclose(self) -> None:
        if self._clients is not None:
            clients, self._clients = self._clients, None
            with trio.CancelScope(shield=True), trio.move_on_after(self._timeout):
                await clients.aclose()


class _Clients:
    """What one session (or the publisher) owns: a client, perhaps its
    subscription, perhaps the Sentinel client that found its master."""

    def __init__(self, client: aioredis.Redis | RedisCluster, sentinel: Sentinel | None) -> None:
        self.client = client
        self.sentinel = sentinel
        self.pubsub: aioredis.client.PubSub | None = None

    async def aclose(self) -> None:
        """Close everything, ignoring link errors (the link may be what
        failed). Callers bound it with a deadline."""
        await trio_asyncio.aio_as_trio(_close)(self.pubsub, self.client, self.sentinel)


def _first(group: BaseExceptionGroup[Exception]) -> Exception:
    """The first leaf exception of a (possibly nested) group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, Exception)
    return exc


def _address(pubsub: aioredis.client.PubSub) -> str | None:
    """``host:port`` (or the socket path) the subscription is connected to."""
    conn = pubsub.connection
    if conn is None:
        return None
    host, port = getattr(conn, "host", None), getattr(conn, "port", None)
    if host is not None:
        return f"{host}:{port}"
    path = getattr(conn, "path", None)
    return str(path) if path else None


# -- asyncio side ---------------------------------------------------------


async def _pipeline(
    client: aioredis.Redis | RedisCluster, commands: Sequence[tuple[Any, ...]]
) -> Any:
    pipe = client.pipeline() if isinstance(client, RedisCluster) else client.pipeline(False)
    for command in commands:
        pipe.execute_command(*command)
    return await pipe.execute(raise_on_error=False)


async def _subscribe(pubsub: aioredis.client.PubSub, pattern: str | None, probe: bytes) -> None:
    """Connect, PSUBSCRIBE the users' pattern (pattern mode), then SUBSCRIBE
    the probe channel (in this order: the probe's confirmation proves both)."""
    if pattern is not None:
        await pubsub.psubscribe(pattern)
    await pubsub.subscribe(probe)


async def _config_get(client: aioredis.Redis) -> dict[str, str]:
    """``CONFIG GET`` of the two settings :func:`limit_problems` reads."""
    out: dict[str, str] = {}
    for name in ("client-output-buffer-limit", "proto-max-bulk-len"):
        reply = await client.config_get(name)
        for key, value in reply.items():
            k = key.decode() if isinstance(key, bytes) else str(key)
            out[k] = value.decode() if isinstance(value, bytes) else str(value)
    return out


async def _send(
    pubsub: aioredis.client.PubSub, commands: list[tuple[str, tuple[bytes, ...]]]
) -> None:
    """Send (un)subscribe commands one after the other without waiting for
    their confirmations (the read loop gets those): one round trip for all."""
    for command, channels in commands:
        await getattr(pubsub, command)(*channels)


async def _close(
    pubsub: aioredis.client.PubSub | None, client: aioredis.Redis, sentinel: Sentinel | None
) -> None:
    try:
        try:
            if pubsub is not None:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        finally:
            try:
                await client.aclose()
            finally:
                if sentinel is not None:
                    await sentinel.aclose()
    except (redis.exceptions.RedisError, OSError):
        pass


def _fast_reader(
    pubsub: aioredis.client.PubSub,
) -> tuple[Callable[[], Any], Callable[[], Awaitable[object]]] | None:
    """``(gets, read_more)`` of the hiredis reader behind ``pubsub``'s
    connection when it has one and speaks RESP2, else None (then every reply
    goes through ``get_message``).

    Each reply that redis-py hands over costs eight coroutine layers (retry,
    timeout, push handling, a dict): at 12,000 messages/s that was most of
    the pump's time. With the fast reader the pump takes each reply from the
    reader's buffer itself (``gets()``, one C call), and when the buffer is
    empty waits for the next socket read (``read_more()``, the parser's own
    read: it feeds the reader, and raises ``ConnectionError`` at EOF). Every
    reply that is not a ``pmessage`` still goes through redis-py's
    ``PubSub.handle_message``, so its subscription state stays right."""
    if _HIREDIS_PARSER is None or _NOT_ENOUGH_DATA is None:
        return None
    conn = pubsub.connection
    parser = getattr(conn, "_parser", None)
    if conn is None or conn.protocol != 2 or not isinstance(parser, _HIREDIS_PARSER):
        return None
    gets = getattr(getattr(parser, "_reader", None), "gets", None)
    read_more = getattr(parser, "read_from_socket", None)
    if not callable(gets) or not callable(read_more):
        return None
    return gets, read_more


async def _pump(
    pubsub: aioredis.client.PubSub,
    sink: trio.MemorySendChannel[Item],
    on_drop: Callable[[], None],
    progress: Progress,
    probe: bytes,
    on_probe: Callable[[bytes], None],
    on_control: Callable[[str, bytes], None],
    max_bytes: int | None = None,
    on_too_large: Callable[[bytes, int], object] = lambda channel, size: None,
    queued: QueueBytes | None = None,
) -> None:
    """asyncio side: read the subscription and hand messages to trio without
    waiting, counting them in ``progress``: ``pmessage`` (pattern mode),
    ``message`` and ``smessage`` (user mode, sharded or not). Messages on
    the probe channel go to ``on_probe(data)`` (never to users);
    (un)subscribe confirmations to ``on_control(kind, channel)``,
    synchronously, so that whatever it does happens before the next message
    is read (a user mode hub registers a tab's subscription there: messages
    read after it are that tab's). A message over ``max_bytes`` goes to
    ``on_too_large(channel, size)`` instead, unparsed and without taking a
    place in the router's queue; one that ``queued`` (the queue's bytes)
    refuses goes to ``on_drop()``, like one the full queue refuses. Returns
    or raises when the connection fails."""
    get = pubsub.get_message
    handle = pubsub.handle_message
    send = sink.send_nowait
    limit = (1 << 62) if max_bytes is None else max_bytes
    take = (lambda n: True) if queued is None else queued.take

    def on_message(msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind in _DATA_KINDS:
            data_message(msg["channel"], msg["data"])
        else:
            on_control(kind, msg["channel"])

    def data_message(channel: bytes, data: bytes) -> None:
        progress.messages += 1
        if channel == probe:
            on_probe(data)
            return
        size = len(data)
        if size > limit:
            on_too_large(channel, size)
            return
        if not take(size):
            on_drop()
            return
        try:
            send((channel, data))
        except trio.WouldBlock:
            on_drop()
            if queued is not None:
                queued.give(size)

    fast = _fast_reader(pubsub)
    if fast is None:
        while True:
            msg = await get(timeout=None)
            if msg is not None:
                on_message(msg)
    gets, read_more = fast
    while True:
        reply = gets()
        if reply is _NOT_ENOUGH_DATA:
            await read_more()
            continue
        if type(reply) is list:
            # Data replies skip redis-py's dict-building handler: ``pmessage``
            # is [kind, pattern, channel, data], ``message``/``smessage``
            # [kind, channel, data]. Confirmations go through it (it keeps
            # the subscription state redis-py needs to resubscribe).
            n = len(reply)
            if n == 4 and reply[0] == b"pmessage":
                data_message(reply[2], reply[3])
                continue
            if n == 3 and reply[0] in _DATA_KINDS_RAW:
                data_message(reply[1], reply[2])
                continue
        elif isinstance(reply, Exception):  # an error reply: the link is unusable
            raise reply
        msg = await handle(reply)  # type: ignore[no-untyped-call]
        if msg is not None:
            on_message(msg)


#: The message kinds that carry data (the rest are confirmations).
_DATA_KINDS: Final = frozenset({"pmessage", "message", "smessage"})
_DATA_KINDS_RAW: Final = frozenset({b"message", b"smessage"})
