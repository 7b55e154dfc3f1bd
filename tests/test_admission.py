"""Fair admission and strict input at the front door (issue 8): invalid
upgrades cannot spend the accept budget, one user cannot take every slot,
silent sockets cannot hold the head-phase slots, publish bodies get the
same strict validation as broker messages. Real sockets throughout."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import pytest
import trio
import trio.testing

from smapws import Server, serve
from smapws._io import frontdoor
from smapws._io.app import HEAD_EVICT_AGE, App
from smapws._io.brokers.memory import MemoryBroker

from .conftest import (
    API_KEY,
    SECRET,
    UPGRADE_HEADERS,
    RedisServer,
    connect,
    free_port,
    http,
    make_config,
    metric,
    raw_request,
    read_response,
    receive_json,
    token,
    wait_port_ready,
)
from .test_websocket import UPGRADE_HEAD

REJECTED = "websocket_connections_rejected_total"


def _upgrade(cookie: str) -> bytes:
    return UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={cookie}\r\n").encode()


async def test_invalid_upgrades_do_not_spend_the_accept_budget(nursery: trio.Nursery) -> None:
    # A budget of 3 upgrades (burst 3, refilled at 3/s): 50 garbage tokens and
    # 10 foreign origins first, then 3 valid tabs, which all get in.
    server: Server = await nursery.start(serve, make_config(SMAPWS_MAX_ACCEPT_RATE=3))
    for i in range(50):
        r = await raw_request(server.port, _upgrade(f"garbage{i}"))
        assert r.status == 401
    for _ in range(10):
        r = await http(
            server.port,
            "GET",
            "/ws",
            headers={
                **UPGRADE_HEADERS,
                "Origin": "https://evil.example",
                "Cookie": f"access_token={token('u1')}",
            },
        )
        assert r.status == 403
    async with connect(server, "a"), connect(server, "b"), connect(server, "c"):
        assert server.app.hub.active_connections == 3
    assert metric(server, REJECTED, {"reason": "malformed"}) == 50
    assert metric(server, REJECTED, {"reason": "origin"}) == 10
    assert metric(server, REJECTED, {"reason": "rate_limited"}) == 0


async def test_one_user_cannot_take_every_slot(nursery: trio.Nursery) -> None:
    server: Server = await nursery.start(serve, make_config(SMAPWS_MAX_CONNECTIONS_PER_USER=2))
    async with connect(server, "greedy"), connect(server, "greedy"):
        r = await raw_request(server.port, _upgrade(token("greedy")))
        assert r.status == 429
        assert r.headers["retry-after"] == "5"
        async with connect(server, "someone-else") as other:  # others still get in
            await server.app.broker.publish(
                b"user_noti:someone-else", b'{"type":"notification","payload":{}}'
            )
            assert (await receive_json(other))["type"] == "notification"
    assert metric(server, REJECTED, {"reason": "user_limit"}) == 1
    # Once a tab closes, the user may open another.
    async with connect(server, "greedy"), connect(server, "greedy"):
        pass


async def test_silent_sockets_cannot_hold_the_head_slots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With SMAPWS_MAX_PENDING_REQUESTS=2, two sockets that never send their
    head hold both slots; a third waits for a slot (head_slot) until the
    oldest has been silent HEAD_EVICT_AGE s, which is then answered 408 at
    once, long before SMAPWS_HANDSHAKE_TIMEOUT."""
    app = App(
        make_config(SMAPWS_MAX_PENDING_REQUESTS=2, SMAPWS_HANDSHAKE_TIMEOUT=60), MemoryBroker()
    )
    start = trio.current_time()
    silent = [trio.testing.memory_stream_pair() for _ in range(2)]
    async with trio.open_nursery() as nursery:
        for _, server_side in silent:
            await app.head_slot()
            nursery.start_soon(frontdoor.handle, app, server_side)
            await trio.sleep(0.5)
        assert len(app.pending_heads) == 2
        await app.head_slot()  # the listener's wait before accept()
        assert trio.current_time() - start == HEAD_EVICT_AGE
        r = await read_response(silent[0][0], timeout=1)
        assert r.status == 408
        client, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(frontdoor.handle, app, server_side)
        await client.send_all(b"GET /health HTTP/1.1\r\n\r\n")
        assert (await read_response(client)).status == 200
        nursery.cancel_scope.cancel()
    assert app.metrics.registry.get_sample_value(REJECTED, {"reason": "head_evicted"}) == 1


