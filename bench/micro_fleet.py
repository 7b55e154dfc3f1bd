"""What appending to the fleet's log costs the hub per routed message, in
process, against a redis-server of its own: ``FleetLog.append_nowait`` for
each message and ``FleetLog.run``'s pipelines (building and packing the
commands, redis-py, the asyncio bridge, the replies), as the hub's CPU time
(the process's, so not Redis's). Batches of ``--batch`` entries (120: a hub
routing 12,000 messages/s sends a pipeline every 10 ms) to ``--users``
users' logs, each entry following its user's last; and ``append_nowait``
alone.

With ``--against REV``, smapws as of git revision ``REV`` runs beside the
working tree (:mod:`bench.against`), rounds alternated, and the ratio of the
two is printed. Also timed without I/O: only packing one batch's commands
with redis-py (``pack_commands``), one script call per entry against one per
``APPEND_PER_CALL`` entries::

    .venv/bin/python -m bench.micro_fleet [--against HEAD~1] [--rounds 15]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import inspect
import statistics
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import trio
import trio_asyncio
from redis.asyncio.connection import Connection as RedisConnection

import smapws
from bench.micro_route import notification
from bench.procs import free_port, start_redis, stop

USERS = 2000
BATCHES = 20


class Side:
    """One version's fleet log and the chains of its users."""

    def __init__(self, package: ModuleType, url: str, name: str) -> None:
        fleet = importlib.import_module(package.__name__ + "._core.fleet")
        fleetlog = importlib.import_module(package.__name__ + "._io.fleetlog")
        redis_io = importlib.import_module(package.__name__ + "._io.brokers.redis")
        metrics = importlib.import_module(package.__name__ + ".metrics")
        self.fleet = fleet
        self.metrics = metrics.Metrics()
        client = redis_io.PublishClient(url, timeout=5.0)

        def new_log(queue: int = 65536) -> Any:
            return fleetlog.FleetLog(
                client,
                ttl=300.0,
                per_user=100,
                max_bytes=1 << 28,
                metrics=self.metrics,
                queue=queue,
            )

        self.new_log = new_log
        self.log = new_log()
        #: The old append_nowait took the ids besides the entry.
        self.with_ids = len(inspect.signature(self.log.append_nowait).parameters) == 4
        self.channels = [b"user_noti:%s-%d" % (name.encode(), u) for u in range(USERS)]
        self.last = [fleet.GENESIS] * USERS
        self.n = 0

    def append(self, count: int) -> None:
        chain_id, encode_entry, log = self.fleet.chain_id, self.fleet.encode_entry, self.log
        wall_ms = int(time.time() * 1000)
        for _ in range(count):
            u = self.n % USERS
            channel, prev, raw = self.channels[u], self.last[u], notification(self.n)
            mid = chain_id(channel, raw, prev)
            entry = encode_entry(mid, prev, wall_ms, raw)
            if self.with_ids:
                log.append_nowait(channel, mid, prev, entry)
            else:
                log.append_nowait(channel, entry)
            self.last[u] = mid
            self.n += 1

    def appended(self, result: str) -> float:
        name = "websocket_fleet_log_appends_total"
        return self.metrics.registry.get_sample_value(name, {"result": result}) or 0.0


async def appends(sides: dict[str, Side], batch: int, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in sides}
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        for side in sides.values():
            await nursery.start(side.log.run, lambda channel: None)
        order = list(sides.items())
        for r in range(rounds + 1):  # the first round warms up
            for name, side in order if r % 2 else order[::-1]:
                gc.collect()
                gc.disable()
                start = time.process_time()
                for _ in range(BATCHES):
                    side.append(batch)
                    await side.log.flush()
                spent = time.process_time() - start
                gc.enable()
                if r:
                    results[name].append(spent / (BATCHES * batch) * 1e6)
        nursery.cancel_scope.cancel()
        for side in sides.values():
            await side.log.aclose()
    for name, side in sides.items():
        others = {r: side.appended(r) for r in ("duplicate", "off_chain", "failed", "dropped")}
        assert side.appended("written") == side.n and not any(others.values()), (name, others)
    return results


