"""The fleet figures (``bench/fleet.py``) still work end to end: a seconds-long smoke run.

It runs ``python -m bench.fleet --quick`` exactly as a person would (a hub in pattern
mode, then one in user mode, each on its own redis-server, then redis-benchmark) and
checks that the tooling produced a results file whose figures are present and finite,
and that each mode was what it claims (user mode sends SUBSCRIBEs, pattern mode none).
It asserts nothing about speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_fleet_figures_run_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, f"bench.fleet failed:\n{proc.stdout}\n{proc.stderr}"
    files = list(tmp_path.glob("fleet-*-quick.json"))
    assert len(files) == 1, proc.stdout
    report = json.loads(files[0].read_text())
    assert {"machine", "plan", "modes", "summary", "redis_publish"} <= report.keys()
    assert all(_finite(x) for x in report["load_average_start"] + report["load_average_end"])
    plan = report["plan"]

    for mode in ("pattern", "user"):
        result = report["modes"][mode]
        assert result["ok"] is True and result["error"] is None, result

        capacity = result["capacity"]
        assert capacity["steps"], "no capacity step ran"
        for step in capacity["steps"]:
            # Every message for this hub's users reached every tab of the user.
            assert step["received"] == step["expected"] == step["local_messages"] * plan["tabs"]
            assert step["lost"] == 0 and step["extra"] == 0
            for key in ("p50_ms", "p99_ms", "hub_cpu_pct", "hub_cpu_us_per_published"):
                assert _finite(step[key]), (mode, key, step)
            # Pattern mode receives every message, user mode only its users'.
            received = step["published"] if mode == "pattern" else step["local_messages"]
            assert step["hub_broker_received"] == received, (mode, step)

        conns = result["connections"]
        assert conns["idle_connections"] == plan["idle"]
        assert _finite(conns["hub_kib_per_connection"])
        for key in ("connect_open", "connect_first_message", "reload_open", "reload_first_message"):
            assert conns[key]["count"] == plan["probes"], (mode, key)
            assert 0 < conns[key]["p50_ms"] <= conns[key]["max_ms"], (mode, key)
        assert conns["first_message_missed"] == {}
        assert conns["subscribed_channels_end"] == 0
        subscribes = conns["redis_commands"]["whole_phase"]["subscribe"]
        if mode == "user":
            # A batched storm: fewer commands than users, and every channel let go.
            assert 0 < conns["redis_commands"]["storm"]["subscribe"] <= plan["idle"]
            assert conns["redis_commands"]["close_all_and_linger"]["unsubscribe"] > 0
        else:
            assert conns["redis_commands"]["whole_phase"]["psubscribe"] == 1
            assert subscribes <= 1  # the liveness probe's channel at most

    redis = report["redis_publish"]
    assert redis["measured"] is True, redis
    for row in redis["audiences"].values():
        assert _finite(row["publish_per_s"]) and row["publish_per_s"] > 0
    assert "capacity: published msg/s" in proc.stdout  # the printed table
