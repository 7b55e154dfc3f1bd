"""The one port: plain HTTP endpoints and refusals, over real sockets."""

from __future__ import annotations

import json

import trio
import trio.testing

from smapws import Server
from smapws._io import frontdoor
from smapws._io.app import App
from smapws._io.brokers.memory import MemoryBroker

from .conftest import API_KEY, http, make_config, metric, raw_request, read_response


async def test_health_json(memory_hub: Server) -> None:
    r = await http(memory_hub.port, "GET", "/health")
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["status"] == "ok"
    assert body["subscriber"] == {"backend": "memory", "status": "connected"}
    assert body["websocket"]["active_connections"] == 0
    assert body["websocket"]["active_users"] == 0
    assert isinstance(body["uptime_s"], float)
    assert body["version"]


async def test_ready_and_head(memory_hub: Server) -> None:
    r = await http(memory_hub.port, "GET", "/ready")
    assert r.status == 200
    r = await http(memory_hub.port, "HEAD", "/health")
    assert r.status == 200 and r.body == b""


async def test_metrics_exposes_the_seed_series(memory_hub: Server) -> None:
    r = await http(memory_hub.port, "GET", "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.body.decode()
    for series in (
        "websocket_active_connections ",
        "websocket_messages_sent_total ",
        "websocket_messages_failed_total ",
        "websocket_connections_total ",
        "websocket_broker_messages_received_total ",
        "websocket_delivery_latency_seconds_bucket",
    ):
        assert series in text, series


async def test_unknown_path_and_wrong_method(memory_hub: Server) -> None:
    assert (await http(memory_hub.port, "GET", "/nope")).status == 404
    r = await http(memory_hub.port, "POST", "/health", body=b"x")
    assert r.status == 405
    assert r.headers["allow"] == "GET, HEAD"
    r = await http(memory_hub.port, "GET", "/api/publish")
    assert r.status == 405


async def test_garbage_gets_400(memory_hub: Server) -> None:
    r = await raw_request(memory_hub.port, b"HELLO THERE\r\n\r\n")
    assert r.status == 400
    assert metric(memory_hub, "websocket_connections_rejected_total", {"reason": "bad_request"})


async def test_oversized_head_gets_431(memory_hub: Server) -> None:
    r = await raw_request(
        memory_hub.port, b"GET /health HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    )
    assert r.status == 431


async def test_slow_head_is_cut_off_after_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = App(make_config(SMAPWS_HANDSHAKE_TIMEOUT=10), MemoryBroker())
    client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(frontdoor.handle, app, server)
        await client.send_all(b"GET /health HTTP/1.1\r\n")  # ... and nothing more
        r = await read_response(client, timeout=100)
        assert trio.current_time() - start == 10
    assert r.status == 408
    assert metric_app(app, "handshake_timeout") == 1


def metric_app(app: App, reason: str) -> float:
    v = app.metrics.registry.get_sample_value(
        "websocket_connections_rejected_total", {"reason": reason}
    )
    return v or 0.0


# -- publish API -----------------------------------------------------------------


def _pub(user: str, message: object) -> bytes:
    return json.dumps({"user_id": user, "message": message}).encode()


async def test_publish_requires_the_api_key(memory_hub: Server) -> None:
    body = _pub("u1", {"type": "notification", "payload": {}})
    r = await http(memory_hub.port, "POST", "/api/publish", body=body)
    assert r.status == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    bad = {"Authorization": "Bearer wrong"}
    r = await http(memory_hub.port, "POST", "/api/publish", body=body, headers=bad)
    assert r.status == 401
    good = {"Authorization": f"Bearer {API_KEY}"}
    r = await http(memory_hub.port, "POST", "/api/publish", body=body, headers=good)
    assert r.status == 202
    assert r.json()["status"] == "accepted"


async def test_publish_validates_the_message(memory_hub: Server) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    cases = [
        (b"not json", 400, "not_json"),
        (b"[]", 400, "not_object"),
        (_pub("", {"type": "x", "payload": {}}), 400, "bad_user_id"),
        (_pub("u1", {"type": "", "payload": {}}), 400, "bad_type"),
        (_pub("u1", {"type": "x"}), 400, "bad_payload"),
        (_pub("u1", {"type": "x", "payload": {"a": "x" * 70000}}), 413, "too_large"),
    ]
    for body, status, error in cases:
        r = await http(memory_hub.port, "POST", "/api/publish", body=body, headers=auth)
        assert (r.status, r.json()["error"]) == (status, error), body[:40]


async def test_publish_api_off_without_a_key(nursery: trio.Nursery) -> None:
    from smapws import serve

    cfg = make_config(SMAPWS_API_KEY="")
    server: Server = await nursery.start(serve, cfg)
    body = _pub("u1", {"type": "x", "payload": {}})
    r = await http(server.port, "POST", "/api/publish", body=body)
    assert r.status == 404


async def test_publish_without_length_is_411(memory_hub: Server) -> None:
    r = await raw_request(
        memory_hub.port,
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + API_KEY.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    assert r.status == 411
