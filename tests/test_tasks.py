"""``websocket_tasks``: the hub's trio tasks, counted at scrape time, follow
the connections up and come back down when they close (what
``python -m bench.soak`` watches for leaks)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from smapws._io.server import Server
from smapws._io.tasktree import task_tree

from .conftest import connect, metric, wait_connections


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
