"""The one module that touches trio-websocket.

Everything else in smapws sees :class:`ServerWebSocket`, :class:`Listener` and
:class:`WsClosed`, so the WebSocket library can be swapped (for instance for
``websockets.trio``) by rewriting this file alone.

trio-websocket runs the reader task (parsing client frames with wsproto,
answering pings, the close handshake, the 1009 size limit) and closes. What
goes past its public API does so on purpose, because a hub holds thousands
of idle connections and writes each message to many of them (DESIGN.md §4):

- :meth:`ServerWebSocket.send_frames` writes frames that the router encoded
  once for all connections (server frames are unmasked, so the bytes are the
  same for every socket), under the library's own stream lock so that they
  never interleave with its control frames. One writer sends everything
  queued in one ``send_all``.
- :meth:`ServerWebSocket.try_send` writes what the socket takes without
  waiting. When that is part of a frame, it refuses further writes until
  ``send_frames`` writes the rest, and the library's own frames (a pong, the
  answer to a close) are handed to that ``send_frames``, which writes them
  right after the frame: nothing lands inside a data frame.
- A protocol error in a client frame (1002; 1007 for invalid UTF-8) is
  answered with a close frame before the TCP close (the library only closed).
- The upgrade is answered here from the head the front door already parsed
  (no second parse by h11), and wsproto starts in the OPEN state.
- :class:`_LeanConnection` keeps only the state a hub connection uses: client
  messages are counted and discarded instead of queued on a memory channel
  (nobody reads them), pongs and the end of the connection are reported to a
  :class:`Listener` instead of waking per-ping events, and the handshake
  leftovers are dropped after the upgrade. That removes a task, a memory
  channel, three events and an ordered dict per connection. (The conformance
  echo endpoint, ``tests/autobahn``, asks for whole messages with
  :meth:`ServerWebSocket.receive`.)
- The pinned trio-websocket range (``<0.13``) is what this was written against;
  ``tests/test_websocket.py`` and ``tests/test_ws.py`` exercise every path,
  and Autobahn|Testsuite checks conformance (``tests/test_autobahn.py``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
from collections.abc import Callable
from typing import Any, Final, Protocol

import trio
import trio_websocket
import wsproto
import wsproto.connection
import wsproto.events
from trio_websocket._impl import CloseReason
from wsproto.connection import ConnectionState, ConnectionType

from smapws._core.ratelimit import TokenBucket

#: Close code when the connection ended without a close frame (RFC 6455 §7.1.5).
ABNORMAL_CLOSURE: Final = 1006

#: A server ping with an empty payload: unmasked, FIN, opcode 0x9, length 0.
PING_FRAME: Final = b"\x89\x00"

#: Bytes read from the socket at a time once upgraded. Clients send little
#: (pongs, the odd message); a small buffer keeps idle connections cheap.
_RECEIVE_BYTES: Final = 4096


class WsClosed(Exception):
    """The WebSocket is closed or closing; ``code`` is the close code seen
    (from the peer, or the one we sent), 1006 when there was none."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"websocket closed ({code})")


#: Close codes this layer sends of its own accord (RFC 6455 §7.4.1): the
#: client broke one of its bounds.
POLICY_VIOLATION: Final = 1008
MESSAGE_TOO_BIG: Final = 1009


class Listener(Protocol):
    """What the WebSocket layer reports to its connection. Called from the
    library's reader task; must not block."""

    def on_client_message(self) -> None: ...

    def on_pong(self) -> None: ...

    def on_closed(self, code: int) -> None:
        """The peer closed (with ``code``), or the link ended (1006)."""

    def on_refused(self, code: int) -> None:
        """This layer closed the connection with ``code`` because the client
        broke a bound: :data:`MESSAGE_TOO_BIG` (a message over
        ``max_message_size``) or :data:`POLICY_VIOLATION` (frames faster than
        ``max_frame_rate``)."""


class MessageListener(Listener, Protocol):
    """A :class:`Listener` that also takes each whole client message (see
    :meth:`ServerWebSocket.receive`)."""

    def on_message(self, message: str | bytes) -> None: ...


#: RFC 6455 §1.3: the GUID appended to the client's key for the accept hash.
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def valid_key(key: str) -> bool:
    """Whether ``key`` is a base64-encoded 16-byte nonce (RFC 6455 §4.1)."""
    if len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


