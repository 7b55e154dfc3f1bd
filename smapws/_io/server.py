"""``serve()``: the hub's root nursery.

::

    serve (root nursery)
    ├── signal watcher     SIGTERM/SIGINT -> drain, then cancel   (handle_signals=True)
    ├── broker subscriber  Redis PSUBSCRIBE via trio-asyncio, or the in-process broker
    ├── router             broker queue -> App.route -> connection outboxes
    ├── systemd notify     READY/STATUS/WATCHDOG on $NOTIFY_SOCKET (``smapws serve``)
    └── listeners          front door; each TCP connection's task in `connections`
        │                  (with SMAPWS_INTERNAL_PORT a second listener, same nursery)
        └── per connection: writer (its own task), reader, heartbeat

Shutdown (:meth:`Server.drain`): ``/ready`` turns 503 and new upgrades get 503
at once, every open connection is asked to close with 1001, and ``serve``
returns when the last one has gone or ``SMAPWS_DRAIN_TIMEOUT`` has passed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, Final

import trio
from redis.crc import key_slot

from smapws._config import Config
from smapws._errors import SmapwsError
from smapws._io import frontdoor, sdnotify, signals
from smapws._io.app import App, Membership
from smapws._io.brokers import Broker, Item, QueueBytes
from smapws._io.brokers.channels import UserChannels
from smapws._io.brokers.cluster import ShardedBroker
from smapws._io.brokers.memory import MemoryBroker
from smapws._io.brokers.redis import (
    RESYNC_REASON,
    ClusterTarget,
    PatternSubscription,
    PublishClient,
    RedisBroker,
    Role,
    SentinelTarget,
    Target,
    UserSubscriptions,
)
from smapws._io.fleetlog import FleetLog
from smapws._log import RateLimitedLog, fields, logger
from smapws.metrics import Metrics

#: Listen backlog: a reconnect storm of thousands of tabs arrives within a
#: second or two; the kernel caps this at net.core.somaxconn anyway.
BACKLOG: Final = 4096
#: What stopping may take beyond ``SMAPWS_DRAIN_TIMEOUT`` and
#: ``SMAPWS_WRITE_WAIT`` (the last close handshakes): the fleet log's last
#: appends, closing the broker and exiting. systemd is told the total with
#: STOPPING=1 (:func:`stop_budget`).
STOP_MARGIN_S: Final = 5.0
#: Seconds a drained hub waits at most for the fleet log to answer the
#: appends it still holds (within :data:`STOP_MARGIN_S`).
FLEET_FLUSH_S: Final = 1.0


#: Draining closes at least this many connections per second, and wakes
#: this often to close the next batch.
MIN_DRAIN_RATE: Final = 100.0
DRAIN_TICK: Final = 0.05


#: accept() errors that mean "no resources now" (trio's list): the listener
#: logs one line (at most every ACCEPT_ERROR_LOG_INTERVAL), counts, pauses
#: ACCEPT_PAUSE and tries again; the pending connections wait in the backlog.
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE: Final = 0.1
#: accept() errors for a connection that failed between its handshake and
#: accept() (trio's SocketListener skips the same list): the next one.
ACCEPT_RETRY_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
        "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR",
        "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
)  # fmt: skip
#: Sockets accepted in a row before the listener lets other tasks run: a
#: storm's backlog is taken a burst at a time, the router's work in between.
ACCEPT_BURST: Final = 16
ACCEPT_ERROR_LOG_INTERVAL: Final = 10.0


class ListenError(SmapwsError):
    """The hub cannot listen: the message names the address and the reason,
    in one line."""


def stop_budget(config: Config) -> float:
    """Seconds from the start of a drain to the process's exit, at most:
    what ``TimeoutStopSec=`` and ``terminationGracePeriodSeconds`` must exceed."""
    return config.drain_timeout + config.write_wait + STOP_MARGIN_S


class Server:
    """A running hub, as ``nursery.start(serve, config)`` returns it."""

    def __init__(
        self,
        app: App,
        port: int,
        cancel_scope: trio.CancelScope,
        *,
        internal_port: int | None = None,
    ) -> None:
        self.app = app
        self.port = port
        #: The bound ``SMAPWS_INTERNAL_PORT``, or ``None`` (all on ``port``).
        self.internal_port = internal_port
        self._cancel_scope = cancel_scope
        self._drain_started = trio.Event()
        #: systemd's notify socket (disabled unless ``serve`` talks to systemd).
        self.notifier = sdnotify.Notifier(None)

    @property
    def metrics(self) -> Metrics:
        return self.app.metrics

    def drain(self) -> None:
        """Start draining, at once: ``/ready`` answers 503 and new upgrades
        get 503; open connections are then closed with 1001, spread over the
        drain window (see :meth:`_close_spread`). ``serve`` returns when the
        last one has gone or ``SMAPWS_DRAIN_TIMEOUT`` has passed. Idempotent."""
        app = self.app
        if not app.start_drain():
            return
        n = app.hub.active_connections
        logger.info("draining", extra=fields(connections=n, timeout_s=app.config.drain_timeout))
        self.notifier.stopping(
            f"draining {n} connections", extend_timeout_s=stop_budget(app.config)
        )
        self._drain_started.set()

    def stop(self) -> None:
        """Stop at once: cancel every task; open connections are dropped."""
        self._cancel_scope.cancel()

    async def _drain_when_asked(self) -> None:
        await self._drain_started.wait()
        app = self.app
        with trio.move_on_after(app.config.drain_timeout):
            await self._close_spread()
            await app.wait_empty()
        if app.fleet is not None:
            # What the hub routed last goes to the fleet's log, not away.
            with trio.move_on_after(min(FLEET_FLUSH_S, app.config.redis_timeout)):
                await app.fleet.flush()
        logger.info("drained", extra=fields(remaining=app.hub.active_connections))
        self._cancel_scope.cancel()

    async def _close_spread(self) -> None:
        """Ask every open connection to close with 1001, spread evenly over
        ``SMAPWS_DRAIN_TIMEOUT - SMAPWS_WRITE_WAIT - 1`` s so that the clients'
        reconnects do not stampede the other nodes, but never slower than
        :data:`MIN_DRAIN_RATE` per second (a few tabs close at once). The
        remaining time is left for the last close handshakes."""
        cfg = self.app.config
        conns = list(self.app.hub.all_connections())
        n = len(conns)
        window = cfg.drain_timeout - cfg.write_wait - 1.0
        rate = max(n / window, MIN_DRAIN_RATE) if window > 0 else None
        start = trio.current_time()
        closed = 0
        while True:
            elapsed = trio.current_time() - start
            due = n if rate is None else min(n, int(elapsed * rate) + 1)
            for conn in conns[closed:due]:
                try:
                    conn.go_away()
                except Exception as exc:  # a barrier: this connection alone
                    self.app.internal_error("drain", exc, user=conn.user_id)
                    conn.fail()
            closed = max(closed, due)
            if closed >= n:
                return
            await trio.sleep(DRAIN_TICK)


def redis_target(config: Config) -> Target:
    """Where the configuration's Redis is: a URL, a Sentinel-found master or
    a cluster's seed nodes."""
    if config.redis_cluster_nodes:
        return ClusterTarget(config.redis_cluster_nodes, password=config.redis_password)
    if config.redis_sentinels:
        assert config.redis_sentinel_master is not None  # load() checks the pair
        return SentinelTarget(
            config.redis_sentinels,
            config.redis_sentinel_master,
            password=config.redis_password,
            db=config.redis_db,
        )
    assert config.redis_url is not None
    return config.redis_url


