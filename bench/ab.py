"""Before/after on a shared machine: hubs alternated, hub CPU per delivery.

    .venv/bin/python -m bench.ab smapws@HEAD~1 smapws --rounds 5
    .venv/bin/python -m bench.ab smapws baseline go node floor --rounds 3
    .venv/bin/python -m bench.ab smapws smapws+SMAPWS_HISTORY_TTL=0 go centrifuge --rounds 3

Runs the hubs in turn, ``--rounds`` times (A B A B ...), each time: start it,
open the connections (2,000 users x 2 tabs: W4, the connect storm, whose
handshakes/s it reports too), one W1 step at ``--rate``
deliveries/s for ``--seconds``, stop it. Prints each round's hub CPU per
delivery, p99, foreign load on the hub's CPU and handshakes/s, then the
medians and their ratios to the first hub's.
Alternating and taking medians is what makes a comparison usable when other
processes come and go on the machine; on a quiet machine ``bench.run`` says more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from bench import peers
from bench.run import FULL, HubBench, _choose_cpus, _raise_fd_limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab")
    parser.add_argument(
        "hubs", nargs="+", help="hub names (smapws@REV and smapws+SMAPWS_X=V allowed)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=24000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    plan = replace(
        FULL, rates=(args.rate,), cost_rate=args.rate, step_s=args.seconds, fanout_runs=1,
        settle_s=1.0,
    )  # fmt: skip
    cpus = _choose_cpus(True)
    _raise_fd_limit(plan.connections + 1000)
    figures: dict[str, list[float]] = {h: [] for h in args.hubs}
    p99s: dict[str, list[float]] = {h: [] for h in args.hubs}
    shakes: dict[str, list[float]] = {h: [] for h in args.hubs}
    with tempfile.TemporaryDirectory(prefix="smapws-ab-") as tmp:
        commands = {h: peers.prepare(h, Path(tmp)) for h in args.hubs}
        for i in range(args.rounds):
            for hub in args.hubs:
                argv_hub, env = commands[hub]
                result = HubBench(hub, argv_hub, plan, cpus, Path(tmp), env).run()
                step = (result.get("w1_routed") or {}).get("cost_step") or {}
                us = step.get("hub_cpu_us_per_delivery")
                if step.get("p99_ms") is not None:
                    p99s[hub].append(step["p99_ms"])
                storm = (result.get("w4_connect") or {}).get("handshakes_per_s")
                if storm:
                    shakes[hub].append(storm)
                print(
                    f"round {i + 1} {hub:>20}: {us} us/delivery, "
                    f"p99 {step.get('p99_ms')} ms, hub CPU "
                    f"{step.get('hub_cpu_pct')} %, foreign on its CPU "
                    f"{step.get('foreign_hub_cpu_pct')} %, {storm} handshakes/s, "
                    f"{result.get('error') or 'ok'}",
                    flush=True,
                )
                if us is not None:
                    figures[hub].append(us)
    medians = {h: statistics.median(v) if v else None for h, v in figures.items()}
    storms = {h: statistics.median(v) if v else None for h, v in shakes.items()}
    first, first_storm = medians[args.hubs[0]], storms[args.hubs[0]]
    for hub, m in medians.items():
        ratio = f", {m / first:.2f}x {args.hubs[0]}" if m and first else ""
        p99 = statistics.median(p99s[hub]) if p99s[hub] else None
        s = storms[hub]
        storm_ratio = f", {s / first_storm:.2f}x {args.hubs[0]}" if s and first_storm else ""
        print(
            f"median {hub:>20}: {m} us per delivery{ratio}, p99 {p99} ms; "
            f"{s} handshakes/s{storm_ratio} ({len(figures[hub])} rounds)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
