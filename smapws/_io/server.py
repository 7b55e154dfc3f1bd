"""``serve()``: the hub's root nursery.

::

    serve (root nursery)
    ├── signal watcher     SIGTERM/SIGINT -> drain, then cancel   (handle_signals=True)
    ├── broker subscriber  Redis PSUBSCRIBE via trio-asyncio, or the in-process broker
    ├── router             broker queue -> App.route -> connection outboxes
    ├── systemd notify     READY/STATUS/WATCHDOG on $NOTIFY_SOCKET (``smapws serve``)
    └── listener           front door; each TCP connection's task in `connections`
        └── per connection: writer (its own task), reader, heartbeat

Shutdown (:meth:`Server.drain`): ``/ready`` turns 503 and new upgrades get 503
at once, every open connection is asked to close with 1001, and ``serve``
returns when the last one has gone or ``SMAPWS_DRAIN_TIMEOUT`` has passed.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Final

import trio

from smapws._config import Config
from smapws._io import frontdoor, sdnotify
from smapws._io.app import App
from smapws._io.brokers import Broker, Item
from smapws._io.brokers.memory import MemoryBroker
from smapws._io.brokers.redis import RedisBroker, SentinelTarget
from smapws._log import fields, logger
from smapws.metrics import Metrics

#: Listen backlog: a reconnect storm of thousands of tabs arrives within a
#: second or two; the kernel caps this at net.core.somaxconn anyway.
BACKLOG: Final = 4096
#: What stopping may take beyond ``SMAPWS_DRAIN_TIMEOUT`` and
#: ``SMAPWS_WRITE_WAIT`` (the last close handshakes): closing the broker and
#: exiting. systemd is told the total with STOPPING=1 (:func:`stop_budget`).
STOP_MARGIN_S: Final = 5.0


#: Draining closes at least this many connections per second, and wakes
#: this often to close the next batch.
MIN_DRAIN_RATE: Final = 100.0
DRAIN_TICK: Final = 0.05


def stop_budget(config: Config) -> float:
    """Seconds from the start of a drain to the process's exit, at most:
    what ``TimeoutStopSec=`` and ``terminationGracePeriodSeconds`` must exceed."""
    return config.drain_timeout + config.write_wait + STOP_MARGIN_S


class Server:
    """A running hub, as ``nursery.start(serve, config)`` returns it."""

    def __init__(self, app: App, port: int, cancel_scope: trio.CancelScope) -> None:
        self.app = app
        self.port = port
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
        if app.draining:
            return
        app.draining = True
        app.metrics.draining.set(1)
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
                conn.go_away()
            closed = max(closed, due)
            if closed >= n:
                return
            await trio.sleep(DRAIN_TICK)


def make_broker(
    config: Config,
    metrics: Metrics,
    on_resync: Callable[[str, float], object] = lambda reason, down_s: None,
) -> Broker:
    """The broker the configuration asks for; never memory when Redis is set.
    ``on_resync(reason, down_s)`` is called when a Redis subscription is back
    after an outage."""
    if config.broker == "redis":
        target: str | SentinelTarget
        if config.redis_sentinels:
            assert config.redis_sentinel_master is not None  # load() checks the pair
            target = SentinelTarget(
                config.redis_sentinels,
                config.redis_sentinel_master,
                password=config.redis_password,
                db=config.redis_db,
            )
        else:
            assert config.redis_url is not None
            target = config.redis_url
        return RedisBroker(
            target,
            config.channel_prefix + "*",
            timeout=config.redis_timeout,
            reconnect_max=config.reconnect_max,
            probe_interval=config.probe_interval,
            on_reconnect=metrics.subscriber_reconnects.inc,
            on_drop=metrics.broker_dropped.inc,
            on_resync=on_resync,
        )
    return MemoryBroker()


@contextlib.asynccontextmanager
async def _bridge(config: Config) -> AsyncIterator[None]:
    """The trio-asyncio loop, only when Redis needs it."""
    if config.broker != "redis":
        yield
        return
    import trio_asyncio

    async with trio_asyncio.open_loop():
        yield


async def _watch_signals(server: Server) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if server.app.draining:
                # A second signal while draining: stop now (as a second Ctrl-C).
                logger.warning("signal received again, exiting now", extra=fields(signal=name))
                server.stop()
                return
            logger.info("signal received", extra=fields(signal=name))
            server.drain()


async def serve(
    config: Config,
    *,
    handle_signals: bool = False,
    notify_systemd: bool | None = None,
    metrics: Metrics | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the hub until drained (or cancelled).

    Reports a :class:`Server` (with the bound port) to ``nursery.start`` once
    it is listening. The broker may still be connecting then: ``/ready``
    says when it is.

    ``notify_systemd`` (default: the same as ``handle_signals``, i.e. when
    the hub owns the process) speaks systemd's notify protocol on
    ``$NOTIFY_SOCKET`` if it is set: READY=1 once ``/ready`` would answer
    200, STOPPING=1 when the drain starts, WATCHDOG=1 every half of
    ``$WATCHDOG_USEC`` (see :mod:`smapws._io.sdnotify`).
    """
    if config.auth is None:
        raise ValueError("serve() needs config.auth (JWT_SECRET or JWT_PUBLIC_KEY_FILE)")
    metrics = metrics or Metrics()
    # The broker calls app.resync only once running, after `app` exists.
    broker = make_broker(config, metrics, lambda reason, down_s: app.resync(reason, down_s))
    app = App(config, broker, metrics)
    send, receive = trio.open_memory_channel[Item](config.ingest_queue)
    async with _bridge(config), trio.open_nursery() as root:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host, backlog=BACKLOG)
        port = listeners[0].socket.getsockname()[1]
        server = Server(app, port, root.cancel_scope)
        await root.start(broker.run, send)
        root.start_soon(app.router, receive)
        root.start_soon(app.maintain)
        root.start_soon(server._drain_when_asked)
        if config.demo:
            from smapws._io import demo

            logger.warning(
                "demo mode: /demo and /demo/login (which hands out tokens) are served, "
                "and a simulated Project service publishes for demo-* users; never in production"
            )
            root.start_soon(demo.simulate, app)
        if handle_signals:
            root.start_soon(_watch_signals, server)
        if handle_signals if notify_systemd is None else notify_systemd:
            _start_systemd_notify(root, server)
        try:
            await _listen(config, app, server, listeners, task_status)
        finally:
            if isinstance(broker, RedisBroker):
                await broker.aclose()


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
            is_ready=app.ready,
            describe=lambda: sdnotify.hub_status(app.health(), server.port),
            watchdog_s=sdnotify.watchdog_period(os.environ, os.getpid()),
        )
    )


async def _listen(
    config: Config,
    app: App,
    server: Server,
    listeners: list[trio.SocketListener],
    task_status: trio.TaskStatus[Server],
) -> None:
    broker = app.broker
    async with trio.open_nursery() as connections:
        connections.start_soon(
            partial(
                trio.serve_listeners,
                partial(frontdoor.handle, app),
                listeners,
                handler_nursery=connections,
            )
        )
        logger.info(
            "listening",
            extra=fields(
                host=config.host,
                port=server.port,
                broker=broker.backend,
                redis=config.redis_url_redacted or "-",
            ),
        )
        if broker.backend == "memory":
            logger.info(
                "using the in-process broker (single node); set REDIS_URL or "
                "REDIS_HOST to run several nodes",
            )
        task_status.started(server)
