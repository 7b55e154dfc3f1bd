"""Delivery semantics over real sockets: conflation for a stalled reader,
1013 past the hard limit, and the current state for a tab opened mid-run."""

from __future__ import annotations

import json
import socket
from typing import Any

import trio

from smapws import Server, serve

from .conftest import (
    connect,
    make_config,
    metric,
    parse_frames,
    receive_json,
    token,
    wait_connections,
)
from .test_websocket import UPGRADE_HEAD

PAD = "x" * 40_000  # large progress messages fill the kernel buffers quickly


class StalledClient:
    """A raw WebSocket client with a small receive buffer that reads nothing
    until :meth:`read_until` is called: its socket fills and the server's
    writes to it block, as with a frozen browser tab."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def open(cls, port: int, user: str) -> StalledClient:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        head = UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={token(user)}\r\n")
        await stream.send_all(head.encode())
        client = cls(stream)
        while b"\r\n\r\n" not in client.buffer:
            client.buffer += await stream.receive_some(4096)
        status, _, client.buffer = client.buffer.partition(b"\r\n\r\n")
        assert b" 101 " in status
        return client

    async def read_until(self, done: Any, timeout: float = 30) -> list[tuple[int, bytes]]:
        """Read until ``done(frames)`` holds or the server closes."""
        with trio.fail_after(timeout):
            while True:
                frames = _complete_frames(self.buffer)
                if done(frames):
                    return frames
                chunk = await self.stream.receive_some(1 << 20)
                if not chunk:
                    return frames
                self.buffer += chunk


def _complete_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The complete frames at the start of ``data``."""
    end = 0
    while end + 2 <= len(data):
        n = data[end + 1] & 0x7F
        header = 2 if n < 126 else 4 if n == 126 else 10
        if end + header > len(data):
            break
        if n == 126:
            n = int.from_bytes(data[end + 2 : end + 4], "big")
        elif n == 127:
            n = int.from_bytes(data[end + 2 : end + 10], "big")
        if end + header + n > len(data):
            break
        end += header + n
    return parse_frames(data[:end])


def texts(frames: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(p) for op, p in frames if op == 0x1]


async def publish(server: Server, user: str, mtype: str, **payload: Any) -> None:
    data = json.dumps({"type": mtype, "payload": payload}).encode()
    await server.app.broker.publish(b"user_noti:" + user.encode(), data)


async def test_a_stalled_tab_gets_the_latest_progress_and_every_event(
    nursery: trio.Nursery,
) -> None:
    cfg = make_config(SMAPWS_WRITE_WAIT=60, SMAPWS_SEND_QUEUE_HIGH_WATER=8)
    server: Server = await nursery.start(serve, cfg)
    stalled = await StalledClient.open(server.port, "u1")
    async with (
        stalled.stream,
        connect(server, "u1") as healthy,
        connect(server, "u2") as other,
    ):
        await wait_connections(server, 3)
        published: list[dict[str, Any]] = []
        seen: list[dict[str, Any]] = []
        for i in range(300):
            project = "pabc"[1 + i % 3]
            payload = {"project_id": f"p{project}", "done": i, "pad": PAD}
            await publish(server, "u1", "project_progress", **payload)
            published.append({"type": "project_progress", "payload": payload})
            # The healthy tab of the same user reads as it goes: it gets
            # everything, one by one, while the stalled tab is stuck. (It
            # reads before a completion is published: a completion removes
            # progress of its project still queued, even on a fast tab.)
            while len(seen) < len(published):
                seen.append(await receive_json(healthy))
            if i == 150:
                done = {"project_id": "pa", "status": "DONE"}
                await publish(server, "u1", "project_completed", **done)
                published.append({"type": "project_completed", "payload": done})
            if i % 50 == 0:
                await publish(server, "u1", "notification", n=i)
                published.append({"type": "notification", "payload": {"n": i}})
        while len(seen) < len(published):
            seen.append(await receive_json(healthy))
        # Another user is served while a socket of u1 is stuck.
        await publish(server, "u2", "alert", ok=True)
        assert (await receive_json(other))["payload"] == {"ok": True}
        await publish(server, "u1", "notification", last=True)
        published.append({"type": "notification", "payload": {"last": True}})
        assert [m["payload"] for m in seen] == [m["payload"] for m in published[:-1]]
        assert (await receive_json(healthy))["payload"] == {"last": True}

        assert metric(server, "websocket_queue_high_water_total") >= 1
        assert metric(server, "websocket_progress_conflated_total") > 0
        # The stalled tab reads again.
        frames = await stalled.read_until(
            lambda fs: any(m["payload"] == {"last": True} for m in texts(fs))
        )
        # Nobody was disconnected: the stalled tab was slow, not over its bounds.
        assert server.app.hub.active_connections == 3
    got = texts(frames)
    payloads = [m["payload"] for m in got]
    sent = [m["payload"] for m in published]
    # A subsequence of what was published, in order, without duplicates.
    positions = [sent.index(p) for p in payloads]
    assert positions == sorted(set(positions))
    # Every completion and notification.
    assert [m for m in got if m["type"] != "project_progress"] == [
        {**m, "timestamp": g["timestamp"], "id": g["id"]}
        for m, g in zip(
            [m for m in published if m["type"] != "project_progress"],
            [m for m in got if m["type"] != "project_progress"],
            strict=True,
        )
    ]
    # The latest progress of every running project.
    for project in ("pb", "pc"):
        last_sent = [p for p in sent if p.get("project_id") == project][-1]
        last_got = [p for p in payloads if p.get("project_id") == project][-1]
        assert last_got == last_sent
    # Conflation happened: fewer progress messages than were published.
    assert len(got) < len(published)


