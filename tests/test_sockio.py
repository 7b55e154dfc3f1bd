"""The socket helpers of the front door and the connections (smapws._io.sockio),
on real sockets (a socketpair), and a real-socket write that the peer never
takes, abandoned after SMAPWS_WRITE_WAIT on the MockClock."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from smapws import Server, serve
from smapws._io import frontdoor, sockio
from smapws._io.app import App
from tests.conftest import http, make_config, token
from tests.test_websocket import UPGRADE_HEAD, memory_app, route, running

Pair = tuple[trio.SocketStream, trio.SocketStream]


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """Two connected socket streams (AF_UNIX: what the helpers do is the same
    for TCP), both closed at the end."""
    a, b = trio.socket.socketpair()
    streams = trio.SocketStream(a), trio.SocketStream(b)
    try:
        yield streams
    finally:
        for stream in streams:
            await stream.aclose()


async def test_bytes_waiting_are_read_without_a_checkpoint(pair: Pair) -> None:
    """What the kernel holds already is returned at once: no pass through
    the scheduler (the cost this module exists to avoid)."""
    ours, peer = pair
    await peer.send_all(b"hello")
    await trio.testing.wait_all_tasks_blocked()
    fd = sockio.fd_of(ours)
    with trio.testing.assert_no_checkpoints():
        assert await sockio.receive_some(ours, fd, 4096) == b"hello"
        await sockio.send_all(ours, fd, b"answer")
    assert await peer.receive_some(4096) == b"answer"


async def test_a_read_waits_for_bytes_and_sees_the_end(pair: Pair) -> None:
    ours, peer = pair
    fd = sockio.fd_of(ours)
    got: list[bytes | bytearray] = []

    async def read() -> None:
        got.append(await sockio.receive_some(ours, fd, 4096))
        got.append(await sockio.receive_some(ours, fd, 4096))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # waiting, not spinning
        await peer.send_all(b"late")
        await trio.testing.wait_all_tasks_blocked()
        await peer.aclose()
    assert got == [b"late", b""]


async def test_a_large_write_waits_for_the_peer_and_arrives_whole(pair: Pair) -> None:
    ours, peer = pair
    data = bytes(range(256)) * 16384  # 4 MiB: far beyond the socket buffers
    received = bytearray()

    async def drain() -> None:
        while len(received) < len(data):
            received.extend(await peer.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await sockio.send_all(ours, sockio.fd_of(ours), data)
    assert received == data


async def test_a_reset_peer_is_a_broken_stream(pair: Pair) -> None:
    ours, peer = pair
    fd = sockio.fd_of(ours)
    await sockio.send_all(ours, fd, b"x")  # unread by the peer: its close resets
    peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await peer.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # EPIPE or ECONNRESET, on the first write or a later one
            await sockio.send_all(ours, fd, b"y" * 65536)


async def test_a_socket_closed_while_waiting_is_a_closed_stream(pair: Pair) -> None:
    ours, _peer = pair
    fd = sockio.fd_of(ours)
    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sockio.receive_some, ours, fd, 4096)
            await trio.testing.wait_all_tasks_blocked()
            await ours.aclose()
    assert info.group_contains(trio.ClosedResourceError)
    assert sockio.fd_of(ours) == -1


async def test_a_stream_without_a_socket_uses_its_own_methods(pair: Pair) -> None:
    left, right = trio.testing.memory_stream_pair()
    assert sockio.fd_of(left) == -1
    await sockio.send_all(left, -1, b"ping")
    assert await sockio.receive_some(right, -1, 4096) == b"ping"
    await sockio.send_eof(left, -1)  # not half-closeable: nothing to do
    ours, peer = pair
    await sockio.send_eof(ours, -1)  # a socket stream given no descriptor: its own send_eof
    assert await peer.receive_some(4096) == b""


async def test_send_eof_half_closes_a_socket(pair: Pair) -> None:
    ours, peer = pair
    fd = sockio.fd_of(ours)
    await sockio.send_eof(ours, fd)
    assert await peer.receive_some(4096) == b""
    await peer.send_all(b"still open that way")
    assert await sockio.receive_some(ours, fd, 4096) == b"still open that way"


async def upgraded(app: App, nursery: trio.Nursery, pair: Pair) -> None:
    """``pair``'s client upgraded as u1 through the front door, its 101 read."""
    client, server_side = pair
    nursery.start_soon(frontdoor.handle, app, server_side)
    head = UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={token('u1')}\r\n")
    await client.send_all(head.encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await client.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 101")


async def test_a_real_socket_write_the_peer_never_takes_is_abandoned(
    autojump_clock: trio.testing.MockClock, pair: Pair
) -> None:
    """A tab on a real socket that stops reading: the direct writes fill the
    kernel's buffers, the connection's task waits to write the rest, and
    after SMAPWS_WRITE_WAIT it drops the connection (write_timeout)."""
    app = memory_app(SMAPWS_WRITE_WAIT=10, SMAPWS_PING_INTERVAL=1000, SMAPWS_PONG_WAIT=1000)
    client = pair[0]
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    async with running(app) as nursery:
        await upgraded(app, nursery, pair)
        # The client reads nothing more: ~1 MiB of messages is more than
        # the socket buffers of both sides hold.
        start = trio.current_time()
        queued = sum(route(app, "u1", blob="x" * 60_000, n=i) for i in range(16))
        assert queued >= 1
        with trio.fail_after(60):
            while app.hub.active_connections:
                await trio.sleep(1)
        assert 10 <= trio.current_time() - start <= 12
    sample = app.metrics.registry.get_sample_value
    assert sample("websocket_connections_closed_total", {"cause": "write_timeout"}) == 1


async def test_a_slow_consumer_whose_1013_is_never_taken_is_counted_and_logged_alike(
    autojump_clock: trio.testing.MockClock, pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue overflows (1013) while the socket is full, and the close
    frame then waits past SMAPWS_WRITE_WAIT: the metric and the log line
    give one cause, the first close's (the log said write_timeout while the
    metric counted slow_consumer)."""
    app = memory_app(
        SMAPWS_WRITE_WAIT=10,
        SMAPWS_PING_INTERVAL=1000,
        SMAPWS_PONG_WAIT=1000,
        SMAPWS_SEND_QUEUE_MESSAGES=4,
        SMAPWS_SEND_QUEUE_HIGH_WATER=2,
    )
    client = pair[0]
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    async with running(app) as nursery:
        await upgraded(app, nursery, pair)
        with caplog.at_level(logging.INFO, logger="smapws"):
            for i in range(40):
                route(app, "u1", blob="x" * 60_000, n=i)
            with trio.fail_after(60):
                while app.hub.active_connections:
                    await trio.sleep(1)
    sample = app.metrics.registry.get_sample_value
    assert sample("websocket_slow_consumer_closes_total") == 1
    assert sample("websocket_connections_closed_total", {"cause": "slow_consumer"}) == 1
    assert sample("websocket_connections_closed_total", {"cause": "write_timeout"}) is None
    (dropped,) = [r for r in caplog.records if r.getMessage().startswith("connection dropped")]
    assert dropped.__dict__["smapws_fields"]["cause"] == "slow_consumer"


async def test_a_head_that_comes_in_parts_on_a_real_socket_is_read_whole(pair: Pair) -> None:
    """The front door reads what is there when the task starts, and waits
    (with its deadline, among the heads being read) only for the rest."""
    app = memory_app()
    client, server_side = pair
    head = UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={token('u1')}\r\n").encode()
    async with running(app) as nursery:
        await client.send_all(head[:20])
        nursery.start_soon(frontdoor.handle, app, server_side)
        await trio.testing.wait_all_tasks_blocked()
        assert len(app.pending_heads) == 1  # waiting for the rest, counted
        await client.send_all(head[20:])
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await client.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 101")
        assert not app.pending_heads
        assert app.hub.active_connections == 1
        await client.aclose()


async def test_the_accept_loop_never_waits_in_the_kernel_whatever_the_default_timeout() -> None:
    """A process that set ``socket.setdefaulttimeout`` (a library, the
    application embedding the hub): the listener's descriptor is still
    accepted on without blocking. (A stdlib socket made on it took that
    timeout: accept() then waited in poll(), the whole event loop with it,
    and raised TimeoutError out of serve when no client came.)"""
    socket.setdefaulttimeout(0.5)
    try:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, make_config())
            for _ in range(3):
                assert (await http(server.port, "GET", "/health")).status == 200
                # The backlog is empty now: the accept loop waits for the
                # next client in trio, not in poll() (which ended in a
                # TimeoutError out of serve, failing this test).
                await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    finally:
        socket.setdefaulttimeout(None)
