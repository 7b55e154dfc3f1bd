"""End to end through a real redis-server started by the test session."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import websockets.trio.client

from smapws import Server, serve

from .conftest import (
    API_KEY,
    RedisServer,
    connect,
    doc_block,
    free_port,
    http,
    make_config,
    metric,
    receive_json,
    token,
    wait_connections,
    wait_ready,
)


async def test_redis_publish_reaches_every_tab_and_no_other_user(
    redis_hub: Server, redis_server: RedisServer
) -> None:
    async with (
        connect(redis_hub, "u1") as tab1,
        connect(redis_hub, "u1") as tab2,
        connect(redis_hub, "u2") as other,
    ):
        await wait_connections(redis_hub, 3)
        # As the Project service does: PUBLISH user_noti:{user_id} '{json}'.
        redis_server.publish(
            "u1", {"type": "project_progress", "payload": {"project_id": "p", "done": 1}}
        )
        for tab in (tab1, tab2):
            msg = await receive_json(tab)
            assert msg["type"] == "project_progress"
            assert msg["payload"] == {"project_id": "p", "done": 1}
            assert msg["timestamp"].endswith("Z")
        redis_server.publish("u2", {"type": "notification", "payload": {"for": "u2"}})
        assert (await receive_json(other))["payload"] == {"for": "u2"}
    assert metric(redis_hub, "websocket_messages_sent_total") == 3
    assert metric(redis_hub, "websocket_broker_messages_received_total") == 2


async def redis_cli(redis_server: RedisServer, *args: str) -> bytes:
    result = await trio.run_process(
        ["redis-cli", "-p", str(redis_server.port), *args], capture_stdout=True
    )
    return bytes(result.stdout.strip())


async def test_redis_cli_publish_reaches_every_cookie_tab_of_u1_and_not_u2(
    redis_hub: Server, redis_server: RedisServer
) -> None:
    """The issue's acceptance scenario, word for word."""
    async with (
        connect(redis_hub, "u1") as tab1,
        connect(redis_hub, "u1") as tab2,
        connect(redis_hub, "u2") as u2,
    ):
        await wait_connections(redis_hub, 3)
        message = '{"type":"alert","payload":{"title":"disk","severity":"high"}}'
        # Exactly one subscriber: the hub's one PSUBSCRIBE serves every tab.
        assert await redis_cli(redis_server, "PUBLISH", "user_noti:u1", message) == b"1"
        for tab in (tab1, tab2):
            msg = await receive_json(tab)
            assert msg["type"] == "alert"
            assert msg["payload"] == {"title": "disk", "severity": "high"}
            assert msg["timestamp"].endswith("Z")
        mine = '{"type":"notification","payload":{"for":"u2"}}'
        assert await redis_cli(redis_server, "PUBLISH", "user_noti:u2", mine) == b"1"
        # u2's first message is its own: u1's alert never reached it.
        assert (await receive_json(u2))["payload"] == {"for": "u2"}


async def test_websockets_library_as_the_client(
    redis_hub: Server, redis_server: RedisServer
) -> None:
    async with websockets.trio.client.connect(
        f"ws://127.0.0.1:{redis_hub.port}/ws",
        additional_headers={"Cookie": f"access_token={token('wsl')}"},
    ) as ws:
        await wait_connections(redis_hub, 1)
        redis_server.publish("wsl", {"type": "project_completed", "payload": {"project_id": "p"}})
        with trio.fail_after(5):
            msg = json.loads(await ws.recv())
    assert msg["type"] == "project_completed"


async def test_invalid_redis_messages_are_dropped_and_the_next_flows(
    redis_hub: Server, redis_server: RedisServer
) -> None:
    async with connect(redis_hub, "u3") as ws:
        await wait_connections(redis_hub, 1)
        redis_server.publish("u3", b"{broken")
        redis_server.publish("u3", b'{"type": "x", "payload": "not an object"}')
        redis_server.publish("u3", b"\xc3\x28")
        redis_server.publish("u3", {"type": "notification", "payload": {"ok": 1}})
        assert (await receive_json(ws))["payload"] == {"ok": 1}
    invalid = "websocket_broker_messages_invalid_total"
    assert metric(redis_hub, invalid, {"reason": "not_json"}) == 1
    assert metric(redis_hub, invalid, {"reason": "bad_payload"}) == 1
    assert metric(redis_hub, invalid, {"reason": "not_utf8"}) == 1


