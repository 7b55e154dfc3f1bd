"""What one idle WebSocket costs the hub: Python heap (tracemalloc), trio
tasks and nurseries, per connection, with N connections open (issue 17).

One hub on the in-process broker runs in this process; a child process opens
``--connections`` WebSockets to it (distinct users, nothing sent after the
101) and holds them, so the clients' allocations are not counted. The figures
are the differences between the hub with no connection and with N, after
``gc.collect``::

    .venv/bin/python -m bench.idle_memory [--connections 2000]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import tracemalloc

import trio

from bench.procs import BENCH_SECRET
from smapws._config import load
from smapws._io.server import Server, serve
from smapws._io.tasktree import task_tree

# The tabs are opened by another process (a process holds at most 20,000
# files), with the memory-budget benchmark's own opener.
_CLIENT = r"""
import sys
from bench.memory_budget import open_tabs
socks = open_tabs(int(sys.argv[1]), int(sys.argv[2]), 0)
print("ready", flush=True)
sys.stdin.read()
"""


async def measure(n: int) -> dict[str, float]:
    env = {
        "SMAPWS_HOST": "127.0.0.1",
        "SMAPWS_PORT": "0",
        "JWT_SECRET": BENCH_SECRET,
        "SMAPWS_MAX_ACCEPT_RATE": "0",
        "SMAPWS_MAX_CONNECTIONS": str(n + 100),
    }
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, load(env))
        await trio.sleep(0.5)
        gc.collect()
        before = tracemalloc.take_snapshot()
        tree0 = task_tree()
        client = await trio.lowlevel.open_process(
            [sys.executable, "-c", _CLIENT, str(server.port), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert client.stdout is not None and client.stdin is not None
        with trio.fail_after(120):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await client.stdout.receive_some(100)
                if not chunk:
                    raise SystemExit("client failed")
                line += chunk
            while server.app.hub.active_connections < n:
                await trio.sleep(0.05)
        await trio.sleep(1.0)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tree = task_tree()
        heap = sum(s.size_diff for s in after.compare_to(before, "filename"))
        await client.stdin.aclose()
        await client.wait()
        nursery.cancel_scope.cancel()
    return {
        "connections": n,
        "heap_bytes_per_connection": round(heap / n, 1),
        "tasks_per_connection": (tree.tasks - tree0.tasks) / n,
        "nurseries_per_connection": (tree.nurseries - tree0.nurseries) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args()
    tracemalloc.start()
    start = time.monotonic()
    result = trio.run(measure, args.connections)
    result["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
