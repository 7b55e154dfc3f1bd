"""Issue 16, point 1: a hub at its defaults survives the issue's flood in
the memory the Kubernetes manifest gives it (256 MiB) and keeps delivering.

No cgroup can be made from a test here, so the hub runs with RLIMIT_AS of
256 MiB (address space, a stricter bound than a memory cgroup's RSS: every
mapping counts). The flood: 6,000 project_progress messages of 60 KB to
distinct users (360 MB published; the current-state cache used to hold
every one of them), through a real redis-server, paced so that Redis's
backlog for the hub stays small (this test is about the hub's memory; how
fast it reads is ``bench.broker_read``'s)."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import trio

from .conftest import (
    SECRET,
    RedisServer,
    connect,
    free_port,
    http,
    receive_json,
    wait_port_ready,
)

LIMIT = 256 * 1024 * 1024
FLOOD = 6_000
BATCH = 200


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


async def metrics(port: int) -> dict[str, float]:
    body = (await http(port, "GET", "/metrics")).body.decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def vm_peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmPeak")


async def test_the_flood_in_256_mib_leaves_the_hub_alive_and_delivering(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": own_redis.url,
        "JWT_SECRET": SECRET,
        "SMAPWS_HOST": "127.0.0.1",
        "SMAPWS_PORT": str(port),
        "SMAPWS_LOG_LEVEL": "warning",
    }
    with (tmp_path / "hub.log").open("w") as log:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "smapws", "serve"],
            env=env,
            stderr=log,
            preexec_fn=_limit_memory,
        )
    try:
        await wait_port_ready(port, exited=lambda: proc.returncode)
        msg = json.dumps(
            {"type": "project_progress", "payload": {"project_id": "p", "pad": "x" * 60_000}}
        )
        note = json.dumps({"type": "notification", "payload": {"n": 1}})
        async with connect(port, "bystander") as tab:
            with own_redis.client() as c:
                for lo in range(0, FLOOD, BATCH):
                    pipe = c.pipeline(transaction=False)
                    for i in range(lo, lo + BATCH):
                        pipe.publish(f"user_noti:flood-{i}", msg)
                    pipe.execute()
                    with trio.fail_after(60):  # paced: the hub has read all but one batch
                        while True:
                            assert proc.returncode is None, (tmp_path / "hub.log").read_text()
                            got = (await metrics(port))["websocket_broker_messages_received_total"]
                            if got >= lo:
                                break
                            await trio.sleep(0.02)
                c.publish("user_noti:bystander", note)
            assert (await receive_json(tab, timeout=30))["payload"] == {"n": 1}
        m = await metrics(port)
        assert proc.returncode is None
        assert m["websocket_broker_messages_received_total"] == FLOOD + 1
        assert m.get('websocket_internal_errors_total{where="route"}', 0) == 0
        assert m["websocket_snapshot_entries"] < FLOOD  # bounded in bytes, not by count
        assert m["websocket_snapshot_bytes"] <= 32 * 1024 * 1024
        assert m["websocket_history_bytes"] <= 32 * 1024 * 1024
        assert (await http(port, "GET", "/ready")).status == 200
        peak = vm_peak_mib(proc.pid)
        assert peak < LIMIT / 2**20
        print(f"\nhub VmPeak {peak:.0f} MiB under RLIMIT_AS {LIMIT >> 20} MiB after the flood")
    finally:
        proc.kill()
        await proc.wait()