async def test_publish_api_goes_through_redis(redis_hub: Server, redis_server: RedisServer) -> None:
    async with connect(redis_hub, "api_user") as ws:
        await wait_connections(redis_hub, 1)
        body = json.dumps(
            {"user_id": "api_user", "message": {"type": "notification", "payload": {"x": 1}}}
        ).encode()
        r = await http(
            redis_hub.port, "POST", "/api/publish", body=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        )  # fmt: skip
        assert r.status == 202
        assert r.json() == {"status": "accepted", "hubs": 1, "receivers": 1}
        assert (await receive_json(ws))["payload"] == {"x": 1}


async def test_cli_publish_to_redis(redis_hub: Server, redis_server: RedisServer) -> None:
    async with connect(redis_hub, "cli2") as ws:
        await wait_connections(redis_hub, 1)
        env = {**os.environ, "REDIS_URL": redis_server.url}
        result = await trio.run_process(
            [sys.executable, "-m", "smapws", "publish", "--user", "cli2",
             "--type", "notification", "--payload", '{"title": "hi"}'],
            env=env, capture_stdout=True,
        )  # fmt: skip
        assert json.loads(result.stdout) == {"status": "published", "hubs": 1, "receivers": 1}
        assert (await receive_json(ws))["payload"] == {"title": "hi"}


