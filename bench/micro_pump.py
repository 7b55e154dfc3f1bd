"""The subscription read loop alone: messages/s through
:func:`smapws._io.brokers.redis.pump.pump` on its fast path (replies taken
from the hiredis reader behind redis-py's connection) against the same loop on
redis-py's public ``PubSub.get_message`` (the path it takes when
``fast_reader`` finds no hiredis reader), alternated in one run.

Starts a throw-away ``redis-server`` (pub/sub output-buffer limit lifted),
subscribes, then publishes ``--count`` messages of each size while nothing
reads them (Redis and the kernel hold them), and only then starts the pump:
the time from its start to the trio side having received the last message
is the read loop's own, not the publisher's. Reports the best rate and the
least CPU per message of the rounds of each path. The trio side drains the
router's channel as the router would, without parsing::

    .venv/bin/python -m bench.micro_pump [--small 20000] [--large 1500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
from pathlib import Path
from unittest import mock

import redis
import trio
import trio_asyncio

from bench.procs import free_port, start_redis, stop
from smapws._io.brokers.redis import Progress, clients_for
from smapws._io.brokers.redis import pump as pump_module
from smapws._io.brokers.redis.client import subscribe

PROBE = b"smapws:probe:bench"


def publish(port: int, size: int, count: int) -> None:
    client = redis.Redis(port=port)
    data = b"x" * size
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.publish(f"user_noti:u{i % 97}", data)
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    client.close()


async def read_rate(port: int, size: int, count: int, fast: bool) -> tuple[float, float]:
    """Messages/s the pump reads a backlog of ``count`` messages at, and
    this process's CPU microseconds per message meanwhile (the figure a
    shared machine disturbs least: the publisher has finished)."""
    clients = clients_for(f"redis://127.0.0.1:{port}/0", 10)
    send, receive = trio.open_memory_channel[tuple[bytes, bytes]](math.inf)
    pubsub = clients.client.pubsub()
    clients.pubsub = pubsub
    try:
        with trio.fail_after(10):
            await trio_asyncio.aio_as_trio(subscribe)(pubsub, "user_noti:*", PROBE)
        await trio.to_thread.run_sync(publish, port, size, count)
        # The slow path is the one pump() takes when fast_reader() finds no
        # hiredis reader (another redis-py layout, hiredis not installed).
        no_fast = mock.patch.object(pump_module, "fast_reader", lambda pubsub: None)
        with no_fast if not fast else contextlib.nullcontext():
            async with trio.open_nursery() as nursery:
                started = time.perf_counter()
                cpu = time.process_time()
                nursery.start_soon(
                    trio_asyncio.aio_as_trio(pump_module.pump),
                    pubsub,
                    send,
                    lambda: None,
                    Progress(),
                    PROBE,
                    lambda data: None,
                    lambda kind, channel: None,
                )
                got = 0
                with trio.fail_after(300):
                    while got < count:
                        await receive.receive()
                        got += 1
                elapsed = time.perf_counter() - started
                cpu = time.process_time() - cpu
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await clients.aclose()
    return count / elapsed, cpu / count * 1e6


Rates = dict[str, list[tuple[float, float]]]


async def main(args: argparse.Namespace) -> dict[str, Rates]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_redis(port, Path(tmp) / "redis.log")
        try:
            results: dict[str, Rates] = {}
            async with trio_asyncio.open_loop():
                for size, count in ((200, args.small), (60_000, args.large)):
                    rates: Rates = {"get_message": [], "fast_reader": []}
                    for _ in range(args.rounds):
                        for name, fast in (("get_message", False), ("fast_reader", True)):
                            rates[name].append(await read_rate(port, size, count, fast))
                    results[f"{size}B"] = rates
            return results
        finally:
            stop(proc)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=20_000, help="200 B messages per round")
    parser.add_argument("--large", type=int, default=1_500, help="60 KB messages per round")
    parser.add_argument("--rounds", type=int, default=3)
    results = trio.run(main, parser.parse_args())
    for size, rates in results.items():
        rate = {name: max(r for r, _ in runs) for name, runs in rates.items()}
        cpu = {name: min(c for _, c in runs) for name, runs in rates.items()}
        print(
            json.dumps(
                {
                    "size": size,
                    "msg_s": {k: round(v) for k, v in rate.items()},
                    "cpu_us_per_msg": {k: round(v, 2) for k, v in cpu.items()},
                    "cpu_ratio": round(cpu["get_message"] / cpu["fast_reader"], 2),
                    "rounds_msg_s": {k: [round(r) for r, _ in vs] for k, vs in rates.items()},
                }
            )
        )
