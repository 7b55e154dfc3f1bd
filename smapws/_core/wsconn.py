"""One upgraded server-side WebSocket, as a sans-IO state machine.

Bytes in, events and bytes out, time passed in (the model is hypercorn's
``WSStream`` around wsproto's ``Connection``). The front door answered the
upgrade (:func:`handshake_response`), so the machine starts OPEN. It owns
everything one connection of the hub holds:

- the user and the token's expiry, the send queue (:class:`Outbox`), and the
  heartbeat deadlines: :meth:`WsConn.tick` queues a ping every
  ``ping_interval``, closes with 1011 when its pong has not come within
  ``pong_wait``, with 1008 once the token has expired;
- wsproto's frame parser (its public ``wsproto.connection.Connection``):
  pings are answered, client messages counted (or, for the conformance echo,
  assembled), and the client's bounds enforced: a message over
  ``max_message_bytes`` is refused with 1009, frames faster than
  ``max_frame_rate`` a second (a burst as large) with 1008, a malformed frame
  with 1002 (1007 for invalid UTF-8), each with a close frame before the end;
- the close state, stored once (:class:`Close`: who closed, code, reason, and
  the cause the hub counts);
- one output buffer of whole frames: the router's ready-made data frames
  (server frames are unmasked, so one encoding serves every socket), pings,
  pongs and the close frame are appended whole, so a control frame can never
  land inside a data frame, however the socket takes the bytes
  (:meth:`WsConn.data_to_send`, then :meth:`WsConn.sent` with what it took).

The I/O shell (``smapws._io.connection``) reads the socket into
:meth:`WsConn.receive_data`, writes :meth:`WsConn.data_to_send`, and closes
the socket once :attr:`WsConn.finished` and the output is written.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Final, NamedTuple, cast

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from smapws._core.closecodes import CloseCode
from smapws._core.envelope import Envelope
from smapws._core.outbox import OVERFLOW, QUEUED, Outbox, OutboxLimits, Push
from smapws._core.ratelimit import TokenBucket

#: A server ping with an empty payload: unmasked, FIN, opcode 0x9, length 0.
PING_FRAME: Final = b"\x89\x00"

#: What :meth:`WsConn.offer` returns for a connection already closing (falsy).
REFUSED: Final = Push(0)

#: RFC 6455 §1.3: the GUID appended to the client's key for the accept hash.
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: A client's close frame (masked, empty): what :meth:`WsConn.release` feeds
#: wsproto's parser so that it runs to its end.
_CLIENT_CLOSE: Final = b"\x88\x80\x00\x00\x00\x00"


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


def handshake_response(key: str) -> bytes:
    """The ``101 Switching Protocols`` answer to an upgrade the front door
    parsed and checked (no extension, no subprotocol negotiated)."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
        + accept_key(key).encode("ascii")
        + b"\r\n\r\n"
    )


@dataclass(frozen=True, slots=True)
class WsLimits:
    """The bounds and periods every connection of a hub shares (one object).
    ``max_frame_rate`` 0: unlimited."""

    ping_interval: float
    pong_wait: float
    max_message_bytes: int
    max_frame_rate: float = 0.0


class Close(NamedTuple):
    """How a connection ended (or is ending): stored once."""

    #: The close frame's code: the one we sent, or the peer's; 1006 when the
    #: link ended without one.
    code: int
    reason: str
    #: Whether the peer closed first (or the link ended), rather than us.
    by_peer: bool
    #: The word the hub counts (``websocket_connections_closed_total{cause}``).
    cause: str


class Message(NamedTuple):
    """A whole client message: ``data`` with ``assemble=True``, else None
    (counted and discarded: the hub reads nothing from its clients)."""

    data: str | bytes | None


class Closed(NamedTuple):
    """The connection is closing or closed; reported once."""

    close: Close


Event = Message | Closed

_COUNTED: Final = Message(None)
_NOTHING: Final[tuple[Event, ...]] = ()