def make_fleet_log(config: Config, metrics: Metrics) -> FleetLog | None:
    """The fleet's replay log, where the configuration has Redis, a replay
    window and ``SMAPWS_FLEET_HISTORY`` on; else None."""
    if config.broker != "redis" or not config.fleet_history:
        return None
    if config.history_ttl <= 0 or config.history_per_user <= 0 or config.history_max_bytes <= 0:
        return None
    client = PublishClient(redis_target(config), timeout=config.redis_timeout)
    return FleetLog(
        client,
        ttl=config.history_ttl,
        per_user=config.history_per_user,
        max_bytes=config.history_max_bytes,
        metrics=metrics,
    )


def make_broker(
    config: Config,
    metrics: Metrics,
    on_resync: Callable[[str, float, bytes | None], object] = lambda reason, down_s, ch: None,
    on_error: Callable[[BaseException], object] = lambda exc: None,
    on_forget: Callable[[bytes], object] = lambda channel: None,
    on_too_large: Callable[[bytes, int], object] = lambda channel, size: None,
    on_drop: Callable[[], object] | None = None,
    queued: QueueBytes | None = None,
) -> Broker:
    """The broker the configuration asks for; never memory when Redis is set.
    ``on_resync(reason, down_s, channel)`` is called when a Redis
    subscription is back after an outage (``channel`` is ``None`` in pattern
    mode: every connection missed messages; in user mode, the one user's
    channel), ``on_error(exc)`` when a read loop caught an unexpected
    exception (and restarted its subscription), ``on_forget(channel)`` (user
    mode) when a user's channel is no longer subscribed, ``on_too_large(channel,
    size)`` for a message over ``SMAPWS_MAX_MESSAGE_BYTES`` the read loop
    discarded unparsed, ``on_drop()`` for a valid one dropped because the
    router's queue was full (default: only counted)."""
    if config.broker != "redis":
        return MemoryBroker()
    channels = None
    if config.subscribe_mode == "user":
        commands = metrics.subscription_commands
        channels = UserChannels(
            config.channel_prefix.encode(),
            reason=RESYNC_REASON,
            sharded=config.sharded_pubsub,
            group=key_slot if config.sharded_pubsub else None,
            linger=config.subscribe_linger,
            on_resync=on_resync,
            on_forget=on_forget,
            on_commands=lambda command, n: commands.labels(command).inc(),
        )
        metrics.subscribed_channels.set_function(lambda: channels.subscribed)
    reading: dict[str, Any] = {  # the read loop's bounds and reports
        "max_message_bytes": config.max_message_bytes,
        "on_too_large": on_too_large,
        "on_disconnect": lambda cause: metrics.broker_disconnects.labels(cause).inc(),
        "queued": queued,
    }
    common: dict[str, Any] = {
        "timeout": config.redis_timeout,
        "reconnect_max": config.reconnect_max,
        "probe_interval": config.probe_interval,
        "on_reconnect": metrics.subscriber_reconnects.inc,
        "on_drop": metrics.broker_dropped.inc if on_drop is None else on_drop,
        "on_error": on_error,
    }
    target = redis_target(config)
    if isinstance(target, ClusterTarget) and config.sharded_pubsub:
        assert channels is not None  # load() checks the pair
        return ShardedBroker(target, channels=channels, **common, **reading)
    role: Role
    if channels is None:
        role = PatternSubscription(
            config.channel_prefix + "*",
            on_resync=lambda reason, down_s: on_resync(reason, down_s, None),
        )
    else:
        role = UserSubscriptions(channels)
    return RedisBroker(target, role, **common, **reading)


