"""smapws with ``SMAPWS_WORKERS=2`` on two cores against one worker on the same cores.

``python -m bench.workers`` runs :mod:`bench.run`'s workloads (W4, W3, W2, W1, same
plan, same load generator) against ``smapws serve`` once per worker count (default
1, then 2), each time with a fresh Redis, and prints what the issue asks of
workers: **published messages/s** the group kept up with (W1's deliveries/s
divided by the tabs per user) and **handshakes/s** (W4), each as a ratio to one
worker ("two workers >= 1.8x one").

CPUs: the hub (supervisor and workers) gets ``--hub-cpus`` (default: the first two
usable CPUs) whatever its worker count, so only the count changes; Redis, the load
generator and the publisher get the remaining usable CPUs. With no CPU left over
(a 2-CPU machine) everything runs on the hub's two CPUs: the run says so, and the
two-worker figures then show the machine's limit rather than the hub's. Other
processes' load on the CPUs used is measured in every case. The hub's CPU and RSS
are its whole process group's.

Subscription mode (``--mode``, ``SMAPWS_SUBSCRIBE_MODE``): ``user`` by default, where
each worker receives only its own users' messages; in ``pattern`` mode every worker
parses every published message, so the published rate cannot scale with workers
(README, *Workers*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/workers.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs
from bench.run import (
    BENCH_DIR,
    FULL,
    NOISY_FOREIGN_PCT,
    QUICK,
    SATURATED_PCT,
    HubBench,
    Plan,
    _raise_fd_limit,
    machine_info,
)


def limit_of(
    step: dict[str, Any] | None, workers: int, shared: bool, hub_cpus: int, side_cpus: int
) -> str:
    """What stopped the group at ``step`` (the first W1 step above the kept-up figure
    that did not keep up): ``hub`` (its processes used ``workers`` cores), ``shared
    cores`` (hub and clients on the same CPUs filled them), ``clients`` (their own
    CPUs were full), ``foreign load`` (other processes took over 10 % of a CPU),
    ``unclear``, or ``not reached``."""
    if step is None:
        return "not reached"
    hub_pct = step.get("hub_cpu_pct", 0.0)
    side_pct = step.get("core1_busy_pct", 0.0)
    foreign = max(step.get("foreign_hub_cpu_pct", 0.0), step.get("foreign_side_cpu_pct", 0.0))
    if hub_pct >= SATURATED_PCT * workers:
        return "hub"
    if shared and hub_pct + side_pct >= SATURATED_PCT * hub_cpus:
        return "shared cores"
    if not shared and side_pct >= SATURATED_PCT * side_cpus:
        return "clients"
    return "foreign load" if foreign >= NOISY_FOREIGN_PCT else "unclear"


def figures(
    result: dict[str, Any], plan: Plan, workers: int, cpus: tuple[set[int], set[int]]
) -> dict[str, Any]:
    """The workers' headline figures of one :class:`HubBench` result."""
    routed = result.get("w1_routed") or {}
    steps = routed.get("steps", [])
    kept = routed.get("max_delivered_per_s_kept_up")
    ok = routed.get("max_delivered_per_s_p99_ok")
    best = max((s["offered_per_s"] for s in steps if s["kept_up"]), default=0)
    failed = next((s for s in steps if s["offered_per_s"] > best and not s["kept_up"]), None)
    shared = cpus[0] == cpus[1]
    top = max((s for s in steps if s["kept_up"]), key=lambda s: s["offered_per_s"], default=None)
    return {
        "workers": workers,
        "ok": result.get("ok"),
        "hub_processes": result.get("hub_processes"),
        "handshakes_per_s": (result.get("w4_connect") or {}).get("handshakes_per_s"),
        "published_per_s_kept_up": round(kept / plan.tabs) if kept else None,
        "published_per_s_p99_ok": round(ok / plan.tabs) if ok else None,
        "hub_cpu_pct_at_kept_up": top and top["hub_cpu_pct"],
        "foreign_cpu_pct_peak": result.get("foreign_hub_cpu_pct_peak"),
        "kept_up_limited_by": limit_of(failed, workers, shared, len(cpus[0]), len(cpus[1])),
        "kib_per_connection": (result.get("w3_idle_memory") or {}).get("kib_per_connection"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; 0 when every worker count ran every workload."""
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke size (bench.run --quick)")
    parser.add_argument("--counts", default="1,2", help="worker counts, comma list")
    parser.add_argument("--hub-cpus", help="CPUs of the hub, comma list (default: 2 first)")
    parser.add_argument("--mode", default="user", choices=("user", "pattern"))
    parser.add_argument("--rates", help="override W1 offered deliveries/s, comma list")
    parser.add_argument("--users", type=int, help="override the number of users")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="output folder")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rates:
        plan = replace(plan, rates=tuple(int(r) for r in args.rates.split(",")))
    if args.users:
        plan = replace(plan, users=args.users)
    counts = [int(c) for c in args.counts.split(",")]
    usable = sorted(os.sched_getaffinity(0))
    chosen = args.hub_cpus.split(",") if args.hub_cpus else usable[:2]
    hub_cpus = {int(c) for c in chosen}
    side_cpus = set(usable) - hub_cpus
    shared = not side_cpus
    # Shared: everything on the hub's CPUs (the same set twice, so that the foreign
    # load on them is still measured).
    cpus = (hub_cpus, hub_cpus) if shared else (hub_cpus, side_cpus)
    _raise_fd_limit(plan.connections + 1000)

    stamp = datetime.datetime.now(datetime.UTC)
    name = f"workers-{stamp:%Y%m%d-%H%M%S}" + ("-quick" if args.quick else "")
    report: dict[str, Any] = {
        "timestamp": stamp.isoformat(timespec="seconds"),
        "machine": machine_info(cpus),
        "plan": {**asdict(plan), "connections": plan.connections},
        "mode": args.mode,
        "hub_cpus": sorted(hub_cpus),
        "clients_share_hub_cpus": shared,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "runs": {},
    }
    if shared:
        print(
            f"note: only {len(usable)} usable CPUs: the clients share the hub's "
            "(the figures show the machine's limit, not only the hub's)"
        )
    rows = []
    with procs.pinned_self(cpus[1]), tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            label = f"smapws-{n}w"
            print(f"== {label}: {plan.connections} connections ...", flush=True)
            env = {"SMAPWS_WORKERS": str(n), "SMAPWS_SUBSCRIBE_MODE": args.mode}
            argv_hub = [sys.executable, "-m", "smapws", "serve"]
            t0 = time.monotonic()
            result = HubBench(label, argv_hub, plan, cpus, Path(tmp), env).run()
            result["wall_s"] = round(time.monotonic() - t0, 1)
            state = "ok" if result["ok"] else f"FAILED: {result['error']}"
            print(f"   {label} done in {result['wall_s']} s: {state}", flush=True)
            report["runs"][label] = result
            rows.append(figures(result, plan, n, cpus))
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["summary"] = rows
    one = rows[0]
    for row in rows:
        row["handshakes_x_first"] = _ratio(row["handshakes_per_s"], one["handshakes_per_s"])
        row["published_x_first"] = _ratio(
            row["published_per_s_kept_up"], one["published_per_s_kept_up"]
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nmode {args.mode}, hub on CPUs {sorted(hub_cpus)}" + (" (shared)" if shared else ""))
    keys = (
        ("handshakes_per_s", "W4 handshakes/s"),
        ("handshakes_x_first", "... x first count"),
        ("published_per_s_kept_up", "W1 published msg/s kept up"),
        ("published_x_first", "... x first count"),
        ("published_per_s_p99_ok", "W1 published msg/s, p99<=50ms"),
        ("hub_cpu_pct_at_kept_up", "hub CPU % at that rate"),
        ("kept_up_limited_by", "kept-up figure limited by"),
        ("foreign_cpu_pct_peak", "others on the hub's CPUs, peak %"),
        ("kib_per_connection", "W3 idle RSS per connection (KiB)"),
    )
    print(f"{'workers':<34}" + "".join(f"{r['workers']:>14}" for r in rows))
    for key, label in keys:
        print(f"{label:<34}" + "".join(f"{r[key]!s:>14}" for r in rows))
    print(f"load average {report['load_average_start']} -> {report['load_average_end']}")
    print(f"\nresults: {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: every child process was stopped", file=sys.stderr)
        sys.exit(130)
