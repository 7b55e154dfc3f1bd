"""Issue 16: what a new or resuming tab is sent is bounded, never a 1013
loop, and a flood to other ids cannot take a tab's recovery; against a real
hub over real sockets."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from smapws import Server, serve
from smapws._core.router import resync_envelope

from .conftest import connect, make_config, metric, receive_json, wait_connections

PAD = 60_000  # a legal project_progress near SMAPWS_MAX_MESSAGE_BYTES


async def publish(server: Server, user: str, mtype: str, **payload: Any) -> None:
    data = json.dumps({"type": mtype, "payload": payload}).encode()
    await server.app.broker.publish(b"user_noti:" + user.encode(), data)


async def start(nursery: trio.Nursery, **config: Any) -> Server:
    server: Server = await nursery.start(serve, make_config(**config))
    return server


async def test_a_new_tab_of_a_user_with_more_state_than_its_queue_is_served_not_closed(
    nursery: trio.Nursery,
) -> None:
    # Let the cache hold 1.9 MB for the user: more than the tab's 1 MiB queue.
    hub = await start(nursery, SMAPWS_SNAPSHOT_PER_USER_BYTES=4 * 1024 * 1024)
    for i in range(32):
        await publish(hub, "u1", "project_progress", project_id=f"p{i}", pad="x" * PAD)
    await trio.testing.wait_all_tasks_blocked()
    for _ in range(3):  # every connect, not only the first
        async with connect(hub, "u1") as ws:
            await wait_connections(hub, 1)
            await publish(hub, "u1", "notification", n="live")
            got = []
            while not got or got[-1]["type"] != "notification":
                got.append(await receive_json(ws))
        await wait_connections(hub, 0)
        state = [m["payload"]["project_id"] for m in got[:-1]]
        # The newest state that fits half the queue, oldest update first.
        assert 4 <= len(state) < 32 and state == [f"p{i}" for i in range(32 - len(state), 32)]
    assert metric(hub, "websocket_connections_closed_total", {"cause": "slow_consumer"}) == 0
    assert metric(hub, "websocket_slow_consumer_closes_total") == 0


async def test_a_slow_consumer_close_is_counted_in_both_metrics(nursery: trio.Nursery) -> None:
    hub = await start(nursery, SMAPWS_SEND_QUEUE_BYTES=256 * 1024)
    async with connect(hub, "u1") as ws:
        await wait_connections(hub, 1)
        conn = next(iter(hub.app.hub.all_connections()))
        # What register() offers (the path that was not counted): past the queue.
        for _ in range(8):
            conn.offer(resync_envelope("test", 0.0, trio.current_time(), pad="x" * PAD))
        del ws
    await wait_connections(hub, 0)
    closed = metric(hub, "websocket_connections_closed_total", {"cause": "slow_consumer"})
    assert closed == 1 == metric(hub, "websocket_slow_consumer_closes_total")


async def test_resuming_from_the_oldest_id_replays_at_most_the_resume_cap(
    nursery: trio.Nursery,
) -> None:
    hub = await start(nursery)
    async with connect(hub, "u1") as ws:
        await publish(hub, "u1", "notification", n=0)
        oldest = await receive_json(ws)
    await wait_connections(hub, 0)
    for i in range(1, 80):  # ~800 KB the tab missed, all in its 1 MiB window
        await publish(hub, "u1", "notification", n=i, pad="x" * 10_000)
    await trio.testing.wait_all_tasks_blocked()
    async with connect(hub, "u1", query=f"?since={oldest['id']}") as ws:
        first = await receive_json(ws)
        await publish(hub, "u1", "notification", n="live")
        received = 0
        while True:
            raw = await ws.recv()
            if json.loads(raw)["payload"].get("n") == "live":
                break
            received += len(raw)
    assert first["type"] == "resync" and first["payload"]["reason"] == "history_gap"
    assert received < 256 * 1024
    assert metric(hub, "websocket_resumes_total", {"result": "too_large"}) == 1


async def test_a_flood_to_unused_ids_leaves_a_resuming_tabs_window(nursery: trio.Nursery) -> None:
    hub = await start(
        nursery, SMAPWS_HISTORY_MAX_BYTES=256 * 1024, SMAPWS_SNAPSHOT_MAX_BYTES=256 * 1024
    )
    async with connect(hub, "alice") as ws:
        await publish(hub, "alice", "project_progress", project_id="mine", done=1)
        seen = await receive_json(ws)
    await wait_connections(hub, 0)
    for i in range(1000):  # ~1.9 MB accounted to ids nobody uses, in each cache
        await publish(hub, f"nobody-{i}", "project_progress", project_id="p", done=i)
    await publish(hub, "alice", "notification", n=2)
    await trio.testing.wait_all_tasks_blocked()
    assert hub.app.history is not None and hub.app.history.bytes <= 256 * 1024
    async with connect(hub, "alice", query=f"?since={seen['id']}&since_age=1") as ws:
        got = await receive_json(ws)
    assert got["type"] == "notification" and got["payload"] == {"n": 2}
    assert metric(hub, "websocket_resumes_total", {"result": "replayed"}) == 1
    async with connect(hub, "alice") as ws:  # a reload: her current state is still there
        state = await receive_json(ws)
    assert state["id"] == seen["id"] and state["payload"] == {"project_id": "mine", "done": 1}