@contextlib.asynccontextmanager
async def _bridge(config: Config) -> AsyncIterator[None]:
    """The trio-asyncio loop, only when Redis needs it."""
    if config.broker != "redis":
        yield
        return
    import trio_asyncio

    async with trio_asyncio.open_loop():
        yield


def _on_stop_signal(server: Server) -> Callable[[str, int], None]:
    def on_stop(name: str, received: int) -> None:
        # The second *signal* stops now (as a second Ctrl-C); a drain
        # started otherwise (a worker's supervisor asked first, and the
        # same Ctrl-C reached the whole process group) does not count.
        if received > 1:
            logger.warning("signal received again, exiting now", extra=fields(signal=name))
            server.stop()
            return
        logger.info("signal received", extra=fields(signal=name))
        server.drain()

    return on_stop


#: Listening sockets bound by someone else (the supervisor of a group of
#: workers): the public ones and the internal ones (empty without
#: ``SMAPWS_INTERNAL_PORT``).
Listeners = tuple[list[trio.SocketListener], list[trio.SocketListener]]


async def serve(
    config: Config,
    *,
    handle_signals: bool = False,
    notify_systemd: bool | None = None,
    metrics: Metrics | None = None,
    listeners: Listeners | None = None,
    member: Membership | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the hub until drained (or cancelled).

    Reports a :class:`Server` (with the bound ports) to ``nursery.start``
    once it is listening. The broker may still be connecting then: ``/ready``
    says when it is. Raises :class:`ListenError` (one line) if it cannot
    listen.

    ``listeners``: serve these already-listening sockets (public, internal)
    instead of binding ``config.host:config.port`` (a worker of a group gets
    them from its supervisor); ``serve`` closes its copies when it returns.
    ``member``: this hub is a worker of a group (its index, the group's
    view and ``/metrics``, see :class:`~smapws._io.app.Membership`).

    ``notify_systemd`` (default: the same as ``handle_signals``, i.e. when
    the hub owns the process) speaks systemd's notify protocol on
    ``$NOTIFY_SOCKET`` if it is set: READY=1 once ``/ready`` would answer
    200, STOPPING=1 when the drain starts, WATCHDOG=1 every half of
    ``$WATCHDOG_USEC`` (see :mod:`smapws._io.sdnotify`).
    """
    if config.auth is None:
        raise ValueError("serve() needs config.auth (JWT_SECRET or JWT_PUBLIC_KEY_FILE)")
    metrics = metrics or Metrics()
    # The broker calls into `app` only once running, after `app` exists.
    queued = QueueBytes(config.ingest_queue_bytes)
    broker = make_broker(
        config,
        metrics,
        on_resync=lambda reason, down_s, channel: app.resync(reason, down_s, channel),
        on_error=lambda exc: app.internal_error("broker", exc),
        on_forget=lambda channel: app.forget_state(channel),
        on_too_large=lambda channel, size: app.too_large(channel, size),
        on_drop=lambda: app.dropped(),
        queued=queued,
    )
    fleet = make_fleet_log(config, metrics)
    app = App(config, broker, metrics, fleet, member)
    send, receive = trio.open_memory_channel[Item](config.ingest_queue)
    # Before any task: a port in use is one line (ListenError), not a group.
    public, internal = listeners if listeners is not None else await open_all_listeners(config)
    try:
        async with _bridge(config), trio.open_nursery() as root:
            server = Server(
                app,
                bound_port(public),
                root.cancel_scope,
                internal_port=bound_port(internal) if internal else None,
            )
            await root.start(broker.run, send)
            if app.fleet is not None:
                await root.start(app.fleet.run, app.off_chain)
            # Only the Redis read loop takes from ``queued``; the others must
            # not have it given back.
            root.start_soon(
                app.router, receive, queued if isinstance(broker, RedisBroker) else None
            )
            root.start_soon(app.maintain)
            root.start_soon(server._drain_when_asked)
            if config.demo:
                from smapws._io import demo

                logger.warning(
                    "demo mode: /demo and /demo/login (which hands out tokens) are served, "
                    "and a simulated Project service publishes for demo-* users; "
                    "never in production"
                )
                root.start_soon(demo.simulate, app)
            if handle_signals:
                await root.start(signals.watch, _on_stop_signal(server))
            if handle_signals if notify_systemd is None else notify_systemd:
                _start_systemd_notify(root, server)
            try:
                await _listen(config, app, server, public, internal, task_status)
            finally:
                if isinstance(broker, RedisBroker | ShardedBroker):
                    await broker.aclose()
                if app.fleet is not None:
                    await app.fleet.aclose()
    finally:
        close_listeners(public + internal)  # however serve ends


async def open_all_listeners(
    config: Config,
) -> tuple[list[trio.SocketListener], list[trio.SocketListener]]:
    """The public listeners and the internal ones (none without
    ``SMAPWS_INTERNAL_PORT``); all or nothing."""
    public = await _open_listeners(config.host, config.port)
    if config.internal_address is None:
        return public, []
    try:
        return public, await _open_listeners(*config.internal_address)
    except BaseException:
        close_listeners(public)
        raise


async def _open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listen on ``host:port``; raises :class:`ListenError` (one line)."""
    try:
        return await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from exc


async def _accept_loop(
    app: App,
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    nursery: trio.Nursery,
) -> None:
    """``trio.serve_listeners`` for one listener, minus its traceback per
    failed accept: when the process is out of file descriptors (or memory),
    one line every :data:`ACCEPT_ERROR_LOG_INTERVAL` s with the count, the
    ``websocket_accept_errors_total{errno}`` metric, and a pause of
    :data:`ACCEPT_PAUSE` s while the backlog holds the callers. Before each
    accept it waits for a head slot (``SMAPWS_MAX_PENDING_REQUESTS``).

    It accepts what the backlog holds in bursts of up to
    :data:`ACCEPT_BURST`, calling ``accept()`` on the listening socket's
    descriptor itself and waiting only when the backlog is empty: trio's
    ``SocketListener.accept`` makes one pass through the scheduler per
    socket, a tenth of what a connect storm cost the hub."""
    log = RateLimitedLog(ACCEPT_ERROR_LOG_INTERVAL)
    async with listener:
        sock = listener.socket
        fd = sock.fileno()
        # The listener's own descriptor, in a stdlib socket that never closes
        # it (detached below): trio's socket keeps owning it.
        raw = socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
        try:
            # A timeout of 0, whatever socket.setdefaulttimeout() says: with
            # one, accept() would wait in poll() (the whole event loop with
            # it) and raise TimeoutError. (The descriptor is non-blocking
            # already; this only sets the object's mode.)
            raw.setblocking(False)
            burst = 0  # sockets accepted since this task last yielded
            while True:
                if burst >= ACCEPT_BURST:
                    await trio.lowlevel.checkpoint()
                    burst = 0
                await app.head_slot()
                if sock.fileno() != fd:  # closed meanwhile (close_listeners)
                    return
                try:
                    accepted, _ = raw.accept()
                except BlockingIOError:
                    burst = 0
                    await trio.lowlevel.wait_readable(fd)
                    continue
                except OSError as exc:
                    if exc.errno in ACCEPT_RETRY_ERRNOS:
                        burst += 1  # (a stream of them still lets others run)
                        continue
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    name = errno.errorcode.get(exc.errno, str(exc.errno))
                    app.metrics.accept_errors.labels(name).inc()
                    suppressed = log.allow(name, trio.current_time())
                    if suppressed is not None:
                        logger.error(
                            "accept failed, pausing",
                            extra=fields(
                                errno=name,
                                pause_s=ACCEPT_PAUSE,
                                suppressed_since_last=suppressed,
                                open_connections=app.hub.active_connections,
                            ),
                        )
                    burst = 0
                    await trio.sleep(ACCEPT_PAUSE)
                    continue
                burst += 1
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(accepted))
                app.accepted(accepted.fileno())
                nursery.start_soon(handler, stream)
        finally:
            raw.detach()


