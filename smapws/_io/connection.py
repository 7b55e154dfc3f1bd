"""One accepted WebSocket: one task, one cancel scope, driving the sans-IO
state machine :class:`~smapws._core.wsconn.WsConn` over the trio stream.

Every connection has the reader, writer and heartbeat roles of DESIGN.md's
task tree; an idle connection (thousands are, at any time) holds them in one
task and one cancel scope, and no nursery:

- The connection's own task (the one the listener started for its socket)
  reads: it waits until the socket is readable (``wait_readable``; an
  in-memory stream: in ``receive_some``) inside its one cancel scope, reads,
  and feeds what came to the state machine (pongs, client messages, close
  frames, the client's size and frame-rate bounds). When there is output it writes it
  with ``send_all`` under ``SMAPWS_WRITE_WAIT`` (past it the connection is
  abandoned: ``write_timeout``); when the connection is closing it reads on
  until the peer's close frame answers, at most ``SMAPWS_WRITE_WAIT``.
- The router never waits on a connection: :meth:`Connection.offer` is
  synchronous and bounded (1013 on overflow). It writes into the socket at
  once what the kernel's send buffer takes (one system call, no task
  switch); only what it does not take wakes the task, by cancelling its
  read, and the task writes the rest. No helper task, no second task.
- The heartbeat is :meth:`Connection.heartbeat`, called for every connection
  once per tick by one task of the hub (``App.maintain``): the state machine
  queues a ping every ``SMAPWS_PING_INTERVAL``, closes with 1011 when the
  pong has not come within ``SMAPWS_PONG_WAIT``, with 1008 once the token
  has expired (``SMAPWS_CLOSE_ON_TOKEN_EXPIRY``).

This module does not import the hub (``smapws._io.app``): what it needs of
it is :class:`Host`.
"""

from __future__ import annotations

import math
import os
from contextlib import AbstractContextManager
from typing import Final, Protocol

import trio

from smapws._config import Config
from smapws._core.closecodes import CloseCode
from smapws._core.envelope import Envelope
from smapws._core.history import Resume
from smapws._core.outbox import OVERFLOW, QUEUED, Outbox, OutboxLimits, Push
from smapws._core.ratelimit import KeyedCount
from smapws._core.wsconn import Close, Message, WsConn, WsLimits
from smapws._io import sockio
from smapws._log import fields, logger
from smapws.metrics import Metrics

# Close codes: aliases of the one enum (smapws._core.closecodes).
NORMAL: Final = CloseCode.NORMAL
GOING_AWAY: Final = CloseCode.GOING_AWAY
POLICY: Final = CloseCode.POLICY
TOO_BIG: Final = CloseCode.TOO_BIG
INTERNAL: Final = CloseCode.INTERNAL
TRY_AGAIN_LATER: Final = CloseCode.TRY_AGAIN_LATER

#: Bytes read from the socket at a time. Clients send little (pongs, the odd
#: message); a small buffer keeps reads cheap.
_RECEIVE_BYTES: Final = 4096
#: Bounds of the lingering close once the close handshake is over (or we
#: failed the connection): what the peer still sends is read and discarded,
#: so that closing with unread input (a client flooding frames) does not make
#: the kernel send RST, which can destroy the close frame before the client
#: reads it (as ``frontdoor._send`` does for HTTP answers).
_LINGER_S: Final = 2.0
_LINGER_BYTES: Final = 256 * 1024


class Host(Protocol):
    """What a connection needs of the hub (``App`` is one)."""

    @property
    def config(self) -> Config: ...

    @property
    def limits(self) -> OutboxLimits: ...

    @property
    def ws_limits(self) -> WsLimits: ...

    @property
    def metrics(self) -> Metrics: ...

    def register(self, conn: Connection, resume: Resume | None = None) -> None: ...

    def unregister(self, conn: Connection) -> None: ...

    @property
    def pending_by_address(self) -> KeyedCount:
        """Sockets each client address holds before its answer or while it
        lingers (``SMAPWS_MAX_PENDING_PER_ADDRESS``)."""
        ...

    def lingering_close(self, scope: trio.CancelScope) -> AbstractContextManager[None]:
        """Count a socket in its lingering close (``scope``: what cancels it
        to make room) against ``SMAPWS_MAX_PENDING_REQUESTS``."""
        ...


