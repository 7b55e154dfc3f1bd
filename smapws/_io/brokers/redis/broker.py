"""The Redis subscriber: one role (:mod:`.roles`) run through trio-asyncio,
proven alive by probes (:mod:`.probes`), reconnecting with capped backoff.

Shape of one subscription ("session")::

    run (trio, the broker task)                 reconnect loop, backoff, status
    └── session nursery
        ├── pump (asyncio side, via bridged) reads messages -> send_nowait
        ├── the role's command sender (user mode)
        └── watch_probes (trio)                 PUBLISH a probe every interval,
                                                raise ProbeLost when one is late

- **Read loop.** :func:`~.pump.pump`, on the asyncio side of the bridge.
- **Liveness.** :mod:`.probes`. The subscription counts as ``connected`` (and
  ``/ready`` is 200) only once a probe has made the round trip.
- **Reconnect.** When a session ends for any link reason the trio side closes
  its clients, waits :func:`backoff_delay` (capped, jittered, exponential) and
  starts a new session with new clients. It never falls back to the
  in-process broker.
- **Gap notice.** Told by the role when Redis confirms the new subscription
  (:class:`~.roles.PatternSubscription`: one for every connection;
  :class:`~.roles.UserSubscriptions`: per user, by the channels' bookkeeping).
- **Sentinel.** With a :class:`~.targets.SentinelTarget` each session asks
  the Sentinels for the current master (``redis.asyncio.sentinel``); after a
  failover the old master's link fails (or its probes stop) and the next
  session finds the new master.
- **Cluster.** With a :class:`~.targets.ClusterTarget` a session connects to
  one node (a plain ``PUBLISH`` is relayed to every node) and learns the
  others (:class:`~.client.ClusterEndpoint`); each new session tries the next
  node. Sharded pub/sub runs one of these per master
  (:mod:`~smapws._io.brokers.cluster`).
- **Deadlines.** Every bounded call across the bridge (connect + subscribe,
  probe publish, publish, close) runs under ``trio.fail_after`` /
  ``move_on_after``. The pump is the one unbounded call: it is a stream, and
  the probe watchdog next to it cancels it when the link goes quiet.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from functools import partial
from typing import Any, Final, NoReturn

import redis.asyncio as aioredis
import redis.exceptions
import trio
from trio_util import AsyncValue

from smapws._errors import SmapwsError
from smapws._io.brokers import Item, QueueBytes
from smapws._io.brokers.channels import UserChannels
from smapws._io.brokers.redis.client import (
    LINK_ERRORS,
    Clients,
    PublishClient,
    address,
    bridged,
    endpoint_for,
    send_batch,
    subscribe,
)
from smapws._io.brokers.redis.limits import RECOMMENDED_REDIS_CONFIG, config_get, limit_problems
from smapws._io.brokers.redis.probes import (
    PROBE_CHANNEL_PREFIX,
    ProbeLost,
    ProbeTracker,
    Progress,
    watch_probes,
)
from smapws._io.brokers.redis.pump import pump
from smapws._io.brokers.redis.roles import Role
from smapws._io.brokers.redis.targets import Target, describe, safe_error
from smapws._log import fields, logger

#: First reconnect delay ceiling; doubles per failed attempt up to
#: ``reconnect_max``. Small, so that a one-off drop (``CLIENT KILL``, a
#: proxy restart) costs ~0.1 s of deafness; repeated failures back off.
BACKOFF_BASE: Final = 0.1

#: A session that stayed up this long resets the backoff. A shorter one does
#: not: a link that connects and dies at once (Redis killing us for a full
#: output buffer, a flapping proxy) keeps backing off instead of reconnecting
#: ten times a second.
STABLE_AFTER: Final = 10.0


class _SubscriptionEnded(SmapwsError):
    """The pump returned: redis-py ended the subscription without an error
    (raised and classified in this module only)."""


#: What ends a session for a link reason (retried quietly), as opposed to a
#: bug of ours (retried after ``on_error``).
_SESSION_ERRORS: Final = (*LINK_ERRORS, ProbeLost, _SubscriptionEnded)


def backoff_delay(attempt: int, *, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): "equal jitter",
    half fixed and half random, of ``min(cap, BACKOFF_BASE * 2**attempt)``.

    Guarantees ``ceiling / 2 <= delay <= ceiling <= cap``: the fixed half
    rules out a busy loop (at most ``2 / cap`` attempts a second once
    capped); the random half spreads the reconnects of many pods after a
    shared Redis restart."""
    ceiling = min(cap, BACKOFF_BASE * (2 ** min(attempt, 30)))
    return float(ceiling / 2 + rng() * ceiling / 2)