class _Inert:
    """Stands in, shared by all connections, for what a hub connection never
    uses: the client-message channel, the handshake state machine after the
    upgrade, and events only tests of the library wait on."""

    __slots__ = ()

    async def __aenter__(self) -> _Inert:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    def set(self) -> None:
        pass

    def events(self) -> tuple[()]:
        return ()


_INERT: Final = _Inert()


class _EventQueue(list):  # type: ignore[type-arg]
    """wsproto's per-connection event queue, as a list: it holds at most the
    events of one read, and an empty list is a tenth of an empty deque."""

    __slots__ = ()

    def popleft(self) -> object:
        return self.pop(0)


def _code(reason: Any) -> int:
    code = getattr(reason, "code", None)
    return code if isinstance(code, int) else ABNORMAL_CLOSURE


class _LeanConnection(trio_websocket.WebSocketConnection):
    """A server-side WebSocketConnection that keeps only what the hub uses.

    ``__init__`` deliberately does not call the base one: it sets the
    attributes the base class's methods read, with shared inert objects where
    the base would allocate a channel or an event nobody waits on.
    """

    #: Where whole client messages go (see ServerWebSocket.receive); a class
    #: attribute, so a hub connection, which discards them, pays nothing.
    _on_message: Callable[[str | bytes], None] | None = None
    #: Set while a data frame that ServerWebSocket.try_send wrote in part is
    #: not finished; the library's own frames (pong, close) meanwhile wait in
    #: ``_deferred`` for the send_frames that finishes it. Class attributes
    #: until that happens (try_send, on every delivery, reads neither).
    _unfinished: trio.Event | None = None
    _deferred: bytes = b""

    def __init__(
        self,
        stream: trio.abc.Stream,
        max_message_size: int,
        trailing_data: bytes,
        max_frame_rate: float = 0.0,
    ) -> None:
        self._close_reason: CloseReason | None = None
        #: Client frames allowed per second (burst as large; 0: unlimited),
        #: and their bucket, made at the first frame.
        self._max_frame_rate = max_frame_rate
        self._frames: TokenBucket | None = None
        self._id = 0
        self._stream = stream
        self._stream_lock = trio.StrictFIFOLock()
        # The upgrade is already done (see ServerWebSocket.accept): wsproto
        # starts in the OPEN state, with any bytes the client sent after its
        # request head, and no handshake machine at all.
        self._wsproto = wsproto.WSConnection(ConnectionType.SERVER)
        self._wsproto.handshake = _INERT  # type: ignore[assignment]
        proto = wsproto.connection.Connection(ConnectionType.SERVER, None, trailing_data)
        if not proto._events:
            proto._events = _EventQueue()  # type: ignore[assignment]
        self._wsproto.connection = proto
        self._message_size = 0
        self._message_parts: list[bytes | str] = []
        self._max_message_size = max_message_size
        self._receive_buffer_size = _RECEIVE_BYTES
        self._reader_running = True
        self._initial_request = None
        self._path: str | None = None
        self._subprotocol: str | None = None
        self._handshake_headers: tuple[tuple[bytes, bytes], ...] = ()
        self._reject_status = 0
        self._reject_headers: tuple[tuple[bytes, bytes], ...] = ()
        self._reject_body = b""
        self._send_channel = self._recv_channel = _INERT  # type: ignore[assignment]
        self._pings = None  # type: ignore[assignment]
        self._connection_proposal = None
        self._open_handshake = _INERT  # type: ignore[assignment]
        self._close_handshake = trio.Event()
        self._for_testing_peer_closed_connection = _INERT  # type: ignore[assignment]
        self.listener: Listener | None = None

    def __str__(self) -> str:
        return "websocket"

    def _frame_finished(self) -> None:
        """The socket is at a frame boundary again (or closed)."""
        unfinished = self._unfinished
        if unfinished is not None:
            self._unfinished = None
            self._deferred = b""
            unfinished.set()

    async def _send(self, event: wsproto.events.Event) -> None:
        """The library's own writes (pongs, close frames), never inside a
        data frame that try_send left unfinished (the peer would read them
        as payload and lose the framing): those are handed to the
        send_frames that finishes the frame, which writes them right after.
        (Handed over, not written later by this task: the writer may end,
        and the connection's tasks be cancelled, as soon as it has written.)
        """
        unfinished = self._unfinished
        if unfinished is None:
            await super()._send(event)
            return
        self._deferred += self._wsproto.send(event)
        await unfinished.wait()

    async def _handle_close_connection_event(self, event: wsproto.events.CloseConnection) -> None:
        if self._wsproto.state == ConnectionState.OPEN:
            # Not the peer's close frame (that moves wsproto out of OPEN) but
            # a protocol error wsproto reports as one (1002; 1007 for invalid
            # UTF-8). RFC 6455 §7.1.7: send a close frame with that code
            # before closing the TCP connection; the library only closed it,
            # and the peer saw 1006.
            self._close_reason = CloseReason(event.code, event.reason or None)
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await self._send(event)
        await super()._handle_close_connection_event(event)

    async def _refuse(self, code: int, reason: str) -> None:
        """Close on our own account (the client broke a bound): the close
        frame, then the report (which ends the connection)."""
        self._close_reason = CloseReason(code, reason)
        self._reader_running = False
        try:
            if self._wsproto.state == ConnectionState.OPEN:  # (not if we closed first)
                await self._send(wsproto.events.CloseConnection(code=code, reason=reason))
        finally:  # the close frame first: reporting ends the connection
            if self.listener is not None:
                self.listener.on_refused(code)

    async def _count_frame(self) -> None:
        """Spend one of the client's frames; 1008 beyond ``max_frame_rate``.

        Parsing a frame costs the hub far more than sending it costs the
        client (~14 us for a 6-byte empty continuation frame): without a
        bound, one connection sending them as fast as it can took the whole
        event loop, and what it had sent went on being parsed long after it
        left."""
        if self._max_frame_rate <= 0:
            return
        now = trio.current_time()
        frames = self._frames
        if frames is None:
            rate = self._max_frame_rate
            frames = self._frames = TokenBucket(rate, rate, now=now)
        if not frames.take(now):
            await self._refuse(POLICY_VIOLATION, "too many frames")
            # Stop the reader at once, before the rest of what it has read
            # is parsed (it breaks out on ConnectionClosed).
            raise trio_websocket.ConnectionClosed(self._close_reason)

    async def _handle_message_event(
        self, event: wsproto.events.BytesMessage | wsproto.events.TextMessage
    ) -> None:
        """Count and discard client messages (or assemble them, see
        ServerWebSocket.receive); 1009 past the size limit."""
        if event.frame_finished:
            await self._count_frame()
        data = event.data
        # The limit is in bytes: a text message arrives decoded, and a
        # character may have taken up to 4 of them on the wire.
        self._message_size += len(data.encode()) if isinstance(data, str) else len(data)
        if self._message_size > self._max_message_size:
            self._message_size = 0
            self._message_parts = []
            await self._refuse(
                MESSAGE_TOO_BIG, f"Exceeded maximum message size: {self._max_message_size} bytes"
            )
            return
        on_message = self._on_message
        if on_message is not None:
            if self._close_reason is not None:
                return  # closing: a message now would get no answer
            self._message_parts.append(event.data)  # type: ignore[arg-type]  # bytearray joins too
            if event.message_finished:
                parts, self._message_parts = self._message_parts, []
                self._message_size = 0
                if isinstance(event, wsproto.events.BytesMessage):
                    on_message(b"".join(parts))  # type: ignore[arg-type]
                else:
                    on_message("".join(parts))  # type: ignore[arg-type]
        elif event.message_finished:
            self._message_size = 0
            if self.listener is not None:
                self.listener.on_client_message()

    async def _handle_ping_event(self, event: wsproto.events.Ping) -> None:
        """Answer a ping while the connection is open. Once our close frame
        is sent (the hub is closing it), wsproto sends nothing more: the
        library would answer anyway, and its LocalProtocolError would end
        the reader task with an internal error."""
        await self._count_frame()
        if self._wsproto.state == ConnectionState.OPEN:
            await self._send(event.response())

    async def _handle_pong_event(self, event: wsproto.events.Pong) -> None:
        await self._count_frame()
        if self.listener is not None:
            self.listener.on_pong()

    async def _close_web_socket(self, code: int, reason: str | None = None) -> None:
        self._close_reason = CloseReason(code, reason)
        if self.listener is not None:
            self.listener.on_closed(code)


