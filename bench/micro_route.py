"""What routing one broker message costs the router, per message: parse,
id, replay window, current state and the offer to each connection of the
user, as ``App.route`` does them (no socket: the offers queue).

Two cases, alternated in one run: a user with one open tab (its queue taken
after each round, as a writer would), and a user nobody holds on this hub
(parsed, identified and kept in the window all the same). And, alternated
in the same run, the envelope alone: framed once with its id (``parse(...,
message_id=)``) against the way it was built before, framed, then the id
spliced in and framed again (:func:`framed_twice`, a copy of the old code).

With ``--against REV``, instead: the profiled workload (Redis mode with the
fleet log, the default configuration: 2,000 users with 2 tabs each, ~200 B
notifications, each message's append queued for the log) routed by the
working tree and by smapws as of git revision ``REV`` imported beside it
(:mod:`bench.against`), rounds alternated (thread CPU time, the collector
off within a round); and, the same way, the sans-IO parts of it alone,
``Router.route`` and ``parse``::

    .venv/bin/python -m bench.micro_route [--against HEAD~1 [--rounds 41]]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import time
from types import ModuleType
from typing import Any

import trio

import smapws
from smapws import load_config
from smapws._core.envelope import Envelope, parse
from smapws._core.frames import text_frame
from smapws._io.app import App
from smapws._io.brokers.memory import MemoryBroker
from smapws._io.connection import Connection

USERS = 100
MESSAGES = 20_000
ROUNDS = 7

#: The fleet workload (``--against``): users, tabs each, messages per round.
FLEET_USERS = 2000
FLEET_TABS = 2
FLEET_MESSAGES = 4000


def progress(i: int) -> bytes:
    return json.dumps(
        {
            "type": "project_progress",
            "payload": {
                "project_id": f"proj_{i % 7}",
                "status": "CRAWLING",
                "total": 1000,
                "done": i % 1000,
                "errors": 2,
                "progress_percent": (i % 1000) / 10,
            },
        },
        separators=(",", ":"),
    ).encode()


def notification(i: int) -> bytes:
    """~180 B, as the profiled workload's."""
    return json.dumps(
        {
            "type": "notification",
            "payload": {
                "title": f"Crawl finished {i % 97}",
                "message": "Your project has new mentions to review in the dashboard.",
                "level": "info",
                "project_id": f"proj_{i % 7}",
                "count": i % 1000,
            },
        },
        separators=(",", ":"),
    ).encode()


def framed_twice(raw: bytes, mid: str) -> Envelope:
    """The envelope as the router built it before: ``parse`` then the old
    ``with_id`` (a second envelope and frame)."""
    env = parse(raw, wall_time=1.7e9, received_at=0.0)
    text = env.text
    field = b'"id":"' + mid.encode("ascii") + b'"}'
    if b'"id"' in text:
        obj = json.loads(text)
        if "id" in obj:
            obj["id"] = mid
            body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        else:
            body = text[:-1] + b"," + field
    else:
        body = text[:-1] + b"," + field
    return Envelope(env.type, env.kind, env.key, text_frame(body), env.received_at)


def framed_once(raw: bytes, mid: str) -> Envelope:
    return parse(raw, wall_time=1.7e9, received_at=0.0, message_id=mid)


def envelopes(data: list[bytes]) -> None:
    mid = "0123456789abcdef"
    assert framed_once(data[0], mid).frame == framed_twice(data[0], mid).frame
    results: dict[str, list[float]] = {"framed twice": [], "framed once": []}
    for _ in range(ROUNDS):
        for name, build in (("framed twice", framed_twice), ("framed once", framed_once)):
            start = time.perf_counter()
            for raw in data:
                build(raw, mid)
            results[name].append((time.perf_counter() - start) / len(data) * 1e6)
    twice, once = (statistics.median(r) for r in results.values())
    print(
        f"envelope of a {len(data[0])} B progress message with its id: framed twice "
        f"{twice:.2f} us, framed once {once:.2f} us (once/twice {once / twice:.2f}x)"
    )


