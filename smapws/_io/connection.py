"""One accepted WebSocket: its reader, writer and heartbeat roles.

Every connection has the three roles of DESIGN.md's task tree; to keep an idle
connection small (thousands are idle at any time) they are not three tasks:

- The **writer** is the connection's own task (the one the listener started
  for its socket): it waits until the router has queued something, takes
  everything queued and writes it in one ``send_all`` under
  ``SMAPWS_WRITE_WAIT``; when a close is requested it flushes what is queued,
  sends the close frame and returns.
- The **reader** is the WebSocket library's reader task: it parses client
  frames, answers pings and the close handshake, enforces
  ``SMAPWS_MAX_CLIENT_MESSAGE_BYTES`` (1009), and reports messages, pongs and
  the end of the connection to :class:`Connection` (a ``Listener``).
- The **heartbeat** is :meth:`Connection.heartbeat`, called for every
  connection once per tick by one task of the hub (``App.maintain``): it
  queues a ping every ``SMAPWS_PING_INTERVAL``, asks for a close (1011) when
  the pong has not come within ``SMAPWS_PONG_WAIT`` of the ping, and (1008)
  when the token has expired (``SMAPWS_CLOSE_ON_TOKEN_EXPIRY``).

The router never waits on a connection: :meth:`Connection.offer` is
synchronous, bounded, and on overflow asks the writer to close with 1013.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final

import trio

from smapws._core.closecodes import CloseCode
from smapws._core.envelope import Envelope
from smapws._core.history import Resume
from smapws._core.outbox import OVERFLOW, QUEUED, Outbox, Push
from smapws._io.ws import PING_FRAME, ServerWebSocket, WsClosed
from smapws._log import fields, logger

if TYPE_CHECKING:
    from smapws._io.app import App

# Close codes: aliases of the one enum (smapws._core.closecodes).
NORMAL: Final = CloseCode.NORMAL
GOING_AWAY: Final = CloseCode.GOING_AWAY
POLICY: Final = CloseCode.POLICY
TOO_BIG: Final = CloseCode.TOO_BIG
INTERNAL: Final = CloseCode.INTERNAL
TRY_AGAIN_LATER: Final = CloseCode.TRY_AGAIN_LATER

#: ``close_code`` when the peer (or the library) ended the connection: the
#: writer has no close frame to send.
PEER_CLOSED: Final = 0

#: What :meth:`Connection.offer` returns for a connection already closing.
REFUSED: Final = Push(0)


class Connection:
    """A live connection as the router, the hub and the heartbeat see it."""

    __slots__ = (
        "_control",
        "_metrics",
        "_partial",
        "_waiter",
        "_ws",
        "cause",
        "close_code",
        "close_reason",
        "expires_at",
        "next_ping",
        "outbox",
        "ping_sent_at",
        "remote",
        "user_id",
    )

    def __init__(
        self,
        app: App,
        user_id: str,
        *,
        expires_at: float | None,
        remote: str,
        now: float,
    ) -> None:
        self.user_id = user_id
        self.outbox = Outbox(app.limits)
        self.expires_at = expires_at if app.config.close_on_token_expiry else None
        self.remote = remote
        self.close_code: int | None = None
        self.close_reason = ""
        self.cause = ""
        self.next_ping = now + app.config.ping_interval
        self.ping_sent_at: float | None = None
        self._control = b""
        self._partial: Envelope | None = None  # written in part by offer()
        self._waiter: trio.lowlevel.Task | None = None
        self._metrics = app.metrics
        self._ws: ServerWebSocket | None = None

    # -- called by the router and the hub (never wait) --------------------

    def offer(self, envelope: Envelope) -> Push:
        """Queue ``envelope`` for the writer without waiting, under the
        delivery policy (:mod:`smapws._core.outbox`). On :data:`OVERFLOW`
        nothing is queued and the connection is asked to close with 1013: the
        client reconnects and gets the current state. A connection already
        closing queues nothing and returns :data:`REFUSED` (falsy)."""
        if self.close_code is not None:
            return REFUSED
        ws = self._ws
        if self._waiter is not None and ws is not None:
            # The writer is idle, so nothing is queued: write now, from the
            # router, with one system call and no task switch. What the
            # socket does not take now, the writer finishes.
            frame = envelope.frame
            n = ws.try_send(frame)
            if n == len(frame):
                self._metrics.direct_writes.add(envelope, envelope.received_at)
                return QUEUED
            if n > 0:
                self._partial = envelope
                self._control = frame[n:]
                self._wake()
                return QUEUED
        result = self.outbox.push(envelope)
        if result & OVERFLOW:
            # Counted here, whoever offered (the router, or register() with a
            # replay or the current state), so the two metrics agree.
            self._metrics.slow_consumer_closes.inc()
            self.request_close(TRY_AGAIN_LATER, "slow consumer", cause="slow_consumer")
            return result
        self._wake()
        return result

    def request_close(self, code: int, reason: str, *, cause: str) -> None:
        """Ask the writer to flush, send a close frame with ``code`` (none for
        :data:`PEER_CLOSED`) and end. The first request wins."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self.cause = cause
            self._wake()

    def go_away(self) -> None:
        """Ask for a close with 1001: the hub is draining for shutdown."""
        self.request_close(GOING_AWAY, "server shutting down", cause="drain")

    def heartbeat(self, now: float, ping_interval: float, pong_wait: float) -> None:
        """One heartbeat tick (see the module docstring)."""
        if self.close_code is not None:
            return
        if self.expires_at is not None and now >= self.expires_at:
            self.request_close(POLICY, "token expired", cause="token_expired")
        elif self.ping_sent_at is not None and now >= self.ping_sent_at + pong_wait:
            self.request_close(INTERNAL, "pong timeout", cause="pong_timeout")
        elif now >= self.next_ping:
            self.next_ping = max(self.next_ping + ping_interval, now)
            if self.ping_sent_at is None:  # one ping in flight at a time
                self.ping_sent_at = now
                self._control += PING_FRAME
                self._wake()

    # -- Listener: called by the WebSocket library's reader task ----------

    def on_client_message(self) -> None:
        self._metrics.client_messages.inc()

    def on_pong(self) -> None:
        self.ping_sent_at = None

    def on_closed(self, code: int) -> None:
        self.request_close(PEER_CLOSED, "", cause="client_closed")

    def on_refused(self, code: int) -> None:
        cause = "message_too_big" if code == TOO_BIG else "frame_rate"
        self.request_close(PEER_CLOSED, "", cause=cause)

    # -- the writer's side --------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    def _abort_wait(self, _: object) -> trio.lowlevel.Abort:
        # Cancelled (the hub shuts down): trio reschedules the task itself,
        # so nobody else may from now on (the reader reporting the peer's
        # close in the same tick did, and trio's assertion ended the
        # connection as an internal error).
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self) -> None:
        """Until something is queued or a close is requested. (A parked task
        rather than an Event: no allocation per connection.)"""
        if not len(self.outbox) and not self._control and self.close_code is None:
            self._waiter = trio.lowlevel.current_task()
            try:
                await trio.lowlevel.wait_task_rescheduled(self._abort_wait)
            finally:
                self._waiter = None
        else:
            await trio.lowlevel.checkpoint()

    def take(self) -> tuple[bytes, list[Envelope]]:
        """Everything to write now, as one buffer: the rest of a frame that
        :meth:`offer` wrote in part, a pending ping (never inside a data
        frame), then the frames queued. And the envelopes it completes, for
        the delivery counters."""
        queued = self.outbox.take_all()
        data = self._control + b"".join([e.frame for e in queued]) if queued else self._control
        self._control = b""
        partial = self._partial
        if partial is not None:
            self._partial = None
            queued.insert(0, partial)
        return data, queued