class RedisBroker:
    """Subscriber and publisher on one Redis (a URL, a master found through
    Sentinel, or any node of a cluster), in one ``role``
    (:mod:`~smapws._io.brokers.redis.roles`)."""

    backend = "redis"

    def __init__(
        self,
        target: Target,
        role: Role,
        *,
        timeout: float,
        reconnect_max: float,
        probe_interval: float = 5.0,
        on_reconnect: Callable[[], None] = lambda: None,
        on_drop: Callable[[], None] = lambda: None,
        on_error: Callable[[BaseException], object] = lambda exc: None,
        node_id: str | None = None,
        max_message_bytes: int | None = None,
        on_too_large: Callable[[bytes, int], object] = lambda channel, size: None,
        on_disconnect: Callable[[str], object] = lambda cause: None,
        queued: QueueBytes | None = None,
    ) -> None:
        self._target = target
        self._role = role
        self._endpoint = endpoint_for(target, timeout)
        self._max_bytes = max_message_bytes
        self._on_too_large = on_too_large
        self._on_disconnect = on_disconnect
        self._limits_checked = False
        self._queued = queued
        self._where = describe(target)
        self._timeout = timeout
        self._reconnect_max = reconnect_max
        self._probe_interval = probe_interval
        self._on_reconnect = on_reconnect
        self._on_drop = on_drop
        self._on_error = on_error
        #: The hub's per-user subscriptions (user mode), or ``None``.
        self.channels: UserChannels | None = role.channels
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
            "mode": self._role.mode,
            "pattern": self._role.pattern,
            "subscribed_channels": None if channels is None else channels.subscribed,
            "reconnects": self._reconnects,
            "last_error": self._last_error,
            "connected_for_s": None if up is None else round(now - up, 3),
            "down_for_s": None if lost is None else round(now - lost, 3),
            "probe_interval_s": self._probe_interval,
            "probe_rtt_ms": None if self._probe_rtt is None else round(self._probe_rtt * 1e3, 3),
        }

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
            clients = self._endpoint.clients()
            cause = "internal"
            try:
                await self._session(clients, sink)
            except* _SESSION_ERRORS as group:
                exc = _first(group)
                cause = disconnect_cause(exc)
                self._last_error = f"{type(exc).__name__}: {safe_error(self._target, exc)}"
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
                got = await bridged(config_get)(client)
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

    async def _session(self, clients: Clients, sink: trio.MemorySendChannel[Item]) -> NoReturn:
        """One subscription, from connect to failure. Always raises."""
        try:
            await self._subscribed_session(clients, sink)
        finally:
            self._role.ended()

    async def _subscribed_session(
        self, clients: Clients, sink: trio.MemorySendChannel[Item]
    ) -> NoReturn:
        client = clients.client
        assert isinstance(client, aioredis.Redis), "a session talks to one node"
        pubsub = client.pubsub()
        clients.pubsub = pubsub
        tracker = ProbeTracker(secrets.token_hex(4))
        progress = Progress()
        subscribed = trio.Event()
        probe = self.probe_channel
        role = self._role
        mark = self._subscribed

        def on_control(kind: str, channel: bytes) -> None:
            if channel == probe:
                if kind == "subscribe":
                    role.probe_subscribed(mark)
                    subscribed.set()
            else:
                role.confirmed(kind, channel, mark)

        with trio.fail_after(self._timeout):
            await bridged(subscribe)(pubsub, role.pattern, probe)
        self._server = address(pubsub)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, pubsub, sink, progress, tracker.seen, on_control)
            # The probe channel is subscribed after the pattern on the same
            # connection, so its confirmation proves both are in place.
            with trio.fail_after(self._timeout):
                await subscribed.wait()
            await self._endpoint.learn(client)
            await self._check_limits(client)
            role.start(nursery, partial(bridged(send_batch), pubsub), self._timeout)
            publish = partial(bridged(client.publish), probe)
            await watch_probes(
                publish,
                tracker,
                interval=self._probe_interval,
                on_answer=self._probe_answered,
                progress=progress,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _pump(
        self,
        pubsub: aioredis.client.PubSub,
        sink: trio.MemorySendChannel[Item],
        progress: Progress,
        on_probe: Callable[[bytes], None],
        on_control: Callable[[str, bytes], None],
    ) -> NoReturn:
        await bridged(pump)(
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

    def _subscribed(self) -> float | None:
        """The role's ``mark``: messages flow from here on. Returns how long
        the hub was deaf, when an earlier subscription was lost."""
        now = self._subscribed_at = trio.current_time()
        lost, self._lost_at = self._lost_at, None
        return None if lost is None else now - lost

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
                pattern=self._role.pattern,
                mode=self._role.mode,
                probe_rtt_ms=round(rtt * 1e3, 3),
            ),
        )

    async def publish(self, channel: bytes, data: bytes) -> int:
        """PUBLISH through a long-lived client (see :class:`PublishClient`)."""
        return await self._publisher.publish(channel, data)

    async def aclose(self) -> None:
        """Close the publishing client (the subscriber closes its own)."""
        await self._publisher.aclose()


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


def _first(group: BaseExceptionGroup[Exception]) -> Exception:
    """The first leaf exception of a (possibly nested) group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, Exception)
    return exc
