"""smapws._io.connection on a real loopback TCP connection: the front door
serves one accepted socket (``frontdoor.handle``), driven by a hand-written
client (masked frames built here, server frames read with ``parse_frames``),
so each test sees the exact bytes. The protocol's own cases, without
sockets, are tests/test_core_wsconn.py's.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio.testing

from smapws._io import frontdoor
from smapws._io.app import App
from smapws._io.brokers.memory import MemoryBroker

from .conftest import make_config, parse_frames, token

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
UPGRADE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Cookie: access_token={token}\r\n\r\n"
)


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

    def frames(self) -> list[tuple[int, bytes]]:
        head, _, rest = bytes(self.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        return parse_frames(rest)


@dataclass
class Conn:
    app: App
    client: Client

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.app.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@asynccontextmanager
async def connected(*, small_buffers: bool = False) -> AsyncIterator[Conn]:
    """The hub's front door serving one real TCP connection, upgraded for
    user u1, the client reading everything the server sends (from the 101
    on). ``small_buffers``: the server's send buffer and the client's
    receive buffer are made small, so a large frame is written in part."""
    config = make_config(SMAPWS_MAX_MESSAGE_BYTES=2 << 20, SMAPWS_SEND_QUEUE_BYTES=4 << 20)
    app = App(config, MemoryBroker())
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
    async with client.stream, trio.open_nursery() as nursery:
        nursery.start_soon(frontdoor.handle, app, server_stream)
        nursery.start_soon(client.read)
        await client.stream.send_all(UPGRADE.format(token=token("u1")).encode())
        with trio.fail_after(5):
            while app.hub.active_connections < 1:
                await trio.sleep(0.005)
        yield Conn(app, client)
        nursery.cancel_scope.cancel()


def close_code(frame: tuple[int, bytes]) -> int:
    opcode, payload = frame
    assert opcode == CLOSE
    code: int = struct.unpack("!H", payload[:2])[0]
    return code


async def test_client_messages_are_counted_and_discarded() -> None:
    async with connected() as c:
        await c.client.stream.send_all(
            client_frame(TEXT, "hé".encode(), fin=False)
            + client_frame(0x0, b"llo")
            + client_frame(BINARY, b"\x00\xff")
        )
        with trio.fail_after(5):
            while c.sample("websocket_client_messages_total") < 2:
                await trio.sleep(0.005)
        await c.client.stream.send_all(client_frame(PING, b"still open"))
        with trio.fail_after(5):
            while not c.client.received.endswith(b"still open"):
                await trio.sleep(0.005)
        assert c.client.frames() == [(PONG, b"still open")]  # nothing else was answered


async def test_a_protocol_error_is_answered_with_a_close_frame() -> None:
    # RFC 6455 §7.1.7: an endpoint that fails the connection SHOULD send a
    # close frame with the reason's code first (not only close the TCP
    # connection, which the client would see as 1006).
    cases = [
        (client_frame(TEXT, b"hi", rsv=2), 1002),
        (client_frame(TEXT, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xed\xa0\x80"), 1007),
        (client_frame(PING, b"x" * 126), 1002),
    ]
    for bad, code in cases:
        async with connected() as c:
            await c.client.stream.send_all(bad)
            with trio.fail_after(5):
                await c.client.eof.wait()  # the server closed its side
            # ... and lingers for the client's (counted as the front door's
            # lingering closes are), out of the hub's tables.
            assert len(c.app.lingering) == 1 and c.app.hub.active_connections == 0
        frames = c.client.frames()
        assert len(frames) == 1
        assert close_code(frames[0]) == code
        closed = {"cause": "client_closed"}
        assert c.sample("websocket_connections_closed_total", closed) == 1


BIG = 1 << 20


def route_big(c: Conn) -> None:
    """Deliver a message of :data:`BIG` bytes, which the socket takes only
    in part (the router's write stops there; the task writes the rest)."""
    data = json.dumps({"type": "notification", "payload": {"pad": "x" * BIG}}).encode()
    now = trio.current_time()
    assert c.app.route(b"user_noti:u1", data, wall_time=time.time(), now=now) == 1
    assert c.sample("websocket_messages_sent_total") == 0  # not written whole yet


async def test_a_pong_waits_for_a_data_frame_written_in_part() -> None:
    # A pong for a ping read while a frame is half written must not land
    # inside that frame: the client would read it as payload and lose the
    # framing.
    async with connected(small_buffers=True) as c:
        route_big(c)
        await c.client.stream.send_all(client_frame(PING, b"ping!"))
        with trio.fail_after(10):
            while not c.client.received.endswith(b"ping!"):
                await trio.sleep(0.005)
        ((op, payload), pong) = c.client.frames()
        assert (op, len(payload) > BIG) == (TEXT, True)
        assert pong == (PONG, b"ping!")
        assert c.sample("websocket_messages_sent_total") == 1


async def test_the_close_answer_follows_a_data_frame_written_in_part() -> None:
    # The peer's close frame, or a protocol error, while a frame is half
    # written: the frame is finished, then the close frame goes out.
    closing = [
        (client_frame(CLOSE, struct.pack("!H", 1000)), 1000),
        (client_frame(TEXT, b"hi", rsv=4), 1002),
    ]
    for close, code in closing:
        async with connected(small_buffers=True) as c:
            route_big(c)
            await c.client.stream.send_all(close)
            with trio.fail_after(10):
                await c.client.eof.wait()
        frames = c.client.frames()
        assert frames[0][0] == TEXT and len(frames[0][1]) > BIG
        assert len(frames) == 2
        assert close_code(frames[1]) == code