class Connection:
    """A live connection as the router, the hub and the heartbeat see it."""

    __slots__ = ("_busy", "_deadline", "_fd", "_metrics", "_scope", "remote", "ws")

    def __init__(
        self,
        host: Host,
        user_id: str,
        *,
        expires_at: float | None,
        remote: str,
        now: float,
    ) -> None:
        self.ws = WsConn(
            user_id,
            host.ws_limits,
            host.limits,
            now=now,
            expires_at=expires_at if host.config.close_on_token_expiry else None,
        )
        self.remote = remote
        self._metrics = host.metrics
        #: The socket, for writes that need no waiting (-1: none).
        self._fd = -1
        #: The task is writing: its ``send_all`` owns the output meanwhile.
        self._busy = False
        #: The task's read, cancelled to wake it (None: not reading).
        self._scope: trio.CancelScope | None = None
        #: Until when the task waits for the peer's answer to our close frame.
        self._deadline = math.inf

    @property
    def user_id(self) -> str:
        return self.ws.user_id

    @property
    def outbox(self) -> Outbox:
        return self.ws.outbox

    @property
    def close(self) -> Close | None:
        """How the connection ended or is ending (None while open)."""
        return self.ws.close

    @property
    def close_code(self) -> int | None:
        close = self.ws.close
        return None if close is None else close.code

    @property
    def cause(self) -> str:
        close = self.ws.close
        return "" if close is None else close.cause

    # -- called by the router and the hub (never wait) --------------------

    def offer(self, envelope: Envelope) -> Push:
        """Queue ``envelope`` under the delivery policy and write what the
        socket takes now. On :data:`~smapws._core.outbox.OVERFLOW` nothing is
        queued and the connection closes with 1013 (counted here, whoever
        offered); a closing connection queues nothing and returns
        :data:`~smapws._core.wsconn.REFUSED` (falsy)."""
        result = self.ws.offer(envelope, direct=self._fd >= 0 and not self._busy)
        if result is QUEUED:  # the common case (IntFlag arithmetic is slow)
            self._flush()
        elif result:
            if result & OVERFLOW:
                self._metrics.slow_consumer_closes.inc()
            self._flush()
        return result

    def request_close(self, code: int, reason: str, *, cause: str) -> None:
        """Close with ``code`` after what is queued; the first close wins."""
        if self.ws.close_with(code, reason, cause=cause):
            self._flush()

    def go_away(self) -> None:
        """Close with 1001: the hub is draining for shutdown."""
        self.request_close(GOING_AWAY, "server shutting down", cause="drain")

    def fail(self) -> None:
        """A fault in this connection (a bug, counted by the caller's
        barrier): close with 1011 after what is queued, or, when even that
        fails, drop it (its task wakes and ends). Never raises."""
        try:
            self.request_close(INTERNAL, "internal error", cause="internal_error")
        except Exception:
            self._metrics.messages_failed.inc(self.ws.abort("internal_error"))
            if self._scope is not None:
                self._scope.cancel()

    def heartbeat(self, now: float) -> None:
        """One heartbeat tick (see the module docstring)."""
        ws = self.ws
        if ws.close is None:
            ws.tick(now)
            if ws.has_output() or ws.close is not None:
                self._flush()

    def _flush(self) -> None:
        """Write what the socket takes without waiting; wake the task for
        the rest, or to close."""
        if self._busy:
            return  # the task writes what was added once its write is done
        ws = self.ws
        fd = self._fd
        if fd >= 0:
            data = ws.data_to_send()
            if data:
                try:
                    n = os.write(fd, data)
                except OSError:  # full (BlockingIOError), or the peer is gone:
                    n = 0  # the task's write waits, or meets the error
                if n:
                    envs = ws.sent(n)
                    if envs:
                        add = self._metrics.direct_writes.add
                        for env in envs:
                            add(env, env.received_at)
                    if n == len(data) and ws.close is None:
                        return  # all written: nothing to wake the task for
        scope = self._scope
        if scope is not None and (
            ws.has_output() or (ws.close is not None and self._deadline == math.inf)
        ):
            scope.cancel()

    # -- the connection's task ---------------------------------------------

    async def _write(self, stream: trio.abc.Stream, fd: int, write_wait: float) -> bool:
        """Write the output; False when the connection is to be dropped."""
        ws = self.ws
        metrics = self._metrics
        data = ws.data_to_send()
        try:
            # The kernel usually takes it all at once (a close frame, the
            # rest of a burst): then no deadline to set and no scope (about
            # a twentieth of what a storm of connects and closes cost the
            # hub, bench.profile --storm).
            sent = sockio.send_now(fd, data)
            if sent < len(data):
                self._busy = True
                try:
                    # A bare CancelScope: fail_after's context-manager wrapper
                    # costs more than most writes.
                    with trio.CancelScope(deadline=trio.current_time() + write_wait) as scope:
                        await sockio.send_all(stream, fd, data[sent:] if sent else data)
                finally:
                    self._busy = False
                if scope.cancelled_caught:
                    metrics.messages_failed.inc(ws.abort("write_timeout"))
                    # The cause websocket_connections_closed_total counts: the
                    # first close's (slow_consumer when it was the 1013 that
                    # could not be written), else write_timeout.
                    logger.info(
                        "connection dropped: a write blocked past SMAPWS_WRITE_WAIT",
                        extra=fields(cause=self.cause, user=ws.user_id, remote=self.remote),
                    )
                    return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            metrics.messages_failed.inc(ws.abort("client_closed"))
            return False
        written = ws.sent(len(data))
        if written:
            now = trio.current_time()
            metrics.messages_sent.inc(len(written))
            observe = metrics.delivery_latency.observe
            for env in written:
                observe(now - env.received_at)
        return True