def queueing(sides: dict[str, Side], rounds: int) -> dict[str, float]:
    """Nanoseconds per ``append_nowait`` alone (what the router pays), each
    round on a new log of each side, never run."""
    count = 50_000
    entry = b"0123456789abcdef----------------0000000000000" + notification(0)
    channel = b"user_noti:u1"
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            log = side.new_log(queue=count)
            append = log.append_nowait
            args = (
                (channel, entry[:16].decode(), entry[16:32].decode(), entry)
                if side.with_ids
                else (channel, entry)
            )
            gc.disable()
            start = time.thread_time()
            for _ in range(count):
                append(*args)
            times[name].append((time.thread_time() - start) / count * 1e9)
            gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}


def packing(batch: int, rounds: int) -> dict[str, float]:
    """Microseconds per entry to pack one batch's commands, one script call
    per entry (as before) or per APPEND_PER_CALL entries (the FleetLog's own
    commands)."""
    from smapws._core.fleet import GENESIS, chain_id, encode_entry, log_key
    from smapws._io.brokers.redis import PublishClient
    from smapws._io.fleetlog import FleetLog
    from smapws.metrics import Metrics

    log = FleetLog(
        PublishClient("redis://127.0.0.1:1/0", timeout=1.0),
        ttl=300.0,
        per_user=100,
        max_bytes=1 << 28,
        metrics=Metrics(),
    )
    sha = hashlib.sha1(b"any script").hexdigest()
    items = []
    for n in range(batch):
        channel, raw = b"user_noti:u%d" % n, notification(n)
        mid = chain_id(channel, raw, GENESIS)
        items.append((channel, mid, encode_entry(mid, GENESIS, 0, raw)))

    def per_entry() -> None:
        commands = [
            ("EVALSHA", sha, 1, log_key(ch), ids[:16], ids[16:], e, 100, 300000)
            for ch, ids, e in ((ch, (mid + GENESIS).encode(), e) for ch, mid, e in items)
        ]
        packer.pack_commands(commands)

    def per_call() -> None:
        packer.pack_commands([command for command, _ in log._calls(batch_items)])

    packer = RedisConnection()
    batch_items = [(ch, e) for ch, _, e in items]
    times: dict[str, list[float]] = {"per entry": [], "per call": []}
    for _ in range(rounds):
        for name, run in (("per entry", per_entry), ("per call", per_call)):
            start = time.perf_counter()
            for _ in range(50):
                run()
            times[name].append((time.perf_counter() - start) / (50 * batch) * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", metavar="REV", help="alternate with smapws as of REV")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=120)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="micro-fleet-") as d:
        proc = start_redis(port, Path(d) / "redis.log")
        try:
            url = f"redis://127.0.0.1:{port}/0"
            packages: dict[str, Any] = {"new": smapws}
            if args.against:
                from bench.against import smapws_as

                packages = {args.against: smapws_as(args.against), **packages}
            sides = {name: Side(package, url, name) for name, package in packages.items()}
            results = trio.run(appends, sides, args.batch, args.rounds)
        finally:
            stop(proc)
    medians = {name: statistics.median(r) for name, r in results.items()}
    for name, us in medians.items():
        print(f"fleet-log append, {args.batch} per pipeline, {name}: {us:.2f} us/message (median)")
    if args.against:
        base, new = results[args.against], results["new"]
        ratios = [n / b for b, n in zip(base, new, strict=True)]
        print(
            f"new/{args.against}: {medians['new'] / medians[args.against]:.2f}x "
            f"(median of per-round ratios {statistics.median(ratios):.2f}x)"
        )
    queued = queueing(sides, args.rounds)
    print(
        "append_nowait alone: "
        + ", ".join(f"{name} {ns:.0f} ns" for name, ns in queued.items())
        + (
            f" (new/{args.against} {queued['new'] / queued[args.against]:.2f}x)"
            if args.against
            else ""
        )
    )
    packed = packing(args.batch, args.rounds)
    print(
        f"packing {args.batch} appends: one call each {packed['per entry']:.2f} us/entry, "
        f"per call {packed['per call']:.2f} us/entry "
        f"({packed['per call'] / packed['per entry']:.2f}x)"
    )


if __name__ == "__main__":
    main()