async def test_unreachable_redis_at_start_then_recovers(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    late = RedisServer(free_port(), tmp_path)
    cfg = make_config(REDIS_URL=late.url, SMAPWS_RECONNECT_MAX=0.5, SMAPWS_REDIS_TIMEOUT=1)
    server: Server = await nursery.start(serve, cfg)
    try:
        # The hub serves HTTP while Redis is down, says so, and never falls back.
        await trio.sleep(0.3)
        health = (await http(server.port, "GET", "/health")).json()
        assert health["status"] == "degraded"
        assert health["subscriber"]["backend"] == "redis"
        assert health["subscriber"]["status"] in ("connecting", "down")
        assert "Error" in (health["subscriber"]["last_error"] or "")
        # Down since start: counted from then, not null.
        down_for = health["subscriber"]["down_for_s"]
        assert isinstance(down_for, float) and 0.3 <= down_for < 30
        assert health["subscriber"]["connected_for_s"] is None
        assert (await http(server.port, "GET", "/ready")).status == 503
        assert metric(server, "websocket_subscriber_up") == 0
        reconnects_while_down = metric(server, "websocket_subscriber_reconnects_total")
        assert reconnects_while_down >= 1
        # Clients may connect meanwhile; they get messages once Redis is there.
        async with connect(server, "late_user") as ws:
            late.start()
            await wait_ready(server)
            ready = await http(server.port, "GET", "/ready")
            assert ready.status == 200 and ready.json()["subscriber"]["down_for_s"] is None
            assert metric(server, "websocket_subscriber_up") == 1
            late.publish("late_user", {"type": "notification", "payload": {"n": 1}})
            assert (await receive_json(ws))["payload"] == {"n": 1}
    finally:
        late.kill()


async def test_a_pipelined_burst_arrives_whole_and_in_order_through_the_fast_read_path(
    redis_server: RedisServer,
) -> None:
    """The pump takes replies straight from the connection's hiredis reader
    (engaged with the installed redis-py, RESP2), not through ``get_message``:
    a burst of 2,000 messages in one pipelined write arrives complete and in
    order, and subscription confirmations and probes still reach their
    callbacks."""
    import trio_asyncio

    from smapws._io.brokers.redis import Progress, clients_for
    from smapws._io.brokers.redis.client import subscribe
    from smapws._io.brokers.redis.pump import fast_reader, pump

    clients = clients_for(redis_server.url, 5)
    send, receive = trio.open_memory_channel[tuple[bytes, bytes]](5000)
    controls: list[tuple[str, bytes]] = []
    probes: list[bytes] = []
    calls = 0

    def publish_burst() -> None:
        with redis_server.client() as c:
            pipe = c.pipeline(transaction=False)
            for i in range(2000):
                pipe.publish(f"user_noti:u{i % 7}", str(i))
            pipe.publish("probe:x", "p1")
            pipe.execute()

    async with trio_asyncio.open_loop():
        pubsub = clients.client.pubsub()
        clients.pubsub = pubsub
        get_message = pubsub.get_message

        async def counting_get_message(**kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return await get_message(**kwargs)

        pubsub.get_message = counting_get_message  # type: ignore[method-assign]
        try:
            with trio.fail_after(10):
                await trio_asyncio.aio_as_trio(subscribe)(pubsub, "user_noti:*", b"probe:x")
                assert fast_reader(pubsub) is not None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        trio_asyncio.aio_as_trio(pump),
                        pubsub,
                        send,
                        lambda: pytest.fail("dropped"),
                        Progress(),
                        b"probe:x",
                        probes.append,
                        lambda kind, channel: controls.append((kind, channel)),
                    )
                    while len(controls) < 2:
                        await trio.sleep(0.01)
                    await trio.to_thread.run_sync(publish_burst)
                    got = [await receive.receive() for _ in range(2000)]
                    while not probes:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await clients.aclose()
    assert controls == [("psubscribe", b"user_noti:*"), ("subscribe", b"probe:x")]
    assert [int(data) for _, data in got] == list(range(2000))
    assert got[8] == (b"user_noti:u1", b"8")
    assert probes == [b"p1"]
    assert calls == 0, calls


async def test_the_redis_user_operations_documents_is_enough_for_a_hub(
    own_redis: RedisServer,
) -> None:
    """docs/operations.rst's least ACL, run as written: the hub subscribes,
    delivers, and writes the fleet log without one refused command (a user
    without PUBLISH made the hub drop its subscription at every probe, each
    tab getting a resync a second: undocumented until then)."""
    block = doc_block("docs/operations.rst", "A hub's Redis user needs more")
    with own_redis.client() as c:
        for line in block.splitlines():
            c.execute_command(*line.replace(">PASSWORD", ">hub-pw").split())
    url = f"redis://smapws:hub-pw@127.0.0.1:{own_redis.port}/0"
    for mode in ("pattern", "user"):  # one hub at a time: each writes its own message
        async with trio.open_nursery() as hubs:
            hub = await hubs.start(serve, make_config(REDIS_URL=url, SMAPWS_SUBSCRIBE_MODE=mode))
            await wait_ready(hub)
            async with connect(hub, f"acl-{mode}") as tab:
                await wait_connections(hub, 1)
                own_redis.publish(f"acl-{mode}", {"type": "notification", "payload": {}})
                assert (await receive_json(tab))["type"] == "notification"
                name = "websocket_fleet_log_appends_total"
                with trio.fail_after(5):
                    while metric(hub, name, {"result": "written"}) < 1:
                        await trio.sleep(0.01)
            errors = "websocket_fleet_log_errors_total"
            assert (
                metric(hub, errors, {"op": "append"}) == metric(hub, errors, {"op": "consult"}) == 0
            )
            assert metric(hub, "websocket_broker_disconnects_total", {"cause": "error_reply"}) == 0
            hubs.cancel_scope.cancel()
    with own_redis.client() as c:
        stats = c.info("commandstats")
    # (failed_calls counts the first EVALSHA's NOSCRIPT: the script is then sent.)
    refused = {k: v["rejected_calls"] for k, v in stats.items() if v.get("rejected_calls")}
    assert refused == {}
    assert stats["cmdstat_publish"]["calls"] > 0  # the probes