async def _linger(host: Host, stream: trio.abc.Stream, address: str) -> None:
    """Half-close, then discard what the peer still sends until it closes
    (bounded by :data:`_LINGER_S` and :data:`_LINGER_BYTES`, and counted as
    the front door counts its own lingering closes: against
    ``SMAPWS_MAX_PENDING_REQUESTS`` and against ``address``'s
    ``SMAPWS_MAX_PENDING_PER_ADDRESS``; past the latter, no linger)."""
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    by_address = host.pending_by_address
    if not by_address.acquire(address):
        return  # that address holds its bound: the socket closes at once
    fd = sockio.fd_of(stream)
    try:
        with trio.move_on_after(_LINGER_S) as scope, host.lingering_close(scope):
            await sockio.send_eof(stream, fd)
            discarded = 0
            while discarded < _LINGER_BYTES:
                chunk = await sockio.receive_some(stream, fd, _RECEIVE_BYTES)
                if not chunk:
                    break
                discarded += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        by_address.release(address)


async def run(
    host: Host,
    stream: trio.abc.Stream,
    conn: Connection,
    resume: Resume | None = None,
    trailing: bytes = b"",
    address: str = "-",
) -> None:
    """Serve ``conn`` on ``stream`` (already upgraded; ``trailing``: what
    the client sent after its request head; ``address``: the peer's IP
    address) in this task until it closes, unregister it, and linger (see
    :func:`_linger`) after a close handshake.
    ``resume``: what the client asked for with ``?since=``. The caller
    closes the stream."""
    conn._fd = fd = sockio.fd_of(stream)
    try:
        # Inside the try: a fault while registering (a bug) must not leave
        # the connection in the hub, against every limit, for good.
        host.register(conn, resume)
        write_wait = host.config.write_wait
        linger = False  # True once the close handshake ended it (or we failed it)
        ws = conn.ws
        metrics = conn._metrics
        events = ws.receive_data(trailing, trio.current_time()) if trailing else ()
        while True:
            for event in events:
                if isinstance(event, Message):
                    metrics.client_messages.inc()
            if ws.has_output():
                if not await conn._write(stream, fd, write_wait):
                    break
                events = ()
                continue  # what was added meanwhile goes next
            if ws.finished:
                linger = True
                break
            if ws.close is not None and conn._deadline == math.inf:
                conn._deadline = trio.current_time() + write_wait
            with trio.CancelScope(deadline=conn._deadline) as scope:
                conn._scope = scope
                try:
                    if fd >= 0:
                        # Parked here, an idle connection holds no frame of
                        # the stream's receive path; then it reads at once
                        # (one pass through the scheduler per read, not two).
                        await trio.lowlevel.wait_readable(fd)
                    data = await sockio.receive_some(stream, fd, _RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                finally:
                    conn._scope = None
            if scope.cancelled_caught:
                if trio.current_time() >= conn._deadline:
                    break  # our close frame was never answered
                events = ()
                continue  # woken: there is output, or a close to wait for
            events = ws.receive_data(data, trio.current_time())
    finally:
        conn._fd = -1  # the socket closes soon: no more direct writes
        host.unregister(conn)
    if linger:  # (out of the hub's tables: the connection is over)
        await _linger(host, stream, address)
