"""The hub's shared state and its synchronous decisions: routing a broker
message, registering connections, health and readiness.

Nothing here waits. The router task, the front door and each connection call
into one :class:`App`, all on the trio thread.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from smapws import _version
from smapws._config import Config
from smapws._core.envelope import InvalidMessage, parse, user_from_channel
from smapws._core.hub import Hub
from smapws._core.outbox import OutboxLimits
from smapws._io.brokers import Broker, Item
from smapws._io.connection import GOING_AWAY, Connection
from smapws._log import fields, logger
from smapws.metrics import Metrics

#: At most one "invalid broker message" log line per reason per this many
#: seconds; the rest are counted (metric) and summarised in the next line.
INVALID_LOG_INTERVAL = 1.0


class App:
    """State shared by every task of one hub."""

    def __init__(self, config: Config, broker: Broker, metrics: Metrics | None = None) -> None:
        self.config = config
        self.broker = broker
        self.hub: Hub[Connection] = Hub()
        self.metrics = metrics or Metrics()
        self.metrics.bind_gauges(lambda: self.hub.active_connections, lambda: self.hub.active_users)
        self.metrics.subscriber_up.set_function(lambda: float(broker.status == "connected"))
        self.limits = OutboxLimits(config.send_queue_messages, config.send_queue_bytes)
        self.prefix = config.channel_prefix.encode()
        self.draining = False
        self.pending_upgrades = 0
        self.started_at = trio.current_time()
        self._invalid_log: dict[str, tuple[float, int]] = {}
        self._empty = trio.Event()

    # -- connections -----------------------------------------------------

    def at_capacity(self) -> bool:
        return self.hub.active_connections + self.pending_upgrades >= self.config.max_connections

    async def wait_empty(self) -> None:
        """Until no connection is open and no upgrade is under way."""
        while self.hub.active_connections or self.pending_upgrades:
            if self._empty.is_set():
                self._empty = trio.Event()
            await self._empty.wait()

    def upgrade_started(self) -> None:
        self.pending_upgrades += 1

    def upgrade_finished(self) -> None:
        self.pending_upgrades -= 1
        self._maybe_empty()

    def _maybe_empty(self) -> None:
        if not self.hub.active_connections and not self.pending_upgrades:
            self._empty.set()

    def register(self, conn: Connection) -> None:
        self.hub.add(conn.user_id, conn)
        self.metrics.connections_total.inc()
        if self.draining:
            conn.request_close(GOING_AWAY, "server shutting down", cause="drain")

    def unregister(self, conn: Connection) -> None:
        has_others = self.hub.remove(conn.user_id, conn)
        unsent = len(conn.outbox)
        if unsent:
            self.metrics.messages_failed.inc(unsent)
            conn.outbox.take_all()
        self.metrics.connections_closed.labels(conn.cause or "unknown").inc()
        self._maybe_empty()
        logger.debug(
            "connection closed",
            extra=fields(
                user=conn.user_id,
                cause=conn.cause or "unknown",
                has_other_connections=has_others,
                remote=conn.remote,
            ),
        )

    def close_all(self, code: int, reason: str, cause: str) -> int:
        """Ask every connection to close; returns how many were asked."""
        n = 0
        for conn in self.hub.all_connections():
            conn.request_close(code, reason, cause=cause)
            n += 1
        return n

    # -- routing ---------------------------------------------------------

    def route(self, channel: bytes, data: bytes, *, wall_time: float, now: float) -> int:
        """Deliver one broker message to every connection of its user.

        Returns the number of connections it was queued for. An invalid
        message is counted and logged (rate-limited) and dropped."""
        m = self.metrics
        m.broker_received.inc()
        try:
            user = user_from_channel(channel, self.prefix)
            env = parse(
                data,
                wall_time=wall_time,
                received_at=now,
                max_bytes=self.config.max_message_bytes,
            )
        except InvalidMessage as exc:
            m.broker_invalid.labels(exc.reason).inc()
            self._log_invalid(exc.reason, channel, len(data), now)
            return 0
        conns = self.hub.connections(user)
        if not conns:
            m.messages_unrouted.inc()
            return 0
        queued = 0
        for conn in tuple(conns):
            if conn.offer(env):
                queued += 1
        if queued < len(conns):
            m.messages_failed.inc(len(conns) - queued)
        if self._debug:
            logger.debug(
                "Routed message",
                extra=fields(user=user, type=env.type, connections=queued),
            )
        return queued

    @property
    def _debug(self) -> bool:
        return logger.isEnabledFor(10)

    def _log_invalid(self, reason: str, channel: bytes, size: int, now: float) -> None:
        last, suppressed = self._invalid_log.get(reason, (-1e18, 0))
        if now - last < INVALID_LOG_INTERVAL:
            self._invalid_log[reason] = (last, suppressed + 1)
            return
        self._invalid_log[reason] = (now, 0)
        logger.warning(
            "invalid broker message dropped",
            extra=fields(
                reason=reason,
                channel=channel[:300].decode("utf-8", "replace"),
                bytes=size,
                suppressed_since_last=suppressed,
            ),
        )

    async def router(self, receive: trio.MemoryReceiveChannel[Item]) -> None:
        """The router task: drain the broker's queue into connections."""
        route = self.route
        async for channel, data in receive:
            route(channel, data, wall_time=time.time(), now=trio.current_time())

    # -- health ----------------------------------------------------------

    def ready(self) -> bool:
        return not self.draining and self.broker.status == "connected"

    def health(self) -> dict[str, Any]:
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
