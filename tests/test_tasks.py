"""``websocket_tasks``: the hub's trio tasks, counted at scrape time, follow
the connections up and come back down when they close (what
``python -m bench.soak`` watches for leaks)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio
import trio.testing

from smapws._io.server import Server
from smapws._io.tasktree import task_tree

from .conftest import connect, metric, token, wait_connections


async def test_tasks_gauge_follows_connections_and_returns_to_its_baseline(
    memory_hub: Server,
) -> None:
    before = metric(memory_hub, "websocket_tasks")
    assert before == task_tree().tasks > 0
    async with AsyncExitStack() as stack:
        for i in range(20):
            await stack.enter_async_context(connect(memory_hub, f"t{i % 5}"))
        await wait_connections(memory_hub, 20)
        # The clients are tasks of this run too: at least one per tab more.
        assert metric(memory_hub, "websocket_tasks") >= before + 20
    await wait_connections(memory_hub, 0)
    with trio.fail_after(5):
        while metric(memory_hub, "websocket_tasks") != before:
            await trio.sleep(0.01)


def test_outside_a_trio_run_there_is_no_task() -> None:
    assert task_tree() == (0, 0)


UPGRADE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Cookie: access_token={token}\r\n\r\n"
)


async def test_an_idle_connection_costs_one_task_and_no_nursery(memory_hub: Server) -> None:
    """Reader, writer and heartbeat are roles of the connection's one task
    (and the hub's one heartbeat task): N idle connections add N tasks and
    no nursery. The clients are bare sockets here, which are no tasks."""
    n = 20
    before = task_tree()
    async with AsyncExitStack() as stack:
        for i in range(n):
            stream = await trio.open_tcp_stream("127.0.0.1", memory_hub.port)
            await stack.enter_async_context(stream)
            await stream.send_all(UPGRADE.format(token=token(f"idle{i}")).encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
            assert head.startswith(b"HTTP/1.1 101 ")
        await wait_connections(memory_hub, n)
        await trio.testing.wait_all_tasks_blocked()
        idle = task_tree()
        assert (idle.tasks - before.tasks, idle.nurseries - before.nurseries) == (n, 0)
    await wait_connections(memory_hub, 0)
