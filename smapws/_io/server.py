"""``serve()``: the hub's root nursery.

::

    serve (root nursery)
    ├── signal watcher     SIGTERM/SIGINT -> drain, then cancel   (handle_signals=True)
    ├── broker subscriber  Redis PSUBSCRIBE via trio-asyncio, or the in-process broker
    ├── router             broker queue -> App.route -> connection outboxes
    └── listener           front door; each TCP connection's task in `connections`
        └── per connection: writer (its own task), reader, heartbeat

Shutdown (:meth:`Server.drain`): ``/ready`` turns 503 and new upgrades get 503
at once, every open connection is asked to close with 1001, and ``serve``
returns when the last one has gone or ``SMAPWS_DRAIN_TIMEOUT`` has passed.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from functools import partial
from typing import Final

import trio

from smapws._config import Config
from smapws._io import frontdoor
from smapws._io.app import App
from smapws._io.brokers import Broker, Item
from smapws._io.brokers.memory import MemoryBroker
from smapws._io.brokers.redis import RedisBroker
from smapws._io.connection import GOING_AWAY
from smapws._log import fields, logger
from smapws.metrics import Metrics

#: Listen backlog: a reconnect storm of thousands of tabs arrives within a
#: second or two; the kernel caps this at net.core.somaxconn anyway.
BACKLOG: Final = 4096


class Server:
    """A running hub, as ``nursery.start(serve, config)`` returns it."""

    def __init__(self, app: App, port: int, cancel_scope: trio.CancelScope) -> None:
        self.app = app
        self.port = port
        self._cancel_scope = cancel_scope
        self._drain_started = trio.Event()

    @property
    def metrics(self) -> Metrics:
        return self.app.metrics

    def drain(self) -> None:
        """Start draining, at once: ``/ready`` answers 503, new upgrades get
        503 and every open connection is asked to close with 1001. ``serve``
        returns when the last one has gone or the drain timeout passed.
        Idempotent."""
        app = self.app
        if app.draining:
            return
        app.draining = True
        app.metrics.draining.set(1)
        n = app.close_all(GOING_AWAY, "server shutting down", "drain")
        logger.info("draining", extra=fields(connections=n, timeout_s=app.config.drain_timeout))
        self._drain_started.set()

    async def _drain_when_asked(self) -> None:
        await self._drain_started.wait()
        app = self.app
        with trio.move_on_after(app.config.drain_timeout):
            await app.wait_empty()
        logger.info("drained", extra=fields(remaining=app.hub.active_connections))
        self._cancel_scope.cancel()


def make_broker(config: Config, metrics: Metrics) -> Broker:
    """The broker the configuration asks for; never memory when Redis is set."""
    if config.redis_url:
        return RedisBroker(
            config.redis_url,
            config.channel_prefix + "*",
            timeout=config.redis_timeout,
            reconnect_max=config.reconnect_max,
            on_reconnect=metrics.subscriber_reconnects.inc,
            on_drop=metrics.broker_dropped.inc,
        )
    return MemoryBroker()


@contextlib.asynccontextmanager
async def _bridge(config: Config) -> AsyncIterator[None]:
    """The trio-asyncio loop, only when Redis needs it."""
    if not config.redis_url:
        yield
        return
    import trio_asyncio

    async with trio_asyncio.open_loop():
        yield


async def _watch_signals(server: Server) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logger.info("signal received", extra=fields(signal=signal.Signals(signum).name))
            server.drain()


async def serve(
    config: Config,
    *,
    handle_signals: bool = False,
    metrics: Metrics | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the hub until drained (or cancelled).

    Reports a :class:`Server` (with the bound port) to ``nursery.start`` once
    it is listening. The broker may still be connecting then: ``/ready``
    says when it is.
    """
    if config.auth is None:
        raise ValueError("serve() needs config.auth (JWT_SECRET or JWT_PUBLIC_KEY_FILE)")
    metrics = metrics or Metrics()
    broker = make_broker(config, metrics)
    app = App(config, broker, metrics)
    send, receive = trio.open_memory_channel[Item](config.ingest_queue)
    async with _bridge(config), trio.open_nursery() as root:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host, backlog=BACKLOG)
        port = listeners[0].socket.getsockname()[1]
        server = Server(app, port, root.cancel_scope)
        await root.start(broker.run, send)
        root.start_soon(app.router, receive)
        root.start_soon(server._drain_when_asked)
        if handle_signals:
            root.start_soon(_watch_signals, server)
        try:
            await _listen(config, app, server, listeners, task_status)
        finally:
            if isinstance(broker, RedisBroker):
                await broker.aclose()


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