async def run(
    app: App,
    nursery: trio.Nursery,
    ws: ServerWebSocket,
    conn: Connection,
    resume: Resume | None = None,
) -> None:
    """Serve ``conn`` until it closes: the writer runs in this task. Cancels
    ``nursery`` (the connection's own, where the library's reader runs) and
    unregisters the connection before returning. ``resume``: what the client
    asked for with ``?since=``."""
    conn._ws = ws
    try:
        # Inside the try: a fault while registering (a bug) must not leave
        # the connection in the hub, against every limit, for good.
        app.register(conn, resume)
        ws.listen(conn)
        await _writer(app, ws, conn)
    finally:
        nursery.cancel_scope.cancel()
        app.unregister(conn)


async def _writer(app: App, ws: ServerWebSocket, conn: Connection) -> None:
    cfg = app.config
    metrics = app.metrics
    while True:
        data, items = conn.take()
        if data:
            try:
                sent = ws.try_send(data)
                if sent < len(data):
                    with trio.fail_after(cfg.write_wait):
                        await ws.send_frames(data[max(sent, 0) :])
            except trio.TooSlowError:
                metrics.messages_failed.inc(len(items))
                conn.request_close(PEER_CLOSED, "", cause="write_timeout")
                logger.info(
                    "connection closed",
                    extra=fields(cause="write_timeout", user=conn.user_id, remote=conn.remote),
                )
                await ws.abort()
                return
            except WsClosed:
                metrics.messages_failed.inc(len(items))
                return
            if items:
                now = trio.current_time()
                metrics.messages_sent.inc(len(items))
                observe = metrics.delivery_latency.observe
                for e in items:
                    observe(now - e.received_at)
            continue
        if conn.close_code is not None:
            break
        await conn.wait()

    if conn.close_code == PEER_CLOSED:
        return  # the peer closed (or the library did, e.g. 1009): nothing to send
    with trio.move_on_after(cfg.write_wait), contextlib.suppress(WsClosed):
        await ws.close(conn.close_code or NORMAL, conn.close_reason)
    await ws.abort()
