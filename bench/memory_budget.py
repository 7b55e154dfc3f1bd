"""The README's memory budget: RSS of ``smapws serve`` at its defaults with
its caches full and N connections open (issue 16).

Starts a throw-away ``redis-server`` and one hub (defaults, but
``SMAPWS_MAX_ACCEPT_RATE=0`` so the connections open at once), and reports
its RSS (``VmRSS``) idle; after 20,000 project_progress of 60 KB to distinct
users (the issue's flood: fills the current-state cache and the replay
window by bytes); after 100,000 more of ~200 B (fills them by count); then
with ``--connections`` WebSockets open (distinct users, each sent its state)::

    .venv/bin/python -m bench.memory_budget [--connections 2000,4000]
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from pathlib import Path

import redis

from bench.procs import BENCH_SECRET, hub_on_redis, metric_value, rss_bytes
from bench.wsclient import handshake_request, parse_handshake_response
from smapws._core.auth import mint


def received(port: int) -> int:
    return int(metric_value(port, "websocket_broker_messages_received_total"))


def flood(
    client: redis.Redis, hub_port: int, prefix: str, count: int, payload: dict[str, object]
) -> None:
    """``count`` progress messages to distinct users, paced to the hub's reading
    (this measures memory, not speed)."""
    start = received(hub_port)
    batch = 500
    for lo in range(0, count, batch):
        pipe = client.pipeline(transaction=False)
        for i in range(lo, min(lo + batch, count)):
            msg = {"type": "project_progress", "payload": {"project_id": "p", "done": i, **payload}}
            pipe.publish(f"user_noti:{prefix}-{i}", json.dumps(msg))
        pipe.execute()
        while received(hub_port) < start + lo:
            time.sleep(0.01)
    while received(hub_port) < start + count:
        time.sleep(0.01)


def open_tabs(port: int, n: int, first: int) -> list[socket.socket]:
    socks = []
    for i in range(first, first + n):
        s = socket.create_connection(("127.0.0.1", port))
        request, accept = handshake_request(
            "127.0.0.1", port, "/ws", mint(f"tab-{i}", key=BENCH_SECRET, now=time.time(), ttl=3600)
        )
        s.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        parse_handshake_response(head[: head.index(b"\r\n\r\n") + 4], accept)
        socks.append(s)
    return socks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", default="2000,4000")
    args = parser.parse_args()
    steps = [int(n) for n in args.connections.split(",")]
    mib = 1 << 20
    out: dict[str, object] = {}
    socks: list[socket.socket] = []
    with (
        tempfile.TemporaryDirectory(prefix="smapws-bench-") as d,
        hub_on_redis(Path(d), {"SMAPWS_MAX_ACCEPT_RATE": "0"}) as (redis_port, hub_port, hub),
    ):
        try:
            out["idle_MiB"] = round(rss_bytes(hub.pid) / mib, 1)
            client = redis.Redis(port=redis_port)
            flood(client, hub_port, "big", 20_000, {"pad": "x" * 60_000})
            out["after_20000_x_60KB_MiB"] = round(rss_bytes(hub.pid) / mib, 1)
            flood(client, hub_port, "small", 100_000, {"status": "CRAWLING", "total": 1000})
            full = rss_bytes(hub.pid)
            out["caches_full_MiB"] = round(full / mib, 1)
            for n in steps:
                socks += open_tabs(hub_port, n - len(socks), len(socks))
                time.sleep(1)
                rss = rss_bytes(hub.pid)
                out[f"{n}_connections_MiB"] = round(rss / mib, 1)
                out[f"{n}_connections_KiB_each"] = round((rss - full) / n / 1024, 1)
        finally:
            for s in socks:
                s.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
