"""Message ids and ``?since=`` recovery against real hubs over real sockets."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from smapws import Server, serve

from .conftest import (
    RedisServer,
    connect,
    make_config,
    metric,
    raw_request,
    receive_json,
    token,
    wait_connections,
    wait_ready,
)


async def publish(server: Server, user: str, mtype: str, **payload: Any) -> None:
    data = json.dumps({"type": mtype, "payload": payload}).encode()
    await server.app.broker.publish(b"user_noti:" + user.encode(), data)


async def receive_n(ws: Any, n: int) -> list[dict[str, Any]]:
    return [await receive_json(ws) for _ in range(n)]


async def test_a_tab_resumes_with_what_it_missed_then_live(memory_hub: Server) -> None:
    async with connect(memory_hub, "u1") as ws:
        await publish(memory_hub, "u1", "notification", n=1)
        first = await receive_json(ws)
    assert len(first["id"]) == 16
    await wait_connections(memory_hub, 0)
    # While the tab is away: events, and progress that moves on.
    await publish(memory_hub, "u1", "project_progress", project_id="p1", done=1)
    await publish(memory_hub, "u1", "notification", n=2)
    await publish(memory_hub, "u1", "project_progress", project_id="p1", done=2)
    await publish(memory_hub, "u1", "project_progress", project_id="p2", done=5)
    await publish(memory_hub, "u1", "project_completed", project_id="p2", status="DONE")
    await publish(memory_hub, "u1", "alert", n=3)
    await trio.testing.wait_all_tasks_blocked()
    async with connect(memory_hub, "u1", query=f"?since={first['id']}&since_age=1") as ws:
        got = await receive_n(ws, 4)
        await publish(memory_hub, "u1", "notification", n=4)
        live = await receive_json(ws)
    assert [(m["type"], m["payload"]) for m in got] == [
        ("notification", {"n": 2}),
        ("project_progress", {"project_id": "p1", "done": 2}),
        ("project_completed", {"project_id": "p2", "status": "DONE"}),
        ("alert", {"n": 3}),
    ]
    assert live["payload"] == {"n": 4}
    assert len({m["id"] for m in [first, *got, live]}) == 6
    assert metric(memory_hub, "websocket_resumes_total", {"result": "replayed"}) == 1
    assert metric(memory_hub, "websocket_replayed_messages_total") == 4


async def test_an_up_to_date_tab_gets_no_duplicate_state(memory_hub: Server) -> None:
    async with connect(memory_hub, "u1") as ws:
        await publish(memory_hub, "u1", "project_progress", project_id="p1", done=1)
        last = await receive_json(ws)
    # Without since, a new tab gets the current state; with since it already
    # has it, so the first thing it receives is the next live message.
    async with connect(memory_hub, "u1", query=f"?since={last['id']}") as ws:
        await wait_connections(memory_hub, 1)
        await publish(memory_hub, "u1", "notification", n=1)
        assert (await receive_json(ws))["payload"] == {"n": 1}
    async with connect(memory_hub, "u1") as ws:
        assert (await receive_json(ws))["id"] == last["id"]


async def test_an_unknown_id_gets_a_resync_then_current_state(memory_hub: Server) -> None:
    await publish(memory_hub, "u1", "project_progress", project_id="p1", done=3)
    await trio.testing.wait_all_tasks_blocked()
    async with connect(memory_hub, "u1", query="?since=00000000deadbeef") as ws:
        resync = await receive_json(ws)
        state = await receive_json(ws)
    assert resync["type"] == "resync"
    assert resync["payload"] == {"reason": "history_gap"}
    assert "id" not in resync
    assert state["payload"] == {"project_id": "p1", "done": 3}
    assert metric(memory_hub, "websocket_resumes_total", {"result": "gap"}) == 1


async def test_a_subscriber_gap_makes_older_ids_unusable(memory_hub: Server) -> None:
    async with connect(memory_hub, "u1") as ws:
        await publish(memory_hub, "u1", "notification", n=1)
        first = await receive_json(ws)
    # The hub lost its subscription for a while: what came before the hole
    # may not be replayed across it.
    memory_hub.app.resync("subscriber_reconnected", 3.0)
    async with connect(memory_hub, "u1", query=f"?since={first['id']}") as ws:
        assert (await receive_json(ws))["payload"] == {"reason": "history_gap"}


async def test_history_off_answers_every_since_with_a_resync(nursery: trio.Nursery) -> None:
    server: Server = await nursery.start(serve, make_config(SMAPWS_HISTORY_TTL=0))
    assert server.app.history is None
    async with connect(server, "u1") as ws:
        await publish(server, "u1", "notification", n=1)
        first = await receive_json(ws)
    assert len(first["id"]) == 16  # ids are still given
    async with connect(server, "u1", query=f"?since={first['id']}") as ws:
        assert (await receive_json(ws))["payload"] == {"reason": "history_gap"}


async def test_a_malformed_since_is_refused_before_the_upgrade(memory_hub: Server) -> None:
    for query in ("since=DROP%20TABLE", "since=0123456789abcdef&since_age=-5"):
        head = (
            f"GET /ws?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Cookie: access_token={token('u1')}\r\n\r\n"
        )
        r = await raw_request(memory_hub.port, head.encode())
        assert r.status == 400
    assert metric(memory_hub, "websocket_connections_rejected_total", {"reason": "bad_since"}) == 2


async def test_two_hubs_give_the_same_ids_and_a_tab_resumes_on_the_other(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    a: Server = await nursery.start(serve, make_config(REDIS_URL=redis_server.url))
    b: Server = await nursery.start(serve, make_config(REDIS_URL=redis_server.url))
    await wait_ready(a)
    await wait_ready(b)
    note = {"type": "notification", "payload": {"title": "same"}}
    async with connect(a, "u7") as on_a, connect(b, "u7") as on_b:
        await wait_connections(a, 1)
        await wait_connections(b, 1)
        # Identical publishes: two ids, equal on both hubs.
        for _ in range(2):
            redis_server.publish("u7", note)
        got_a, got_b = await receive_n(on_a, 2), await receive_n(on_b, 2)
    assert [m["id"] for m in got_a] == [m["id"] for m in got_b]
    assert got_a[0]["id"] != got_a[1]["id"]
    # The tab on hub a goes away; messages are published; it comes back on b.
    redis_server.publish("u7", {"type": "notification", "payload": {"n": 1}})
    redis_server.publish("u7", {"type": "alert", "payload": {"n": 2}})
    with trio.fail_after(5):
        while len(b.app.history or ()) < 4:
            await trio.sleep(0.01)
    async with connect(b, "u7", query=f"?since={got_a[1]['id']}") as ws:
        missed = await receive_n(ws, 2)
    assert [m["payload"] for m in missed] == [{"n": 1}, {"n": 2}]
