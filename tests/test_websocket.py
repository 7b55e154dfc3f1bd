"""WebSocket behaviour: auth before the upgrade, routing, limits, heartbeat.

Network tests use real sockets on port 0 against a hub on the in-process
broker; timeout tests drive the front door over in-memory streams with
trio's MockClock (autojump), so virtual time is exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
import websockets.exceptions
import websockets.trio.client

from smapws import Server
from smapws._io import frontdoor
from smapws._io.app import App
from smapws._io.brokers.memory import MemoryBroker

from .conftest import (
    HttpResponse,
    connect,
    make_config,
    metric,
    parse_frames,
    raw_request,
    receive_json,
    token,
    wait_connections,
)

UPGRADE_HEAD = (
    "GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n{extra}\r\n"
)


async def publish(server: Server, user: str, mtype: str = "notification", **payload: Any) -> int:
    data = json.dumps({"type": mtype, "payload": payload}).encode()
    return await server.app.broker.publish(b"user_noti:" + user.encode(), data)


async def raw_upgrade(
    port: int, *, user: str | None = None, query: str = "", extra: str = ""
) -> HttpResponse:
    """Send an upgrade request by hand (with ``user``'s cookie token) and read
    the server's answer to EOF: for refusals, the whole HTTP response."""
    if user is not None:
        extra += f"Cookie: access_token={token(user)}\r\n"
    return await raw_request(port, UPGRADE_HEAD.format(query=query, extra=extra).encode())


# -- delivery ------------------------------------------------------------------


async def test_cookie_token_receives_published_messages(memory_hub: Server) -> None:
    async with connect(memory_hub, "u1") as ws:
        await wait_connections(memory_hub, 1)
        await publish(memory_hub, "u1", "project_progress", project_id="p1", done=15)
        msg = await receive_json(ws)
    assert msg["type"] == "project_progress"
    assert msg["payload"] == {"project_id": "p1", "done": 15}
    # RFC 3339 UTC with milliseconds, close to now.
    stamp = time.mktime(time.strptime(msg["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert msg["timestamp"].endswith("Z") and len(msg["timestamp"]) == 24
    assert abs(stamp - time.timezone - time.time()) < 5
    assert metric(memory_hub, "websocket_messages_sent_total") == 1
    assert metric(memory_hub, "websocket_connections_total") == 1


async def test_every_tab_of_a_user_and_no_other_user(memory_hub: Server) -> None:
    async with (
        connect(memory_hub, "u1") as tab1,
        connect(memory_hub, "u1") as tab2,
        connect(memory_hub, "u1") as tab3,
        connect(memory_hub, "u2") as other,
    ):
        await wait_connections(memory_hub, 4)
        health = memory_hub.app.health()["websocket"]
        assert (health["active_connections"], health["active_users"]) == (4, 2)
        await publish(memory_hub, "u1", n=1)
        for tab in (tab1, tab2, tab3):
            assert (await receive_json(tab))["payload"] == {"n": 1}
        await publish(memory_hub, "u2", n=2)
        # u2's first message is its own: u1's never reached it.
        assert (await receive_json(other))["payload"] == {"n": 2}
        # Closing one tab leaves the others subscribed.
        await tab2.aclose()
        await wait_connections(memory_hub, 3)
        await publish(memory_hub, "u1", n=3)
        assert (await receive_json(tab1))["payload"] == {"n": 3}
        assert (await receive_json(tab3))["payload"] == {"n": 3}
    await wait_connections(memory_hub, 0)
    health = memory_hub.app.health()["websocket"]
    assert (health["active_connections"], health["active_users"]) == (0, 0)


async def test_order_is_kept_per_connection(memory_hub: Server) -> None:
    async with connect(memory_hub, "u1") as ws:
        await wait_connections(memory_hub, 1)
        for i in range(100):
            await publish(memory_hub, "u1", i=i)
        got = [(await receive_json(ws))["payload"]["i"] for _ in range(100)]
    assert got == list(range(100))


async def test_invalid_broker_messages_are_dropped_and_counted(
    memory_hub: Server, caplog: pytest.LogCaptureFixture
) -> None:
    broker = memory_hub.app.broker
    async with connect(memory_hub, "u1") as ws:
        await wait_connections(memory_hub, 1)
        with caplog.at_level(logging.WARNING, logger="smapws"):
            await broker.publish(b"user_noti:u1", b"not json")
            await broker.publish(b"user_noti:u1", b'{"type":"x"}')
            await broker.publish(b"user_noti:u1", b"\xff\xfe")
            await publish(memory_hub, "u1", ok=True)
            assert (await receive_json(ws))["payload"] == {"ok": True}
    for reason in ("not_json", "bad_payload", "not_utf8"):
        assert (
            metric(memory_hub, "websocket_broker_messages_invalid_total", {"reason": reason}) == 1
        )
    assert "invalid broker message dropped" in caplog.text


# -- refusals before the upgrade -----------------------------------------------------


@pytest.mark.parametrize(
    ("cookie", "reason"),
    [
        (None, "missing_token"),
        ("access_token=", "missing_token"),
        ("access_token=garbage", "malformed"),
        ("access_token=" + token("u1", key="x" * 64), "bad_signature"),
        ("access_token=" + token("u1", ttl=-10), "expired"),
    ],
)
async def test_bad_tokens_get_401_before_the_upgrade(
    memory_hub: Server, caplog: pytest.LogCaptureFixture, cookie: str | None, reason: str
) -> None:
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    with caplog.at_level(logging.INFO, logger="smapws"):
        status = (await raw_upgrade(memory_hub.port, extra=extra)).status
    assert status == 401
    assert metric(memory_hub, "websocket_connections_rejected_total", {"reason": reason}) == 1
    lines = [r for r in caplog.records if r.getMessage() == "connection rejected"]
    assert len(lines) == 1
    assert lines[0].smapws_fields["reason"] == reason  # type: ignore[attr-defined]
    if cookie:
        assert cookie.split("=", 1)[1] not in caplog.text or cookie.endswith("=")
    assert memory_hub.app.hub.active_connections == 0


async def test_a_client_library_we_did_not_write_sees_the_refusal(memory_hub: Server) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        async with websockets.trio.client.connect(
            f"ws://127.0.0.1:{memory_hub.port}/ws",
            additional_headers={"Cookie": "access_token=garbage"},
        ):
            pass  # pragma: no cover
    assert info.value.response.status_code == 401


async def test_origin_is_checked(memory_hub: Server) -> None:
    r = await raw_upgrade(memory_hub.port, user="u1", extra="Origin: http://evil.example\r\n")
    assert r.status == 403
    assert metric(memory_hub, "websocket_connections_rejected_total", {"reason": "origin"}) == 1
    # The same host as the Host header is allowed by default.
    async with connect(memory_hub, "u1", headers={"Origin": f"http://127.0.0.1:{memory_hub.port}"}):
        await wait_connections(memory_hub, 1)


async def test_an_origin_refusal_logs_the_origin(
    memory_hub: Server, caplog: pytest.LogCaptureFixture
) -> None:
    long = "http://" + "a" * 300 + ".example"
    with caplog.at_level(logging.INFO, logger="smapws"):
        for origin in ("http://localhost:5173", long):
            r = await raw_upgrade(memory_hub.port, user="u1", extra=f"Origin: {origin}\r\n")
            assert r.status == 403
    lines = [r for r in caplog.records if r.getMessage() == "connection rejected"]
    logged = [r.smapws_fields for r in lines]  # type: ignore[attr-defined]
    assert [(f["reason"], f["origin"]) for f in logged] == [
        ("origin", "http://localhost:5173"),
        ("origin", long[:200]),
    ]
    # Other refusals carry no origin field (here: no token, same-host Origin).
    with caplog.at_level(logging.INFO, logger="smapws"):
        same = "Origin: http://127.0.0.1\r\n"  # the Host header of raw_upgrade
        assert (await raw_upgrade(memory_hub.port, extra=same)).status == 401
    assert caplog.records[-1].smapws_fields["reason"] == "missing_token"  # type: ignore[attr-defined]
    assert "origin" not in caplog.records[-1].smapws_fields  # type: ignore[attr-defined]


async def test_allowed_origins_list(nursery: trio.Nursery) -> None:
    from smapws import serve

    server: Server = await nursery.start(
        serve, make_config(SMAPWS_ALLOWED_ORIGINS="https://app.tantai.dev, https://*.smap.io")
    )
    cookie = f"Cookie: access_token={token('u1')}\r\n"
    for origin, expected in [
        ("https://app.tantai.dev", 101),
        ("https://x.smap.io", 101),
        ("http://127.0.0.1", 403),
    ]:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            head = UPGRADE_HEAD.format(query="", extra=cookie + f"Origin: {origin}\r\n")
            await stream.send_all(head.encode())
            data = await stream.receive_some(4096)
        assert int(data.split(b" ")[1]) == expected, origin


async def test_deprecated_query_token_works_counted_and_logged_without_the_token(
    memory_hub: Server, caplog: pytest.LogCaptureFixture
) -> None:
    tok = token("u1")
    with caplog.at_level(logging.INFO, logger="smapws"):
        async with connect(memory_hub, query=f"?token={tok}") as ws:
            await wait_connections(memory_hub, 1)
            await publish(memory_hub, "u1", n=1)
            assert (await receive_json(ws))["payload"] == {"n": 1}
    assert metric(memory_hub, "websocket_deprecated_query_token_total") == 1
    assert "deprecated query token used" in caplog.text
    assert tok not in caplog.text


async def test_cookie_wins_over_query_token(memory_hub: Server) -> None:
    async with connect(memory_hub, "u1", query="?token=garbage"):
        await wait_connections(memory_hub, 1)
    assert metric(memory_hub, "websocket_deprecated_query_token_total") == 0


async def test_not_an_upgrade_gets_426(memory_hub: Server) -> None:
    r = await raw_request(memory_hub.port, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 426
    assert r.headers["upgrade"] == "websocket"


async def test_capacity_gives_503_with_retry_after(nursery: trio.Nursery) -> None:
    from smapws import serve

    server: Server = await nursery.start(serve, make_config(SMAPWS_MAX_CONNECTIONS=1))
    async with connect(server, "u1"):
        await wait_connections(server, 1)
        r = await raw_upgrade(server.port, user="u2")
        assert r.status == 503
        assert r.headers["retry-after"] == "5"
    assert metric(server, "websocket_connections_rejected_total", {"reason": "capacity"}) == 1


async def test_client_message_over_the_limit_closes_with_1009(nursery: trio.Nursery) -> None:
    from smapws import serve

    server: Server = await nursery.start(serve, make_config(SMAPWS_MAX_CLIENT_MESSAGE_BYTES=100))
    async with websockets.trio.client.connect(
        f"ws://127.0.0.1:{server.port}/ws",
        additional_headers={"Cookie": f"access_token={token('u1')}"},
    ) as ws:
        await wait_connections(server, 1)
        await ws.send("small is fine")
        await ws.send("€" * 30)  # 30 characters, 90 bytes: within the limit
        await ws.send("€" * 34)  # 34 characters, 102 bytes: over it
        with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
            with trio.fail_after(5):
                await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    await wait_connections(server, 0)
    assert metric(server, "websocket_client_messages_total") == 2
    closed = {"cause": "message_too_big"}
    assert metric(server, "websocket_connections_closed_total", closed) == 1


def _client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 §5.2) of under 126 bytes."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + mask + masked


async def test_a_client_frame_flood_closes_with_1008_and_spares_the_others(
    nursery: trio.Nursery,
) -> None:
    """Parsing a frame costs the hub far more than sending it costs the
    client: one tab sending empty continuation frames as fast as it could
    took the event loop (every other tab's delivery waited), and went on
    being parsed long after it left. Past SMAPWS_MAX_CLIENT_FRAME_RATE
    (a burst as large) the connection is closed with 1008."""
    from smapws import serve

    server: Server = await nursery.start(serve, make_config(SMAPWS_MAX_CLIENT_FRAME_RATE=20))
    async with connect(server, "bystander") as bystander:
        flood = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with flood:
            head = UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={token('u1')}\r\n")
            await flood.send_all(head.encode())
            frames = _client_frame(0x1, fin=False) + _client_frame(0x0, fin=False) * 1000
            await flood.send_all(frames)
            data = b""
            with trio.fail_after(5):
                while chunk := await flood.receive_some(65536):
                    data += chunk
        ((opcode, payload),) = parse_frames(data.partition(b"\r\n\r\n")[2])
        assert (opcode, struct.unpack("!H", payload[:2])[0], payload[2:]) == (
            0x8,
            1008,
            b"too many frames",
        )
        await wait_connections(server, 1)
        await publish(server, "bystander", n=1)
        assert (await receive_json(bystander))["payload"] == {"n": 1}
    closed = {"cause": "frame_rate"}
    assert metric(server, "websocket_connections_closed_total", closed) == 1


async def test_client_frames_within_the_rate_keep_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Pings (each counted as a frame) at half the rate for a minute keep the
    connection open and are answered; a burst over the rate closes it with
    1008."""
    app = memory_app(SMAPWS_MAX_CLIENT_FRAME_RATE=20, SMAPWS_PING_INTERVAL=1000)
    client, server = trio.testing.memory_stream_pair()
    async with running(app) as nursery:
        nursery.start_soon(frontdoor.handle, app, server)
        ws = await memory_client(nursery, client, "u1")
        for i in range(600):
            await ws.ping(b"%d" % i)  # returns when the pong is back
            await trio.sleep(0.1)
        assert app.hub.active_connections == 1

        async def ping(payload: bytes) -> None:
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.ping(payload)

        for i in range(30):
            nursery.start_soon(ping, b"burst %d" % i)
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert (info.value.reason.code, info.value.reason.reason) == (1008, "too many frames")
        nursery.cancel_scope.cancel()
    assert app.hub.active_connections == 0


# -- timeouts (MockClock, in-memory streams) ----------------------------------------------


class Valve(trio.abc.HalfCloseableStream):
    """The server's side of an in-memory connection whose writes can be
    stalled, as a client that stops reading stalls a real socket."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.open = trio.Event()
        self.open.set()

    def stall(self) -> None:
        self.open = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.open.wait()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


async def memory_client(
    nursery: trio.Nursery, stream: trio.abc.Stream, user: str, *, ttl: float = 3600
) -> trio_websocket.WebSocketConnection:
    """A trio-websocket client over an in-memory stream, authenticated as ``user``."""
    cookie = f"access_token={token(user, ttl=ttl)}".encode()
    return await trio_websocket.wrap_client_stream(
        nursery, stream, "127.0.0.1", "/ws", extra_headers=[(b"Cookie", cookie)]
    )


@contextlib.asynccontextmanager
async def stalled_client(
    app: App,
) -> AsyncIterator[tuple[trio_websocket.WebSocketConnection, Valve]]:
    """A connected client of user u1 whose socket then stops taking the
    server's writes (until ``valve.open`` is set)."""
    client, server_side = trio.testing.memory_stream_pair()
    valve = Valve(server_side)
    async with running(app) as nursery:
        nursery.start_soon(frontdoor.handle, app, valve)
        ws = await memory_client(nursery, client, "u1")
        await trio.sleep(1)
        valve.stall()
        yield ws, valve


def memory_app(**overrides: Any) -> App:
    return App(make_config(**overrides), MemoryBroker())


@contextlib.asynccontextmanager
async def running(app: App) -> AsyncIterator[trio.Nursery]:
    """A nursery for connection handlers, with the hub's periodic duties
    (heartbeat ticks) running beside it until the handlers are done."""
    async with trio.open_nursery() as duties:
        duties.start_soon(app.maintain)
        async with trio.open_nursery() as handlers:
            yield handlers
        duties.cancel_scope.cancel()


def route(app: App, user: str, **payload: Any) -> int:
    data = json.dumps({"type": "notification", "payload": payload}).encode()
    return app.route(
        b"user_noti:" + user.encode(), data, wall_time=time.time(), now=trio.current_time()
    )


async def silent_client(stream: trio.abc.Stream, user: str) -> bytes:
    """Upgrade by hand and then never answer anything; returns what the server
    sent after the 101 head once the server closes."""
    head = UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={token(user)}\r\n")
    await stream.send_all(head.encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data.partition(b"\r\n\r\n")[2]


async def test_unanswered_ping_closes_after_pong_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = memory_app(SMAPWS_PING_INTERVAL=54, SMAPWS_PONG_WAIT=60, SMAPWS_WRITE_WAIT=10)
    client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    async with running(app) as nursery:
        nursery.start_soon(frontdoor.handle, app, server)
        data = await silent_client(client, "u1")
        # ping at 54 s, no pong by 54 + 60 s: close frame, then 10 s for the
        # peer's close reply that never comes, then the socket is closed.
        assert trio.current_time() - start == 54 + 60 + 10
    frames = parse_frames(data)
    assert [op for op, _ in frames] == [0x9, 0x8]
    assert struct.unpack("!H", frames[1][1][:2])[0] == 1011
    assert frames[1][1][2:] == b"pong timeout"
    assert app.hub.active_connections == 0
    closed = app.metrics.registry.get_sample_value(
        "websocket_connections_closed_total", {"cause": "pong_timeout"}
    )
    assert closed == 1


async def test_answered_pings_keep_the_connection(autojump_clock: trio.testing.MockClock) -> None:
    app = memory_app(SMAPWS_PING_INTERVAL=54, SMAPWS_PONG_WAIT=60)
    client, server = trio.testing.memory_stream_pair()
    async with running(app) as nursery:
        nursery.start_soon(frontdoor.handle, app, server)
        ws = await memory_client(nursery, client, "u1")
        await trio.sleep(54 * 10)  # ten heartbeats, each answered by the client library
        assert app.hub.active_connections == 1
        route(app, "u1", alive=True)
        assert json.loads(await ws.get_message())["payload"] == {"alive": True}
        await ws.aclose()
    assert app.hub.active_connections == 0


async def test_expired_token_closes_with_1008(autojump_clock: trio.testing.MockClock) -> None:
    app = memory_app(SMAPWS_PING_INTERVAL=54, SMAPWS_PONG_WAIT=60)
    client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    async with running(app) as nursery:
        nursery.start_soon(frontdoor.handle, app, server)
        ws = await memory_client(nursery, client, "u1", ttl=30)
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        elapsed = trio.current_time() - start
    assert info.value.reason.code == 1008
    assert info.value.reason.reason == "token expired"
    # exp is whole seconds; expiry is checked on the heartbeat's 1 s tick.
    assert 28 < elapsed <= 31


async def test_stuck_write_is_abandoned_after_write_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = memory_app(SMAPWS_WRITE_WAIT=10, SMAPWS_PING_INTERVAL=1000, SMAPWS_PONG_WAIT=1000)
    async with stalled_client(app) as (ws, _):
        start = trio.current_time()
        assert route(app, "u1", n=1) == 1
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
        assert trio.current_time() - start == 10
    assert app.hub.active_connections == 0
    sample = app.metrics.registry.get_sample_value
    assert sample("websocket_messages_failed_total", {}) == 1
    assert sample("websocket_connections_closed_total", {"cause": "write_timeout"}) == 1


async def test_full_send_queue_closes_with_1013(autojump_clock: trio.testing.MockClock) -> None:
    app = memory_app(
        SMAPWS_SEND_QUEUE_HIGH_WATER=2, SMAPWS_SEND_QUEUE_MESSAGES=2, SMAPWS_PING_INTERVAL=1000
    )
    async with stalled_client(app) as (ws, valve):
        assert route(app, "u1", n=0) == 1  # taken by the writer, which is now stuck
        await trio.sleep(1)
        assert route(app, "u1", n=1) == 1
        assert route(app, "u1", n=2) == 1
        assert route(app, "u1", n=3) == 0  # over the bound: refused, never waited on
        valve.open.set()  # the client reads again: it gets what was queued, then 1013
        got = [json.loads(await ws.get_message())["payload"]["n"] for _ in range(3)]
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
    assert got == [0, 1, 2]
    assert info.value.reason.code == 1013
    sample = app.metrics.registry.get_sample_value
    assert sample("websocket_slow_consumer_closes_total", {}) == 1
    assert sample("websocket_messages_failed_total", {}) == 1
