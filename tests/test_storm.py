"""Reconnect storms and churn: the accept rate limit, and nothing left behind."""

from __future__ import annotations

import os
import time

import trio

from smapws import Server, serve

from .conftest import make_config, metric, token
from .test_websocket import UPGRADE_HEAD, raw_upgrade


async def test_accept_rate_limit_answers_503_with_retry_after(nursery: trio.Nursery) -> None:
    server: Server = await nursery.start(serve, make_config(SMAPWS_MAX_ACCEPT_RATE=2))
    opened = []
    for user in ("a", "b"):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(
            UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={token(user)}\r\n").encode()
        )
        assert b" 101 " in await stream.receive_some(4096)
        opened.append(stream)
    r = await raw_upgrade(server.port, user="c")
    assert r.status == 503
    assert 1 <= int(r.headers["retry-after"]) <= 2  # refill time, spread by jitter
    assert metric(server, "websocket_connections_rejected_total", {"reason": "rate_limited"}) == 1
    for stream in opened:
        await stream.aclose()


def _tasks() -> int:
    """Every live trio task, walking the tree from the root."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _one_client(port: int, i: int, head: bytes) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            assert chunk, "server closed during the upgrade"
            data += chunk
        assert data.startswith(b"HTTP/1.1 101 ")
        if i % 2:
            # A polite client: a masked close frame (code 1000), then wait for EOF.
            await stream.send_all(b"\x88\x82\x00\x00\x00\x00\x03\xe8")
            with trio.fail_after(10):
                while await stream.receive_some(4096):
                    pass
        # else: the tab just vanishes (TCP close without a close frame).


async def test_churn_of_10000_connections_leaves_nothing_behind(nursery: trio.Nursery) -> None:
    server: Server = await nursery.start(serve, make_config(SMAPWS_MAX_ACCEPT_RATE=0))
    app = server.app
    await trio.sleep(0.1)
    tasks_before, fds_before = _tasks(), _fds()
    heads = [
        UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={token(f'u{u}')}\r\n").encode()
        for u in range(50)
    ]
    total, parallel = 10_000, 100
    start = time.monotonic()

    async def worker(w: int) -> None:
        for i in range(w, total, parallel):
            await _one_client(server.port, i, heads[i % len(heads)])

    with trio.fail_after(240):
        async with trio.open_nursery() as clients:
            for w in range(parallel):
                clients.start_soon(worker, w)
        while app.hub.active_connections or app.pending_upgrades:
            await trio.sleep(0.01)
    elapsed = time.monotonic() - start
    assert metric(server, "websocket_connections_total") == total
    assert metric(server, "websocket_active_connections") == 0
    assert metric(server, "websocket_active_users") == 0
    assert app.hub.active_users == 0
    assert app.pending_upgrades == 0
    await trio.sleep(0.1)
    assert _tasks() == tasks_before
    assert _fds() == fds_before
    print(f"churn: {total} connect/disconnect cycles in {elapsed:.1f} s")