def _os_socket(stream: trio.abc.Stream) -> socket.socket | None:
    sock = getattr(getattr(stream, "socket", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


class ServerWebSocket:
    """A server-side WebSocket after a successful upgrade."""

    __slots__ = ("_sock", "_ws")

    def __init__(self, ws: _LeanConnection) -> None:
        self._ws = ws
        # The OS socket, for writes that need no waiting (see try_send); None
        # while a frame try_send wrote in part is unfinished.
        self._sock = _os_socket(ws._stream)

    @classmethod
    async def accept(
        cls,
        nursery: trio.Nursery,
        stream: trio.abc.Stream,
        key: str,
        trailing_data: bytes,
        *,
        max_message_size: int,
        max_frame_rate: float = 0.0,
    ) -> ServerWebSocket:
        """Answer an upgrade request that the front door already parsed and
        checked (``key`` is its ``Sec-WebSocket-Key``, ``trailing_data`` what
        the client sent after the head) with ``101 Switching Protocols``, and
        start the library's reader task in ``nursery``.

        The request head is not parsed a second time (by h11 inside wsproto):
        that halves the cost of a handshake and keeps no handshake state.
        No extension (permessage-deflate) and no subprotocol is negotiated.
        A client message over ``max_message_size`` is refused with 1009, and
        client frames beyond ``max_frame_rate`` a second (a burst as large;
        0: unlimited) with 1008 (:meth:`Listener.on_refused`).
        The caller bounds this with a deadline. Raises :class:`WsClosed` when
        the peer is gone.
        """
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept_key(key).encode("ascii")
            + b"\r\n\r\n"
        )
        try:
            await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise WsClosed(ABNORMAL_CLOSURE) from None
        ws = _LeanConnection(stream, max_message_size, trailing_data, max_frame_rate)
        nursery.start_soon(ws._reader_task)
        return cls(ws)

    def listen(self, listener: Listener) -> None:
        """Report client messages, pongs and the end of the connection to
        ``listener`` from now on."""
        self._ws.listener = listener
        reason = self._ws._close_reason
        if reason is not None:
            listener.on_closed(_code(reason))

    def detach(self) -> None:
        """Forget the listener, once the reader task has returned: the
        listener holds this WebSocket, and the cycle would leave the whole
        connection (buffers, parser, socket objects) to the cyclic garbage
        collector, which the hub's tuning runs rarely (tests/test_gc_cycles.py)."""
        self._ws.listener = None
        self._ws._on_message = None

    def receive(self, listener: MessageListener) -> None:
        """Like :meth:`listen`, but assemble each client message (within
        ``max_message_size``) and hand it whole to ``listener.on_message``,
        ``str`` for text and ``bytes`` for binary, instead of counting it.
        The hub does not use this (it discards what clients send); the
        conformance echo endpoint (``tests/autobahn``) does."""
        self._ws._on_message = listener.on_message
        self.listen(listener)

    def try_send(self, data: bytes) -> int:
        """Write what the socket takes *now*, without waiting or yielding:
        the number of bytes written (0 when its buffer is full), or -1 when
        this cannot be done synchronously (no OS socket, the library is
        writing a control frame, or closing started). Most deliveries finish
        here, with one system call and no task switch.

        ``data`` ends at a frame boundary (whole frames, or the rest of one
        and whole frames). What is not written must be passed next, by
        :meth:`send_frames`: until then the library's own frames wait."""
        ws = self._ws
        sock = self._sock
        if sock is None or ws._close_reason is not None or ws._stream_lock.locked():
            return -1
        try:
            n = sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            return -1  # the writer's path meets the error and ends the connection
        if n < len(data) and n:  # until send_frames writes the rest:
            self._sock = None  # no more try_send
            ws._unfinished = trio.Event()  # the library's frames wait
        return n

    async def send_frames(self, data: bytes) -> None:
        """Write ready-made server frames (see :mod:`smapws._core.frames`,
        :data:`PING_FRAME`).

        Raises :class:`WsClosed` when closing has started (unless ``data``
        finishes a frame that :meth:`try_send` wrote in part: the close frame
        waits for it) or the peer is gone.
        """
        ws = self._ws
        async with ws._stream_lock:
            if ws._close_reason is not None and ws._unfinished is None:
                raise WsClosed(_code(ws._close_reason))
            try:
                await ws._stream.send_all(data)
                if ws._deferred:  # the library's frames that waited for this one
                    await ws._stream.send_all(ws._deferred)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                ws._frame_finished()
                await ws._abort_web_socket()
                raise WsClosed(ABNORMAL_CLOSURE) from None
            if ws._unfinished is not None:
                ws._frame_finished()
                self._sock = _os_socket(ws._stream)

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame and wait for the peer's; closes the TCP
        connection in any case. Bound it with a deadline: a peer that never
        answers is waited for until cancelled."""
        await self._ws.aclose(code, reason)

    async def abort(self) -> None:
        """Close the TCP connection now, without a close handshake."""
        self._ws._frame_finished()  # nothing more is written
        with trio.CancelScope(shield=True):
            await self._ws._close_stream()