def bound_port(listeners: list[trio.SocketListener]) -> int:
    """The port ``listeners`` (of one address) are bound to."""
    return int(listeners[0].socket.getsockname()[1])


def close_listeners(listeners: list[trio.SocketListener]) -> None:
    """Close listening sockets (idempotent; ``serve_listeners`` may have)."""
    for listener in listeners:
        listener.socket.close()


def _start_systemd_notify(root: trio.Nursery, server: Server) -> None:
    notifier = sdnotify.Notifier.from_environ(os.environ)
    if not notifier.enabled:
        return
    server.notifier = notifier
    app = server.app
    root.start_soon(
        partial(
            sdnotify.supervise,
            notifier,
            changes=app.state,
            is_ready=app.ready,
            describe=lambda: sdnotify.hub_status(app.health(), server.port),
            watchdog_s=sdnotify.watchdog_period(os.environ, os.getpid()),
        )
    )


def log_listening(config: Config, port: int, internal_port: int | None, **detail: object) -> None:
    """The ``listening`` line: where, then ``detail``, then Redis (no password)."""
    where: dict[str, object] = {}
    if internal_port is not None and config.internal_address is not None:
        where = {"internal_host": config.internal_address[0], "internal_port": internal_port}
    # Where to point a browser or curl on this machine (0.0.0.0 is no address to visit).
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    host = "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    logger.info(
        "listening",
        extra=fields(
            host=config.host,
            port=port,
            url=f"http://{host}:{port}",
            **where,
            **detail,
            redis=config.redis_url_redacted or "-",
        ),
    )


async def _listen(
    config: Config,
    app: App,
    server: Server,
    public: list[trio.SocketListener],
    internal: list[trio.SocketListener],
    task_status: trio.TaskStatus[Server],
) -> None:
    """Serve both listeners' connections in one nursery, so a drain or a
    cancel ends them alike; ``internal`` may be empty."""
    broker = app.broker
    served = [(public, frontdoor.PUBLIC_ROUTES if internal else frontdoor.ALL_ROUTES)]
    if internal:
        served.append((internal, frontdoor.INTERNAL_ROUTES))
    async with trio.open_nursery() as connections:
        for listeners, routes in served:
            handler = partial(frontdoor.handle, app, routes=routes)
            for listener in listeners:
                connections.start_soon(_accept_loop, app, listener, handler, connections)
        log_listening(config, server.port, server.internal_port, broker=broker.backend)
        if broker.backend == "memory":
            logger.info(
                "using the in-process broker (single node); set REDIS_URL or "
                "REDIS_HOST to run several nodes",
            )
        task_status.started(server)