async def test_a_stalled_tab_past_the_hard_limit_is_closed_with_1013(
    nursery: trio.Nursery,
) -> None:
    cfg = make_config(
        SMAPWS_WRITE_WAIT=60, SMAPWS_SEND_QUEUE_HIGH_WATER=8, SMAPWS_SEND_QUEUE_MESSAGES=16
    )
    server: Server = await nursery.start(serve, cfg)
    stalled = await StalledClient.open(server.port, "u1")
    async with stalled.stream:
        await wait_connections(server, 1)
        # Large progress messages block the writer; then lossless ones pile up.
        for i in range(150):
            await publish(server, "u1", "project_progress", project_id="p", done=i, pad=PAD)
        for i in range(40):
            await publish(server, "u1", "notification", n=i)
        assert metric(server, "websocket_slow_consumer_closes_total") == 1
        frames = await stalled.read_until(lambda fs: any(op == 0x8 for op, _ in fs))
    close = [p for op, p in frames if op == 0x8]
    assert close and int.from_bytes(close[0][:2], "big") == 1013
    # What was queued before the overflow was flushed first.
    notes = [m["payload"]["n"] for m in texts(frames) if m["type"] == "notification"]
    assert notes == list(range(len(notes))) and 0 < len(notes) < 40
    await wait_connections(server, 0)


async def test_a_tab_opened_mid_run_gets_the_current_state_first(memory_hub: Server) -> None:
    server = memory_hub
    await publish(server, "u1", "project_progress", project_id="p1", done=10)
    await publish(server, "u1", "project_progress", project_id="p2", done=5)
    await publish(server, "u1", "project_progress", project_id="p1", done=20)
    await publish(server, "u1", "project_progress", project_id="p3", done=1)
    await publish(server, "u1", "project_completed", project_id="p3", status="DONE")
    await publish(server, "u1", "notification", title="not state")
    await publish(server, "u2", "project_progress", project_id="other", done=1)
    await trio.sleep(0.05)  # let the router take them
    async with connect(server, "u1") as tab:
        first = [await receive_json(tab) for _ in range(3)]
        await publish(server, "u1", "notification", title="live")
        live = await receive_json(tab)
    assert [(m["type"], m["payload"]) for m in first] == [
        ("project_progress", {"project_id": "p2", "done": 5}),
        ("project_progress", {"project_id": "p1", "done": 20}),
        ("project_completed", {"project_id": "p3", "status": "DONE"}),
    ]
    assert live["payload"] == {"title": "live"}
    # Original timestamps: the state was stamped when it was published.
    original = {m["payload"]["project_id"]: m["timestamp"] for m in first}
    assert all(ts <= live["timestamp"] for ts in original.values())
    assert metric(server, "websocket_snapshot_messages_sent_total") == 3
    assert metric(server, "websocket_snapshot_entries") == 4  # p1, p2, p3 of u1; other of u2


async def test_stalled_tabs_past_the_hubs_total_are_closed_and_a_fast_tab_keeps_receiving(
    nursery: trio.Nursery,
) -> None:
    # Each stalled tab gets less than its own bound (SMAPWS_SEND_QUEUE_BYTES, 1 MiB):
    # only the total for all queues (1 MiB here) can close them.
    cfg = make_config(
        SMAPWS_WRITE_WAIT=60,
        SMAPWS_SEND_QUEUE_TOTAL_BYTES=1 << 20,
        SMAPWS_SEND_QUEUE_MESSAGES=1000,
    )
    server: Server = await nursery.start(serve, cfg)
    stalled = [await StalledClient.open(server.port, f"slow{i}") for i in range(6)]
    async with connect(server, "fast") as fast:
        await wait_connections(server, 7)
        per_tab = 0
        for n in range(24):  # 24 x ~40 KB = ~960 KB to each stalled tab
            for i in range(6):
                await publish(server, f"slow{i}", "notification", n=n, pad=PAD)
            per_tab += len(PAD)
            await publish(server, "fast", "notification", n=n)
            assert (await receive_json(fast))["payload"]["n"] == n
        assert per_tab < cfg.send_queue_bytes
        closes = metric(server, "websocket_slow_consumer_closes_total")
        assert closes >= 1
        # Never far past the total: at most about the total again (see outbox.py).
        assert metric(server, "websocket_send_queue_bytes") < 2 * cfg.send_queue_total_bytes
        closed = 0
        for client in stalled:
            async with client.stream:
                frames = await client.read_until(
                    lambda fs: len(fs) >= 24 or any(op == 0x8 for op, _ in fs)
                )
                close = [p for op, p in frames if op == 0x8]
                if close:
                    assert int.from_bytes(close[0][:2], "big") == 1013
                    closed += 1
        assert closed == closes
        await publish(server, "fast", "notification", n=99)
        assert (await receive_json(fast))["payload"]["n"] == 99
    await wait_connections(server, 0)
    assert metric(server, "websocket_send_queue_bytes") == 0