async def main() -> None:
    config = load_config({"JWT_SECRET": "x" * 32, "SMAPWS_HISTORY_TTL": "300"})
    app = App(config, MemoryBroker())
    conns = []
    for u in range(USERS):
        conn = Connection(app, f"held{u}", expires_at=None, remote="-", now=0.0)
        app.hub.add(conn.user_id, conn)
        conns.append(conn)
    data = [progress(i) for i in range(MESSAGES)]
    cases = {
        "one tab": [f"user_noti:held{i % USERS}".encode() for i in range(MESSAGES)],
        "no tab": [f"user_noti:free{i % USERS}".encode() for i in range(MESSAGES)],
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    route = app.route
    for _ in range(ROUNDS):
        for name, channels in cases.items():
            wall, now = time.time(), trio.current_time()
            start = time.perf_counter()
            for channel, raw in zip(channels, data, strict=True):
                route(channel, raw, wall_time=wall, now=now)
            results[name].append((time.perf_counter() - start) / MESSAGES * 1e6)
            for conn in conns:
                conn.outbox.take_all()
    envelopes(data)
    for name, runs in results.items():
        print(
            f"route() of a {len(data[0])} B progress message, {name}: "
            f"median {statistics.median(runs):.2f} us/message (min {min(runs):.2f})"
        )


class FleetHub:
    """One version's App in Redis mode with a fleet log (never run: after
    each round the router's appends are dropped with the log, for a new
    one), its users' tabs registered as the front door does."""

    def __init__(self, package: ModuleType) -> None:
        def module(name: str) -> Any:
            return importlib.import_module(f"{package.__name__}.{name}")

        config = package.load_config({"JWT_SECRET": "x" * 32, "REDIS_URL": "redis://127.0.0.1:1/0"})
        metrics = module("metrics").Metrics()
        client = module("_io.brokers.redis").PublishClient(config.redis_url, timeout=1.0)
        fleet_log = module("_io.fleetlog").FleetLog

        def new_fleet() -> Any:
            return fleet_log(
                client,
                ttl=config.history_ttl,
                per_user=config.history_per_user,
                max_bytes=1 << 30,
                metrics=metrics,
                queue=FLEET_MESSAGES + 1,
            )

        self.new_fleet = new_fleet
        broker = module("_io.brokers.memory").MemoryBroker()
        self.app = module("_io.app").App(config, broker, metrics=metrics, fleet=new_fleet())
        self.conns = []
        for u in range(FLEET_USERS):
            for _ in range(FLEET_TABS):
                conn = module("_io.connection").Connection(
                    self.app, f"u{u}", expires_at=None, remote="-", now=0.0
                )
                self.app.routing.register(conn.user_id, conn, None, 0.0)
                self.conns.append(conn)

    def taken(self) -> None:
        """What a round queued is gone: the tabs' queues and the appends."""
        for conn in self.conns:
            conn.outbox.take_all()
        self.app.fleet = self.new_fleet()


#: Messages routed with one clock reading, as the router task does a batch
#: (ROUTER_BATCH at most; fewer when the broker's queue holds fewer).
FLEET_BATCH = 16


def stages(hub: FleetHub, package: ModuleType) -> dict[str, Any]:
    """What is timed of one version: ``App.route`` (the whole; and for
    users with no tab here, as most users a hub of a fleet receives in
    pattern mode), and its sans-IO parts on their own: ``Router.route``
    (the same work but the offers and the append's queueing) and
    ``parse``."""
    parse = importlib.import_module(f"{package.__name__}._core.envelope").parse
    routing = hub.app.routing

    def app_route(channel: bytes, raw: bytes, wall: float, now: float) -> None:
        hub.app.route(channel, raw, wall_time=wall, now=now)

    def app_route_no_tab(channel: bytes, raw: bytes, wall: float, now: float) -> None:
        hub.app.route(b"user_noti:free" + channel[11:], raw, wall_time=wall, now=now)

    def router_route(channel: bytes, raw: bytes, wall: float, now: float) -> None:
        routing.route(channel, raw, wall=wall, now=now)

    def parse_only(channel: bytes, raw: bytes, wall: float, now: float) -> None:
        parse(raw, wall_time=wall, received_at=now, message_id="0123456789abcdef")

    return {
        "App.route()": app_route,
        "  no tab": app_route_no_tab,
        "Router.route()": router_route,
        "parse()": parse_only,
    }


async def against(rev: str, rounds: int) -> None:
    from bench.against import smapws_as

    packages = {rev: smapws_as(rev), "new": smapws}
    hubs = {name: FleetHub(package) for name, package in packages.items()}
    timed = {name: stages(hubs[name], package) for name, package in packages.items()}
    data = [notification(i) for i in range(FLEET_MESSAGES)]
    channels = [f"user_noti:u{i % FLEET_USERS}".encode() for i in range(FLEET_MESSAGES)]
    batches = [
        list(zip(channels[i : i + FLEET_BATCH], data[i : i + FLEET_BATCH], strict=True))
        for i in range(0, FLEET_MESSAGES, FLEET_BATCH)
    ]
    results: dict[tuple[str, str], list[float]] = {}
    order = list(hubs)
    for r in range(rounds + 2):  # two rounds to warm up (the windows fill)
        for stage in timed["new"]:
            for name in order if r % 2 else order[::-1]:
                run = timed[name][stage]
                gc.collect()
                gc.disable()
                start = time.thread_time()
                for batch in batches:
                    wall, now = time.time(), trio.current_time()
                    for channel, raw in batch:
                        run(channel, raw, wall, now)
                spent = time.thread_time() - start
                gc.enable()
                hubs[name].taken()
                if r >= 2:
                    results.setdefault((stage, name), []).append(spent / FLEET_MESSAGES * 1e6)
    print(
        f"a {len(data[0])} B notification to {FLEET_TABS} tabs, fleet log on, "
        f"{FLEET_BATCH} messages per clock reading:"
    )
    for stage in timed["new"]:
        base, new = results[stage, rev], results[stage, "new"]
        ratios = [n / b for b, n in zip(base, new, strict=True)]
        print(
            f"  {stage:14} {rev} {statistics.median(base):6.2f} us/message, new "
            f"{statistics.median(new):6.2f}: new/{rev} {statistics.median(ratios):.3f}x "
            f"(median of per-round ratios; of the medians "
            f"{statistics.median(new) / statistics.median(base):.3f}x)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", metavar="REV", help="the fleet workload against REV")
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args()
    if args.against:
        trio.run(against, args.against, args.rounds)
    else:
        trio.run(main)
