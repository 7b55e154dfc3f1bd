"""How fast the hub reads Redis: messages/s and MB/s through the whole read
path (the pump, the router's parse, ids, replay window and current-state
cache), for 200 B and 60 KB messages (issue 16: "never the slow reader of
Redis").

Starts a throw-away ``redis-server`` (pub/sub output-buffer limit lifted, so
that a hub falling behind shows as a backlog, not a drop) and one ``smapws
serve`` on it, with no tab open, then pipelines ``--count`` messages of each
size to distinct users from this process as fast as Redis takes them. Reports,
for each size: the rate Redis accepted the publishes, the rate the hub read
them (first publish to the last message counted by
``websocket_broker_messages_received_total``), the hub's CPU per message,
and the largest backlog Redis held for the hub (``omem`` of its pub/sub
connection, sampled every 50 ms): while that stays far below Redis's
``client-output-buffer-limit pubsub``, the hub is not the slow reader::

    .venv/bin/python -m bench.broker_read [--count-small 50000] [--count-large 3000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import redis

from bench.procs import cpu_seconds, hub_on_redis, metric_value


def received(port: int) -> int:
    return int(metric_value(port, "websocket_broker_messages_received_total"))


def subscriber_omem(client: redis.Redis) -> int:
    """Bytes Redis holds for the hub's pub/sub connection (its output buffer)."""
    return max(
        (int(c.get("omem", 0)) for c in client.client_list() if int(c.get("psub", 0)) > 0),
        default=0,
    )


def measure(
    redis_port: int, hub_port: int, hub_pid: int, size: int, count: int
) -> dict[str, float]:
    client = redis.Redis(port=redis_port)
    sampler = redis.Redis(port=redis_port)
    pad = "x" * max(0, size - 90)
    start_count = received(hub_port)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, subscriber_omem(sampler))
            time.sleep(0.05)

    sampling = threading.Thread(target=sample, daemon=True)
    messages = [
        json.dumps(
            {"type": "project_progress", "payload": {"project_id": "p", "done": i, "pad": pad}},
            separators=(",", ":"),
        ).encode()
        for i in range(count)
    ]
    nbytes = sum(map(len, messages))
    cpu0 = cpu_seconds(hub_pid)
    sampling.start()
    t0 = time.monotonic()
    for lo in range(0, count, 500):
        pipe = client.pipeline(transaction=False)
        for i in range(lo, min(lo + 500, count)):
            pipe.publish(f"user_noti:bench-{i}", messages[i])
        pipe.execute()
    published = time.monotonic() - t0
    deadline = time.monotonic() + 120
    while received(hub_port) < start_count + count and time.monotonic() < deadline:
        time.sleep(0.01)
    read = time.monotonic() - t0
    done.set()
    sampling.join()
    got = received(hub_port) - start_count
    cpu = cpu_seconds(hub_pid) - cpu0
    return {
        "message_bytes": round(nbytes / count),
        "messages": count,
        "hub_received": got,
        "redis_accepted_msg_per_s": round(count / published),
        "hub_read_msg_per_s": round(got / read),
        "hub_read_MB_per_s": round(nbytes * got / count / read / 1e6, 1),
        "hub_cpu_us_per_msg": round(cpu / max(got, 1) * 1e6, 1),
        "peak_backlog_in_redis_MB": round(peak / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count-small", type=int, default=50_000)
    parser.add_argument("--count-large", type=int, default=3_000)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="smapws-bench-") as d,
        hub_on_redis(Path(d)) as (redis_port, hub_port, hub),
    ):
        results = [
            measure(redis_port, hub_port, hub.pid, 200, args.count_small),
            measure(redis_port, hub_port, hub.pid, 60_000, args.count_large),
        ]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
