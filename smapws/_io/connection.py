"""One accepted WebSocket: its reader, writer and heartbeat roles.

- The **writer** is the connection's own task: it waits until the router has
  queued something, takes everything queued and writes it in one
  ``send_all`` under ``SMAPWS_WRITE_WAIT``; when a close is requested it
  flushes what is queued, sends the close frame and returns.
- The **reader** reads client frames (and so lets the WebSocket library answer
  pings and close handshakes), discards them, and notices the peer leaving.
  Frames over ``SMAPWS_MAX_CLIENT_MESSAGE_BYTES`` end the connection with 1009.
- The **heartbeat** pings every ``SMAPWS_PING_INTERVAL`` and closes the
  connection when the pong has not come within ``SMAPWS_PONG_WAIT``; it also
  closes it with 1008 when the token expires (``SMAPWS_CLOSE_ON_TOKEN_EXPIRY``).

The router never waits on a connection: :meth:`Connection.offer` is
synchronous, bounded, and on overflow asks the writer to close with 1013.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final

import trio

from smapws._core.envelope import Envelope
from smapws._core.outbox import Outbox, OutboxLimits
from smapws._io.ws import ServerWebSocket, WsClosed
from smapws._log import fields, logger

if TYPE_CHECKING:
    from smapws._io.app import App

# Close codes (RFC 6455 §7.4.1), the contract in the README.
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
POLICY: Final = 1008
TOO_BIG: Final = 1009
INTERNAL: Final = 1011
TRY_AGAIN_LATER: Final = 1013


class Connection:
    """A live connection as the router and the hub see it."""

    __slots__ = (
        "_wakeup",
        "cause",
        "close_code",
        "close_reason",
        "expires_at",
        "outbox",
        "remote",
        "user_id",
    )

    def __init__(
        self, user_id: str, limits: OutboxLimits, *, expires_at: float | None, remote: str
    ) -> None:
        self.user_id = user_id
        self.outbox = Outbox(limits)
        self.expires_at = expires_at
        self.remote = remote
        self.close_code: int | None = None
        self.close_reason = ""
        self.cause = ""
        self._wakeup = trio.Event()

    def offer(self, envelope: Envelope) -> bool:
        """Queue ``envelope`` for the writer without waiting. Returns False when
        the connection is closing or its queue is full (then it is asked to
        close with 1013: the client reconnects and is fresh again)."""
        if self.close_code is not None:
            return False
        if not self.outbox.push(envelope):
            self.request_close(TRY_AGAIN_LATER, "slow consumer", cause="slow_consumer")
            return False
        self._wakeup.set()
        return True

    def request_close(self, code: int, reason: str, *, cause: str) -> None:
        """Ask the writer to flush, send a close frame with ``code`` and end.
        The first request wins."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self.cause = cause
            self._wakeup.set()

    async def wait(self) -> None:
        """Until something is queued or a close is requested."""
        if self._wakeup.is_set():
            self._wakeup = trio.Event()
        if not len(self.outbox) and self.close_code is None:
            await self._wakeup.wait()


async def run(app: App, nursery: trio.Nursery, ws: ServerWebSocket, conn: Connection) -> None:
    """Serve ``conn`` until it closes. Runs the writer in this task and the
    reader and heartbeat in ``nursery`` (the connection's own), and cancels
    them before returning."""
    app.register(conn)
    try:
        nursery.start_soon(_reader, app, ws, conn)
        nursery.start_soon(_heartbeat, app, ws, conn)
        await _writer(app, ws, conn)
    finally:
        nursery.cancel_scope.cancel()
        app.unregister(conn)


async def _writer(app: App, ws: ServerWebSocket, conn: Connection) -> None:
    cfg = app.config
    metrics = app.metrics
    while True:
        items = conn.outbox.take_all()
        if items:
            data = b"".join([e.frame for e in items])
            try:
                with trio.fail_after(cfg.write_wait):
                    await ws.send_frames(data)
            except trio.TooSlowError:
                metrics.messages_failed.inc(len(items))
                conn.cause = conn.cause or "write_timeout"
                logger.info(
                    "connection closed",
                    extra=fields(cause="write_timeout", user=conn.user_id, remote=conn.remote),
                )
                await ws.abort()
                return
            except WsClosed:
                metrics.messages_failed.inc(len(items))
                return
            now = trio.current_time()
            metrics.messages_sent.inc(len(items))
            observe = metrics.delivery_latency.observe
            for e in items:
                observe(now - e.received_at)
            continue
        if conn.close_code is not None:
            break
        await conn.wait()

    code = conn.close_code
    if code is None or code == 0:
        # The peer closed (or the library did, e.g. 1009): nothing to send.
        return
    if code == TRY_AGAIN_LATER:
        metrics.slow_consumer_closes.inc()
    with trio.move_on_after(cfg.write_wait):
        with contextlib.suppress(WsClosed):
            await ws.close(code, conn.close_reason)
    await ws.abort()


async def _reader(app: App, ws: ServerWebSocket, conn: Connection) -> None:
    try:
        while True:
            await ws.receive()
            app.metrics.client_messages.inc()
    except WsClosed as exc:
        # 0 means "peer or library closed: the writer has nothing to send".
        cause = "message_too_big" if exc.code == TOO_BIG else "client_closed"
        conn.request_close(0, "", cause=cause)


async def _heartbeat(app: App, ws: ServerWebSocket, conn: Connection) -> None:
    cfg = app.config
    expiry = conn.expires_at if cfg.close_on_token_expiry else None
    next_ping = trio.current_time() + cfg.ping_interval
    while True:
        if expiry is not None and expiry <= next_ping:
            await trio.sleep_until(expiry)
            conn.request_close(POLICY, "token expired", cause="token_expired")
            return
        await trio.sleep_until(next_ping)
        next_ping += cfg.ping_interval
        try:
            with trio.move_on_after(cfg.pong_wait) as scope:
                await ws.ping()
        except WsClosed:
            return
        if scope.cancelled_caught:
            conn.request_close(INTERNAL, "pong timeout", cause="pong_timeout")
            return
        now = trio.current_time()
        if next_ping < now:
            next_ping = now
