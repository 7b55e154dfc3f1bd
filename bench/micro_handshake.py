"""The hub's CPU per authenticated handshake, in process: a hub (``serve``,
memory broker) in this process, ``--connections`` upgrades opened against it
by the load generator's processes (W4's client: at most 100 in flight, a
fresh token per user), the hub's thread's CPU time over the storm divided by
the handshakes; best of ``--rounds`` (the connections of a round are closed,
and the hub idle again, before the next). ``--profile`` runs the hub under
cProfile instead and prints its functions by own time (cProfile's overhead
inflates the figure; read the shares)::

    .venv/bin/python -m bench.micro_handshake [--connections 4000] [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import trio

from bench.loadgen import LoadGen, user_id
from smapws._config import load
from smapws._io.server import Server, serve

SECRET = "micro-handshake-bench-secret-0123456789abcdef"
USERS = 2000


async def measure(loadgen: LoadGen, connections: int, rounds: int) -> list[float]:
    env = {
        "SMAPWS_HOST": "127.0.0.1",
        "SMAPWS_PORT": "0",
        "JWT_SECRET": SECRET,
        "SMAPWS_LOG_LEVEL": "warning",
        "SMAPWS_MAX_ACCEPT_RATE": "0",
        "SMAPWS_MAX_CONNECTIONS": str(connections + 100),
    }
    users = [user_id(i % USERS) for i in range(connections)]
    figures = []
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, load(env))
        for _ in range(rounds):
            start = time.thread_time()
            storm = await trio.to_thread.run_sync(
                lambda: loadgen.connect("127.0.0.1", server.port, users, SECRET, deadline_s=120)
            )
            spent = time.thread_time() - start
            if storm.ok != connections:
                raise SystemExit(f"only {storm.ok} of {connections} opened: {storm.statuses}")
            figures.append(spent / connections)
            await trio.to_thread.run_sync(loadgen.close_all)
            with trio.fail_after(60):
                while server.app.hub.active_connections:
                    await trio.sleep(0.05)
            await trio.sleep(2.5)  # the lingering closes end
        nursery.cancel_scope.cancel()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    loadgen = LoadGen(4)
    try:
        if args.profile:
            profiler = cProfile.Profile()
            figures = profiler.runcall(trio.run, measure, loadgen, args.connections, args.rounds)
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(45)
            print(out.getvalue())
        else:
            figures = trio.run(measure, loadgen, args.connections, args.rounds)
    finally:
        loadgen.shutdown()
    print(
        json.dumps(
            {
                "connections": args.connections,
                "profiled": args.profile,
                "us_per_handshake": [round(f * 1e6, 1) for f in figures],
                "best_us": round(min(figures) * 1e6, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