def _nofile_limit(n: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


async def test_out_of_file_descriptors_is_one_line_and_a_metric(tmp_path: Any) -> None:
    """A real hub process with 64 file descriptors, sent 80 sockets: accept()
    fails with EMFILE. The hub logs one line for it (no traceback), counts it,
    and serves again once sockets close."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMAPWS_", "REDIS_", "JWT_"))}
    env.update(SMAPWS_HOST="127.0.0.1", SMAPWS_PORT=str(port), JWT_SECRET=SECRET)
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        hub = await trio.lowlevel.open_process(
            [sys.executable, "-m", "smapws", "serve"],
            env=env,
            stderr=err,
            preexec_fn=_nofile_limit(64),
        )
    try:
        await wait_port_ready(port, exited=hub.poll)
        sockets = []
        for _ in range(80):
            sockets.append(await trio.open_tcp_stream("127.0.0.1", port))
        await trio.sleep(1)
        for s in sockets:
            await s.aclose()
        await wait_port_ready(port, exited=hub.poll)
        r = await http(port, "GET", "/metrics")
        assert 'websocket_accept_errors_total{errno="EMFILE"}' in r.body.decode()
    finally:
        hub.terminate()
        with trio.fail_after(30):
            await hub.wait()
    assert hub.returncode == 0
    lines = stderr.read_text().splitlines()
    emfile = [line for line in lines if "accept failed" in line]
    assert len(emfile) == 1, lines
    assert "errno=EMFILE" in emfile[0]
    assert not [line for line in lines if line.startswith(("Traceback", " "))], lines


# -- publish bodies ------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _pub(user: object, message: object) -> bytes:
    return json.dumps({"user_id": user, "message": message}).encode()


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"[" * 60_000, 400, "too_deep"),
        # The message 33 deep (the wrapper makes the body 34: within the
        # body's bound, so the message's own check refuses it).
        (_pub("u1", {"type": "x", "payload": {"a": _nested(31)}}), 400, "too_deep"),
        (b'{"user_id":"u1","message":{"type":"x","payload":{"v":NaN}}}', 400, "bad_number"),
        (b'{"user_id":"u1","message":{"type":"x","payload":{"v":1e999}}}', 400, "bad_number"),
        (b'{"user_id":"u1","message":{"type":"x","payload":{"v":"\\ud800"}}}', 400, "bad_unicode"),
        (b'{"user_id":"\\ud800","message":{"type":"x","payload":{}}}', 400, "bad_unicode"),
        (_pub("u\x1b[31m", {"type": "x", "payload": {}}), 400, "bad_user_id"),
        (_pub(42, {"type": "x", "payload": {}}), 400, "bad_user_id"),
    ],
)
async def test_publish_bodies_get_the_strict_validation(
    memory_hub: Server, body: bytes, status: int, reason: str
) -> None:
    r = await http(memory_hub.port, "POST", "/api/publish", body=body, headers=AUTH)
    assert (r.status, r.json()["error"]) == (status, reason)
    assert (await http(memory_hub.port, "GET", "/health")).status == 200


@pytest.mark.parametrize("length", ["+66", "6_6", "0x42", "٦٦", "-1", "6 6", "1" * 13])
async def test_content_length_is_digits_only(memory_hub: Server, length: str) -> None:
    body = _pub("u1", {"type": "notification", "payload": {"n": 1}})
    head = (
        f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    r = await raw_request(memory_hub.port, head.encode("utf-8") + body)
    assert (r.status, r.json()["error"]) == (411, "length_required")


async def test_deep_broker_message_is_a_counted_drop(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    from .conftest import wait_ready

    server: Server = await nursery.start(serve, make_config(REDIS_URL=redis_server.url))
    await wait_ready(server)
    async with connect(server, "u1") as ws:
        from .conftest import wait_connections

        await wait_connections(server, 1)
        deep = '{"type":"x","payload":{"a":' + "[" * 1000 + "]" * 1000 + "}}"
        redis_server.publish("anyone", deep)
        redis_server.publish("u1", '{"type":"x","payload":{"v":NaN}}')
        redis_server.publish("u1", '{"type":"x","payload":{"v":"\\udfff"}}')
        redis_server.publish("u1", {"type": "notification", "payload": {"ok": True}})
        assert (await receive_json(ws))["payload"] == {"ok": True}
    invalid = "websocket_broker_messages_invalid_total"
    assert metric(server, invalid, {"reason": "too_deep"}) == 1
    assert metric(server, invalid, {"reason": "bad_number"}) == 1
    assert metric(server, invalid, {"reason": "bad_unicode"}) == 1


async def test_a_channel_no_token_can_name_is_a_counted_drop(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    """A channel whose user id no token can carry (over 256 characters, or
    with a control character) is dropped as ``bad_channel``: no tab could
    receive it, and the replay window would otherwise hold its user id
    outside SMAPWS_HISTORY_MAX_BYTES (a megabyte of channel per message)."""
    from .conftest import wait_connections, wait_ready

    server: Server = await nursery.start(serve, make_config(REDIS_URL=redis_server.url))
    await wait_ready(server)
    history = server.app.history
    assert history is not None
    async with connect(server, "u1") as ws:
        await wait_connections(server, 1)
        message = {"type": "notification", "payload": {"n": 1}}
        for user in ("x" * 257, "y" * (1 << 20), "u1\x1b[2J"):
            assert redis_server.publish(user, message) == 1
        redis_server.publish("u1", message)
        assert (await receive_json(ws))["payload"] == {"n": 1}
    invalid = "websocket_broker_messages_invalid_total"
    assert metric(server, invalid, {"reason": "bad_channel"}) == 3
    assert (len(history), history.users()) == (1, 1)  # u1's message alone


async def test_an_integer_sub_is_accepted_as_its_decimal_string(memory_hub: Server) -> None:
    import time

    from smapws._core.auth import mint

    tok = mint("ignored", key=SECRET, now=time.time(), extra={"sub": 42})
    async with connect(memory_hub, cookie=f"access_token={tok}") as ws:
        await memory_hub.app.broker.publish(b"user_noti:42", b'{"type":"alert","payload":{}}')
        assert (await receive_json(ws))["type"] == "alert"


async def test_a_socket_whose_head_is_waiting_is_not_evicted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When the hub is behind (its head bytes are in the socket, unread), the
    oldest socket is not silent: head_slot keeps waiting instead of evicting
    it; a silent one is evicted after HEAD_EVICT_AGE."""
    import socket

    app = App(make_config(SMAPWS_MAX_PENDING_REQUESTS=1), MemoryBroker())
    waiting, peer = socket.socketpair()
    silent, silent_peer = socket.socketpair()
    with waiting, peer, silent, silent_peer:
        peer.send(b"GET /health HTTP/1.1\r\n\r\n")
        with trio.CancelScope() as scope, app.reading_head(scope, waiting.fileno()):
            with trio.move_on_after(60) as timeout:
                await app.head_slot()
            assert timeout.cancelled_caught and not scope.cancel_called
        start = trio.current_time()
        with trio.CancelScope() as scope, app.reading_head(scope, silent.fileno()):
            await app.head_slot()
            assert scope.cancel_called
            assert trio.current_time() - start == HEAD_EVICT_AGE