class WsConn:
    """One WebSocket after the 101 (see the module docstring). Synchronous,
    never raises on what the client sends."""

    __slots__ = (
        "_assemble",
        "_backlog",
        "_control",
        "_ends",
        "_envs",
        "_failing",
        "_frames",
        "_limits",
        "_next",
        "_next_ends",
        "_next_envs",
        "_out",
        "_parts",
        "_proto",
        "_queued_total",
        "_sent_total",
        "_size",
        "close",
        "expires_at",
        "finished",
        "next_ping",
        "outbox",
        "ping_sent_at",
        "user_id",
    )

    def __init__(
        self,
        user_id: str,
        limits: WsLimits,
        outbox: OutboxLimits,
        *,
        now: float,
        expires_at: float | None = None,
        assemble: bool = False,
    ) -> None:
        self.user_id = user_id
        #: When the token expires (None: never closed for it).
        self.expires_at = expires_at
        self.outbox = Outbox(outbox)
        self._backlog = False  # something in the outbox (cheaper than its len())
        #: How it ended; None while open.
        self.close: Close | None = None
        #: Nothing more will be read: once the output is written, the socket
        #: is closed.
        self.finished = False
        self.next_ping = now + limits.ping_interval
        self.ping_sent_at: float | None = None
        self._limits = limits
        self._assemble = assemble
        self._proto = Connection(ConnectionType.SERVER)
        #: Output handed out by data_to_send and not all sent yet.
        self._out = b""
        #: Pings and pongs since: first in the next data_to_send (before the
        #: data frames not handed out yet, after what was).
        self._control = b""
        #: Data and close frames since, in order; the envelopes among them
        #: and where their frames end in it.
        self._next = b""
        self._next_envs: list[Envelope] | None = None
        self._next_ends: list[int] | None = None
        #: The close frame of a read that failed the connection (1002,
        #: 1007, 1008, 1009): joins the output at the next data_to_send.
        self._failing = b""
        self._sent_total = 0  # bytes of output the socket took, ever
        self._queued_total = 0  # bytes ever put in the output
        #: Envelopes in the output, and where (in bytes ever queued) each
        #: one's frame ends; None when there are none.
        self._envs: list[Envelope] | None = None
        self._ends: list[int] | None = None
        self._frames: TokenBucket | None = None  # made at the first frame
        self._size = 0  # bytes of the client message being received
        self._parts: list[str | bytes] | None = None

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray, now: float) -> tuple[Event, ...] | list[Event]:
        """Feed bytes read from the socket (``b""``: the peer closed the TCP
        connection). Returns what the client did; the answers (pongs, close
        frames) are in :meth:`data_to_send`."""
        if self.finished:
            return _NOTHING
        if not data:
            self.finished = True
            if self.close is None:
                self.close = Close(CloseCode.ABNORMAL, "", True, "client_closed")
                return [Closed(self.close)]
            return _NOTHING
        proto = self._proto
        before = self.close
        proto.receive_data(data if isinstance(data, bytes) else bytes(data))
        events: list[Event] = []
        it = proto.events()
        for event in it:
            if isinstance(event, TextMessage | BytesMessage):
                if event.frame_finished and not self._count_frame(now):
                    break
                if not self._message(event, events):
                    break
            elif isinstance(event, Ping):
                if not self._count_frame(now):
                    break
                if proto.state is ConnectionState.OPEN:
                    self._control += proto.send(event.response())
            elif isinstance(event, Pong):
                if not self._count_frame(now):
                    break
                self.ping_sent_at = None
            elif isinstance(event, CloseConnection):
                self._peer_close(event)
                # On to the end of the events: wsproto's parser (a generator)
                # then returns, and frees itself (see :meth:`release`).
                for _ in it:
                    pass
                break
        if before is None and self.close is not None:
            events.append(Closed(self.close))
        return events or _NOTHING

    def _message(self, event: TextMessage | BytesMessage, events: list[Event]) -> bool:
        data = event.data
        # The limit is in bytes: a text message arrives decoded, and a
        # character may have taken up to 4 of them on the wire.
        if isinstance(data, str):
            self._size += len(data) if data.isascii() else len(data.encode())
        else:
            self._size += len(data)
        limit = self._limits.max_message_bytes
        if self._size > limit:
            self._size = 0
            self._parts = None
            self._fail(
                CloseCode.TOO_BIG,
                f"Exceeded maximum message size: {limit} bytes",
                "message_too_big",
            )
            return False
        if self.close is not None:
            return True  # closing: a message now gets no answer
        if self._assemble:
            parts = self._parts
            if parts is None:
                parts = self._parts = []
            parts.append(bytes(data) if isinstance(data, bytearray) else data)
            if event.message_finished:
                self._parts = None
                self._size = 0
                if isinstance(event, BytesMessage):
                    events.append(Message(b"".join(cast("list[bytes]", parts))))
                else:
                    events.append(Message("".join(cast("list[str]", parts))))
        elif event.message_finished:
            self._size = 0
            events.append(_COUNTED)
        return True

    def _count_frame(self, now: float) -> bool:
        """Spend one of the client's frames; False (and 1008) beyond
        ``max_frame_rate``.

        Parsing a frame costs the hub far more than sending it costs the
        client (~14 us for a 6-byte empty continuation frame): without a
        bound, one connection sending them as fast as it can took the whole
        event loop. Past the bound the rest of what was read is not parsed."""
        rate = self._limits.max_frame_rate
        if rate <= 0:
            return True
        frames = self._frames
        if frames is None:
            frames = self._frames = TokenBucket(rate, rate, now=now)
        if frames.take(now):
            return True
        self._fail(CloseCode.POLICY, "too many frames", "frame_rate")
        return False

    def _peer_close(self, event: CloseConnection) -> None:
        proto = self._proto
        self.finished = True
        if proto.state is ConnectionState.REMOTE_CLOSING:
            # The peer closed first: answer with its code, and drop what is
            # queued (it reads no more).
            self._append(proto.send(event.response()))
            if self.close is None:
                self.close = Close(event.code, event.reason or "", True, "client_closed")
        elif proto.state is ConnectionState.OPEN:
            # Not a close frame but a protocol error wsproto reports as one
            # (1002; 1007 for invalid UTF-8). RFC 6455 §7.1.7: send a close
            # frame with that code before closing the TCP connection.
            self._failing = proto.send(CloseConnection(event.code, event.reason or ""))
            if self.close is None:
                self.close = Close(event.code, event.reason or "", False, "client_closed")
        # Else our close frame was answered (CLOSED), or the peer broke the
        # protocol after it (LOCAL_CLOSING): the close is already recorded.

    def _fail(self, code: int, reason: str, cause: str) -> None:
        """Close on our own account because the client broke a bound: the
        close frame, and no more reading (the rest is not parsed)."""
        self.finished = True
        if self._proto.state is ConnectionState.OPEN:
            self._failing = self._proto.send(CloseConnection(code, reason))
        if self.close is None:
            self.close = Close(code, reason, False, cause)

    # -- the hub's side (never waits) --------------------------------------

    def offer(self, envelope: Envelope, *, direct: bool = False) -> Push:
        """Queue ``envelope`` under the delivery policy
        (:mod:`smapws._core.outbox`). On :data:`OVERFLOW` nothing is queued
        and the connection closes with 1013 after what is queued: the client
        reconnects and gets the current state. A closing connection queues
        nothing and returns :data:`REFUSED`.

        When nothing waits, the frame is the output at once, without a pass
        through the queue; ``direct``: the caller writes it right away (it
        calls :meth:`data_to_send` next), so it is handed out already."""
        if self.close is not None:
            return REFUSED
        if not self._out and not self._next and not self._backlog:
            frame = envelope.frame
            if direct and not self._control:
                self._out = frame
                self._queued_total += len(frame)
                self._envs = [envelope]
                self._ends = [self._queued_total]
            else:
                self._next = frame
                self._next_envs = [envelope]
                self._next_ends = [len(frame)]
            return QUEUED
        result = self.outbox.push(envelope)
        self._backlog = True  # (maybe empty after a refusal: _take_outbox copes)
        # (QUEUED first: IntFlag's & builds a new member through the enum's
        # metaclass, a microsecond, more than the push.)
        if result is not QUEUED and result & OVERFLOW:
            self.close_with(CloseCode.TRY_AGAIN_LATER, "slow consumer", cause="slow_consumer")
        return result

    def send_frame(self, frame: bytes) -> None:
        """Append a whole ready-made data frame to the output, after what is
        queued (the conformance echo's path; the hub offers envelopes). Also
        right after a read that failed the connection: answers to the
        messages before the bad frame go out before the close frame."""
        if self.close is None:
            self._take_outbox()
            self._append(frame)
        elif self._failing:
            self._append(frame)

    def tick(self, now: float) -> None:
        """One heartbeat tick (see the module docstring); the hub calls it
        for every connection about once a second."""
        if self.close is not None:
            return
        if self.expires_at is not None and now >= self.expires_at:
            self.close_with(CloseCode.POLICY, "token expired", cause="token_expired")
        elif self.ping_sent_at is not None and now >= self.ping_sent_at + self._limits.pong_wait:
            self.close_with(CloseCode.INTERNAL, "pong timeout", cause="pong_timeout")
        elif now >= self.next_ping:
            self.next_ping = max(self.next_ping + self._limits.ping_interval, now)
            if self.ping_sent_at is None:  # one ping in flight at a time
                self.ping_sent_at = now
                self._control += PING_FRAME

    def close_with(self, code: int, reason: str, *, cause: str) -> bool:
        """Close with ``code`` after what is queued, then read until the
        peer's close frame answers (the shell bounds that wait). The first
        close wins: False when one was already recorded."""
        if self.close is not None:
            return False
        self.close = Close(code, reason, False, cause)
        if self._proto.state is ConnectionState.OPEN:
            self._take_outbox()
            self._append(self._proto.send(CloseConnection(code, reason)))
        return True

    def release(self) -> None:
        """Let wsproto's frame parser run to its end: the connection is over
        and nothing more is read. (Call it once the socket is done with;
        whatever the peer sent and was not read stays unread.)

        The parser is a generator that refers to the object it parses for:
        until it returns, the two are a reference cycle, which only the
        cyclic garbage collector frees, and the hub runs a full collection
        rarely (``smapws._runtime.tune_gc``). It returns after a close frame
        (read on to the end in :meth:`receive_data`) or a protocol error; a
        connection that ended otherwise (the peer dropped the TCP connection,
        a write timed out, our close frame was not answered) is fed a
        client's close frame here, through wsproto's public API. A parser
        that does not find it next stays for the collector: one left in the
        middle of a frame (a client that broke off inside one) takes it as
        payload, and one that a bound stopped (1008 for the frame rate, 1009)
        would first parse the rest of that read, which the bound refused to
        parse (up to 4 KiB of 6-byte frames: 20 times the frame rate's
        burst). Produces no output and no events."""
        proto = self._proto
        if proto.state in (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING):
            proto.receive_data(_CLIENT_CLOSE)
            for event in proto.events():
                if not isinstance(event, CloseConnection):
                    break  # not ours (see above): parse no further

    def abort(self, cause: str) -> int:
        """The link is unusable (a write blocked past its deadline, the peer
        reset it): nothing more is read or written. Returns how many
        envelopes of the output were not written (those still queued stay in
        :attr:`outbox`)."""
        self.finished = True
        if self.close is None:
            self.close = Close(CloseCode.ABNORMAL, "", False, cause)
        lost = (len(self._envs) if self._envs else 0) + (
            len(self._next_envs) if self._next_envs else 0
        )
        self._envs = self._ends = self._next_envs = self._next_ends = None
        self._sent_total = self._queued_total
        self._out = self._control = self._next = self._failing = b""
        return lost

    # -- output ------------------------------------------------------------

    def _append(self, frame: bytes) -> None:
        self._next = self._next + frame if self._next else frame

    def _take_outbox(self) -> None:
        if not self._backlog:
            return
        self._backlog = False
        items = self.outbox.take_all()
        if not items:
            return
        envs, ends = self._next_envs, self._next_ends
        if envs is None or ends is None:
            envs, ends = self._next_envs, self._next_ends = [], []
        end = len(self._next)
        for env in items:
            end += len(env.frame)
            ends.append(end)
        envs.extend(items)
        self._append(items[0].frame if len(items) == 1 else b"".join([e.frame for e in items]))

    def has_output(self) -> bool:
        """Whether anything waits to be written (output, or queued)."""
        return (
            bool(self._out)
            or bool(self._control)
            or bool(self._next)
            or bool(self._failing)
            or (self.close is None and self._backlog)
        )

    def data_to_send(self) -> bytes:
        """Everything to write now, whole frames: what the last call returned
        and the socket did not take yet, pings and pongs, then the data
        frames (the queued messages join here, once the last call's output
        is written) and a close frame. Stays the output until :meth:`sent`
        says how much the socket took."""
        if self.close is None:
            if self._backlog and not self._out:
                # Queued messages join only once the output is written: while
                # the socket is full they stay under the queue's policy and
                # bounds (conflation, 1013), not in an unbounded buffer.
                self._take_outbox()
        elif self._failing:
            self._append(self._failing)
            self._failing = b""
        control, nxt = self._control, self._next
        if control or nxt:
            added = control + nxt if control else nxt
            envs = self._next_envs
            if envs is not None and self._next_ends is not None:
                base = self._queued_total + len(control)
                nends = self._next_ends
                # (One envelope is the common case: no comprehension for it.)
                ends = [base + nends[0]] if len(nends) == 1 else [base + e for e in nends]
                if self._envs is None or self._ends is None:
                    self._envs, self._ends = envs, ends
                else:
                    self._envs.extend(envs)
                    self._ends.extend(ends)
                self._next_envs = self._next_ends = None
            self._out = self._out + added if self._out else added
            self._queued_total += len(added)
            self._control = self._next = b""
        return self._out

    def sent(self, n: int) -> list[Envelope] | tuple[()]:
        """The socket took the first ``n`` bytes of :meth:`data_to_send`.
        Returns the envelopes whose frames are now written whole."""
        if n <= 0:
            return ()
        out = self._out
        envs = self._envs
        if n >= len(out):  # all of it (the common case)
            self._out = b""
            self._sent_total = self._queued_total
            if envs is None:
                return ()
            self._envs = self._ends = None
            return envs
        self._out = out[n:]
        self._sent_total += n
        ends = self._ends
        if envs is None or ends is None:
            return ()
        done = self._sent_total
        i = 0
        # Not past the list: what is left may be a ping or the close frame
        # after the last envelope, every envelope written whole.
        last = len(ends)
        while i < last and ends[i] <= done:
            i += 1
        if not i:
            return ()
        if i == last:
            self._envs = self._ends = None
            return envs
        written = envs[:i]
        del envs[:i]
        del ends[:i]
        return written
