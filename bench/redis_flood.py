"""The issue's pipelined flood against Redis's default limits and the
README's recommended ones (issue 16): what a bystander receives.

For each setting: a throw-away ``redis-server`` and one ``smapws serve``
(defaults), one bystander tab (a raw WebSocket) that gets a notification
every 50 ms, and 25,000 project_progress of 60 KB to distinct users,
pipelined from this process as fast as Redis takes them. Reports the hub's
subscription drops by cause, what it received, and how many of the
bystander's notifications arrived (and how many ``resync``)::

    .venv/bin/python -m bench.redis_flood [--count 25000]
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import redis

from bench.procs import BENCH_SECRET, http_get, hub_on_redis, metric_value
from bench.wsclient import OP_TEXT, handshake_request, parse_frames
from smapws._core.auth import mint

LIMITS = {
    "default": {"client-output-buffer-limit": "pubsub 32mb 8mb 60"},
    "recommended": {
        "client-output-buffer-limit": "pubsub 256mb 128mb 60",
        "proto-max-bulk-len": "1mb",
    },
}


def tab(port: int, user: str) -> tuple[socket.socket, bytes]:
    """An open WebSocket of ``user`` and the bytes read past its handshake."""
    s = socket.create_connection(("127.0.0.1", port))
    token = mint(user, key=BENCH_SECRET, now=time.time(), ttl=3600)
    request, _ = handshake_request("127.0.0.1", port, "/ws", token)
    s.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    return s, head[head.index(b"\r\n\r\n") + 4 :]


def run(setting: str, count: int) -> dict[str, object]:
    with (
        tempfile.TemporaryDirectory(prefix="smapws-bench-") as d,
        hub_on_redis(Path(d)) as (redis_port, hub_port, _),
    ):
        client = redis.Redis(port=redis_port)
        for name, value in LIMITS[setting].items():
            client.config_set(name, value)
        sock, rest = tab(hub_port, "bystander")
        types: list[str] = []
        sent = 0
        stop = threading.Event()

        def read() -> None:
            buf = rest
            sock.settimeout(0.5)
            while not stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                frames, buf = parse_frames(buf + data)
                types.extend(json.loads(p)["type"] for _, op, p in frames if op == OP_TEXT)

        def notify() -> None:
            nonlocal sent
            other = redis.Redis(port=redis_port)
            note = json.dumps({"type": "notification", "payload": {}})
            while not stop.is_set():
                other.publish("user_noti:bystander", note)
                sent += 1
                time.sleep(0.05)

        threads = [threading.Thread(target=f, daemon=True) for f in (read, notify)]
        for t in threads:
            t.start()
        pad = "x" * 60_000
        t0 = time.monotonic()
        for lo in range(0, count, 500):
            pipe = client.pipeline(transaction=False)
            for i in range(lo, min(lo + 500, count)):
                msg = {"type": "project_progress", "payload": {"project_id": "p", "pad": pad}}
                pipe.publish(f"user_noti:flood-{i}", json.dumps(msg))
            pipe.execute()
        published = time.monotonic() - t0
        time.sleep(3)  # let the hub finish and the last notifications arrive
        stop.set()
        for t in threads:
            t.join()
        _, body = http_get("127.0.0.1", hub_port, "/metrics")
        drops = {
            line.split('"')[1]: float(line.split()[1])
            for line in body.decode().splitlines()
            if line.startswith("websocket_broker_disconnects_total{")
        }
        return {
            "redis_limits": setting,
            "published_s": round(published, 1),
            "hub_received": metric_value(hub_port, "websocket_broker_messages_received_total"),
            "subscription_drops": drops,
            "bystander_notifications": f"{types.count('notification')} of {sent}",
            "bystander_resyncs": types.count("resync"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=25_000)
    args = parser.parse_args()
    print(json.dumps([run(setting, args.count) for setting in LIMITS], indent=2))


if __name__ == "__main__":
    main()
