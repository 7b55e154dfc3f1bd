"""smapws._io.ws on its own: a ServerWebSocket over a real loopback TCP
connection, driven by a hand-written client (masked frames built here, server
frames read with ``parse_frames``), so each test sees the exact bytes.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from smapws._core.frames import text_frame
from smapws._io.ws import ServerWebSocket, WsClosed

from .conftest import parse_frames

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """One masked client frame (RFC 6455 §5.2)."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Events:
    """A MessageListener that records what the WebSocket layer reports."""

    def __init__(self) -> None:
        self.messages: list[str | bytes] = []
        self.counted = 0
        self.pongs = 0
        self.closed: list[int] = []

    def on_message(self, message: str | bytes) -> None:
        self.messages.append(message)

    def on_client_message(self) -> None:
        self.counted += 1

    def on_pong(self) -> None:
        self.pongs += 1

    def on_closed(self, code: int) -> None:
        self.closed.append(code)


class Client:
    """The client side of the connection, reading in its own task."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = bytearray()
        self.eof = trio.Event()

    async def read(self) -> None:
        while chunk := await self.stream.receive_some(65536):
            self.received += chunk
        self.eof.set()

    async def wait_frames(self, n: int) -> None:
        """Until ``n`` whole frames came after the 101 response."""
        with trio.fail_after(10):
            while True:
                try:
                    if len(self.frames()) >= n:
                        return
                except AssertionError:  # a frame not whole yet
                    pass
                await trio.sleep(0.005)

    def frames(self) -> list[tuple[int, bytes]]:
        head, _, rest = bytes(self.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        return parse_frames(rest)


@dataclass
class Conn:
    ws: ServerWebSocket
    client: Client
    events: Events
    #: The scope of the server side's tasks (the library's reader), which the
    #: hub cancels as soon as the connection's writer ends.
    server: trio.CancelScope


@asynccontextmanager
async def connected(*, receive: bool = True, small_buffers: bool = False) -> AsyncIterator[Conn]:
    """A ServerWebSocket accepted on a real TCP connection, the client reading
    everything the server sends. ``small_buffers``: the server's send buffer
    and the client's receive buffer are made small, so a large frame is
    written in part."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    sock = trio.socket.socket()
    if small_buffers:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    client = Client(trio.SocketStream(sock))
    server_stream = await listeners[0].accept()
    await listeners[0].aclose()
    if small_buffers:
        server_stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    events = Events()

    async def server(
        task_status: trio.TaskStatus[tuple[ServerWebSocket, trio.CancelScope]],
    ) -> None:
        async with trio.open_nursery() as nursery:  # the reader's, not the test's
            ws = await ServerWebSocket.accept(
                nursery, server_stream, KEY, b"", max_message_size=1 << 20
            )
            if receive:
                ws.receive(events)
            else:
                ws.listen(events)
            task_status.started((ws, nursery.cancel_scope))

    async with client.stream, server_stream, trio.open_nursery() as nursery:
        nursery.start_soon(client.read)
        ws, scope = await nursery.start(server)
        yield Conn(ws, client, events, scope)
        nursery.cancel_scope.cancel()


async def test_receive_hands_over_whole_messages_text_and_binary() -> None:
    async with connected() as c:
        await c.client.stream.send_all(
            client_frame(TEXT, "hé".encode(), fin=False)
            + client_frame(0x0, b"llo")
            + client_frame(BINARY, b"\x00\xff")
        )
        with trio.fail_after(5):
            while len(c.events.messages) < 2:
                await trio.sleep(0.005)
    assert c.events.messages == ["héllo", b"\x00\xff"]
    assert c.events.counted == 0


async def test_listen_only_counts_messages() -> None:
    async with connected(receive=False) as c:
        await c.client.stream.send_all(client_frame(TEXT, b"hi") + client_frame(BINARY, b"x"))
        with trio.fail_after(5):
            while c.events.counted < 2:
                await trio.sleep(0.005)
    assert c.events.messages == []


def close_code(frame: tuple[int, bytes]) -> int:
    opcode, payload = frame
    assert opcode == CLOSE
    code: int = struct.unpack("!H", payload[:2])[0]
    return code


async def test_a_protocol_error_is_answered_with_a_close_frame() -> None:
    # RFC 6455 §7.1.7: an endpoint that fails the connection SHOULD send a
    # close frame with the reason's code first. wsproto turns the error into
    # a close event; trio-websocket then closed the TCP connection only, so
    # the client saw 1006 instead of 1002 (reserved bit) / 1007 (bad UTF-8).
    cases = [
        (client_frame(TEXT, b"hi", rsv=2), 1002),
        (client_frame(TEXT, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xed\xa0\x80"), 1007),
        (client_frame(PING, b"x" * 126), 1002),
    ]
    for bad, code in cases:
        async with connected() as c:
            await c.client.stream.send_all(bad)
            with trio.fail_after(5):
                await c.client.eof.wait()  # the server closed the TCP connection
        frames = c.client.frames()
        assert len(frames) == 1
        assert close_code(frames[0]) == code
        assert c.events.closed == [code]


BIG = b"x" * (1 << 20)


def half_written(ws: ServerWebSocket) -> bytes:
    """Write a text frame of :data:`BIG` in part (as the hub's router does
    when the socket takes only some); return the rest, for send_frames."""
    frame = text_frame(BIG)
    sent = ws.try_send(frame)
    assert 0 < sent < len(frame)
    assert ws.try_send(b"\x81\x00") == -1  # nothing else goes in between
    return frame[sent:]


async def test_a_pong_waits_for_a_data_frame_written_in_part() -> None:
    # A pong that the library's reader sends while a frame is half written
    # must not land inside that frame: the client would read it as payload
    # and lose the framing (it did).
    async with connected(small_buffers=True) as c:
        rest = half_written(c.ws)
        await c.client.stream.send_all(client_frame(PING, b"ping!"))
        await trio.testing.wait_all_tasks_blocked(0.05)  # the reader saw the ping
        await c.ws.send_frames(rest)
        await c.client.wait_frames(2)
    assert c.client.frames() == [(TEXT, BIG), (PONG, b"ping!")]


async def test_the_close_answer_follows_a_data_frame_written_in_part() -> None:
    # The peer's close frame, or a protocol error, while a frame is half
    # written: the frame is finished (send_frames writes the rest though
    # closing started), then the close frame goes out, even though the
    # writer ends right after (its next write raises WsClosed) and, as in the
    # hub, the connection's tasks are cancelled at once.
    closing = [
        (client_frame(CLOSE, struct.pack("!H", 1000)), 1000),
        (client_frame(TEXT, b"hi", rsv=4), 1002),
    ]
    for close, code in closing:
        async with connected(small_buffers=True) as c:
            rest = half_written(c.ws)
            await c.client.stream.send_all(close)
            await trio.testing.wait_all_tasks_blocked(0.05)  # the reader saw it
            await c.ws.send_frames(rest)
            with pytest.raises(WsClosed):
                await c.ws.send_frames(text_frame(b"late"))
            c.server.cancel()
            await c.client.wait_frames(2)
        frames = c.client.frames()
        assert frames[0] == (TEXT, BIG)
        assert len(frames) == 2
        assert close_code(frames[1]) == code
        assert c.events.closed == [code]
