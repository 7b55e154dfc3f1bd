"""Run the smapws benchmark: every workload against each hub, side by side.

``python -m bench.run`` (or ``python bench/run.py``) measures, for each hub named in
``--hubs`` (``smapws``, ``baseline``, ``go``, ``centrifuge``, ``node``, ``floor``; see
:mod:`bench.peers`), in one process tree it owns and cleans up:

- **W4 connect storm**: authenticated handshakes per second until all connections
  (default 2,000 users x 2 tabs) are open;
- **W3 idle memory**: hub RSS per idle authenticated connection,
  ``(RSS with N open - RSS with none) / N``;
- **W2 fan-out burst**: one message to every user in one pipelined write; time from
  the publish stamp until the last tab has it, with the load generator stopped
  during the burst (so it cannot be the limit) and, for comparison, running;
- **W1 routed**: ~200 B messages to random users at stepped offered rates: the hub's
  CPU per delivery and p99 at the cost rate (24,000 deliveries/s); the highest
  rate the hub kept up with (under 0.1 % of deliveries missing, >= 95 % of the rate
  delivered, backlog gone within 1 s) and the highest whose p99 publish-to-receive
  latency is <= 50 ms, each with what limited it (the hub's CPU or the clients').

Each hub gets its own redis-server on a free port. The hub runs on CPU 0 (``taskset
-c 0``), everything else (Redis, load generator, publisher, this coordinator) on CPU
1, when the machine has two CPUs to give. Every wait is bounded; every child process
is stopped on the way out, including on Ctrl-C, SIGTERM and errors.

Output: ``<out>/bench-<stamp>.json`` (machine info, configuration, every figure),
``<out>/bench-<stamp>.png`` (p99 against offered rate, if matplotlib is installed) and
a table on stdout with the ratios smapws/baseline and smapws/go, each hub's CPU per
delivery as a multiple of the floor's, and the issue's targets. The exit status is 0
only if every hub ran all workloads.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers, procs
from bench.loadgen import LoadGen, Samples, user_id
from bench.publisher import MESSAGE_SIZE, Publisher

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
HOST = "127.0.0.1"
# The latency budget for W1.
P99_BUDGET_MS = 50.0
# A step also fails when more than this share of its deliveries never arrived.
MAX_LOST_SHARE = 0.001
# A W1 step "kept up" when (almost) every delivery arrived and the last one within this
# long after publishing stopped: the hub sustained the rate, whatever its p99 (a stall
# such as a GC pause fails p99 without making the hub too slow for the rate).
KEEP_UP_DRAIN_S = 1.0
# ... and it delivered at least this share of the published rate, first publish to
# last receive (so a backlog of more than ~0.4 s at the end of an 8 s step is too much).
KEEP_UP_SHARE = 0.95
# A backlog still draining this long after publishing is deep overload: stop stepping.
DEEP_OVERLOAD_DRAIN_S = 5.0
# Foreign CPU on the hub's CPU above this (in any measurement window) marks the run noisy.
NOISY_FOREIGN_PCT = 10.0
# A process (or CPU) this busy in a step is saturated: it may be what limited the step.
SATURATED_PCT = 90.0
SCHEMA = 2


@dataclass(frozen=True)
class Plan:
    """The size and pace of one run (the same for every hub)."""

    users: int
    tabs: int
    workers: int
    rates: tuple[int, ...]  # offered deliveries/s, in order
    step_s: float  # publishing time per W1 step
    fanout_runs: int
    settle_s: float  # idle time before RSS readings
    max_inflight: int  # handshakes in progress at once (all workers)
    stop_after_overloads: int  # consecutive W1 steps not kept up that end the stepping
    cost_rate: int  # the W1 rate (one of ``rates``) where CPU per delivery and p99 are read
    pause_s: float  # how long the load generator stays stopped in a paused W2 burst

    @property
    def connections(self) -> int:
        """Connections the load generator opens: users x tabs."""
        return self.users * self.tabs


# W1 offered deliveries/s: the cost rate (24,000/s, the issue's) and up, dense where
# the Python hubs and the Go peer saturate one core.
FULL_RATES: tuple[int, ...] = (12000, 24000, 32000, 40000, 48000, 56000, 64000, 80000, 100000)
FULL = Plan(
    users=2000,
    tabs=2,
    workers=2,
    rates=FULL_RATES,
    step_s=6.0,
    fanout_runs=3,
    settle_s=3.0,
    max_inflight=100,
    stop_after_overloads=2,
    cost_rate=24000,
    pause_s=1.5,
)
QUICK = Plan(
    users=10,
    tabs=2,
    workers=2,
    rates=(100, 200),
    step_s=1.0,
    fanout_runs=1,
    settle_s=0.5,
    max_inflight=10,
    stop_after_overloads=2,
    cost_rate=100,
    pause_s=0.3,
)


class BenchError(Exception):
    """A workload could not be measured (the hub misbehaved or a tool failed)."""


# -- small helpers -------------------------------------------------------------------


def percentiles(latencies_ns: list[int], expected: int) -> dict[str, Any]:
    """Latency summary in ms, counting each missing delivery as infinitely late.

    ``p50_ms``/``p90_ms``/``p99_ms``/``max_ms`` are None when the rank falls on a
    missing delivery (or nothing arrived); ``received``, ``lost`` and ``extra``
    (deliveries beyond ``expected``) are counts.
    """
    lat = sorted(latencies_ns)
    total = max(expected, len(lat))
    lost = total - len(lat)

    def pick(q: float) -> float | None:
        if total == 0:
            return None
        index = max(0, math.ceil(q * total) - 1)
        return round(lat[index] / 1e6, 3) if index < len(lat) else None

    return {
        "expected": expected,
        "received": len(lat),
        "lost": lost,
        "extra": max(0, len(lat) - expected),
        "p50_ms": pick(0.50),
        "p90_ms": pick(0.90),
        "p99_ms": pick(0.99),
        "max_ms": pick(1.0) if lost == 0 else None,
    }


def worst_per_second(samples: Samples) -> list[float]:
    """The worst latency (ms) of the messages published in each second of a step.

    A short time series that shows whether a high p99 comes from steady queueing
    (every second is bad) or from stalls (one or two seconds are bad: GC, timers).
    """
    if not samples.publish_ns:
        return []
    start = min(samples.publish_ns)
    worst: dict[int, int] = {}
    for pub, lat in zip(samples.publish_ns, samples.latency_ns, strict=True):
        second = (pub - start) // 1_000_000_000
        if lat > worst.get(second, -1):
            worst[second] = lat
    return [round(worst.get(s, 0) / 1e6, 1) for s in range(max(worst) + 1)]


def delivered_rate(samples: Samples, expected: int) -> int:
    """Deliveries per second from the first publish to the last receive of a step.

    For a step the hub kept up with this is the offered rate; for an overloaded one
    it is what the hub really delivered (a backlog drained after publishing ended
    counts against it). Deliveries beyond ``expected`` (duplicates) are not counted.
    """
    if not samples.publish_ns:
        return 0
    first = min(samples.publish_ns)
    last = max(p + lat for p, lat in zip(samples.publish_ns, samples.latency_ns, strict=True))
    count = min(len(samples.latency_ns), expected)
    return round(count / max(1e-9, (last - first) / 1e9))


def _wait_received(
    loadgen: LoadGen, step: int, expected: int, timeout_s: float, idle_s: float = 5.0
) -> float:
    """Wait until ``expected`` deliveries of ``step`` arrived, nothing new came for
    ``idle_s``, or ``timeout_s`` passed; return the seconds waited."""
    start = last_change = time.monotonic()
    last = -1
    while True:
        counts, _ = loadgen.counts()
        got = counts.get(step, 0)
        now = time.monotonic()
        if got >= expected or now - start > timeout_s or now - last_change > idle_s:
            return now - start
        if got != last:
            last, last_change = got, now
        time.sleep(0.05)


def _wait_quiet(loadgen: LoadGen, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
    """Wait until no message arrived anywhere for ``quiet_s`` (the hub has drained)."""
    start = time.monotonic()
    last: dict[int, int] = {}
    last_change = start
    while time.monotonic() - start < timeout_s:
        counts, _ = loadgen.counts()
        if counts != last:
            last, last_change = counts, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            return
        time.sleep(0.1)


def _read_health(port: int) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        status, body = procs.http_get(HOST, port, "/health", 5)
        data = json.loads(body)
        if isinstance(data, dict):
            return {"status_code": status, **data}
    return None


def _clean_env(port: int, redis_port: int, secret: str, extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SMAPWS_", "REDIS_", "JWT_")) and k != "PYTHONPATH"
    }
    env.update(
        SMAPWS_HOST=HOST,
        SMAPWS_PORT=str(port),
        REDIS_URL=f"redis://{HOST}:{redis_port}/0",
        JWT_SECRET=secret,
        SMAPWS_LOG_LEVEL="warning",
        PYTHONPATH=str(REPO_DIR),
        # Capacity is measured, so smapws's admission limits (operator policy,
        # defaults 1000 upgrades/s and 10,000 connections) are lifted; the
        # baseline has none. Everything else stays at its default.
        SMAPWS_MAX_ACCEPT_RATE="0",
        # Every load client is one address (loopback), as a balancer would
        # be: the per-address and per-user bounds are for attackers, off here.
        SMAPWS_MAX_ACCEPT_RATE_PER_USER="0",
        SMAPWS_MAX_PENDING_PER_ADDRESS="0",
        SMAPWS_MAX_CONNECTIONS="20000",
    )
    env.update(extra)
    return env


def _per_delivery(cpu_s: float | None, deliveries: int) -> float | None:
    """CPU microseconds per delivery (None when nothing was delivered)."""
    if cpu_s is None or deliveries <= 0:
        return None
    return round(cpu_s * 1e6 / deliveries, 2)


def limited_by(step: dict[str, Any] | None) -> str:
    """What limited a W1 step that failed: ``hub`` (its CPU saturated, the clients'
    CPU not), ``clients`` (the other way round: the load generator, Redis and the
    publisher share that CPU), ``hub and clients``, ``foreign load`` (neither was
    saturated while other processes took CPU from them), ``unclear``, or ``not
    reached`` (no step failed: the figure is a lower bound)."""
    if step is None:
        return "not reached"
    hub = step.get("hub_cpu_pct", 0.0) >= SATURATED_PCT
    side = step.get("core1_busy_pct", 0.0) >= SATURATED_PCT
    if hub and side:
        return "hub and clients"
    if hub or side:
        return "hub" if hub else "clients"
    foreign = max(step.get("foreign_hub_cpu_pct", 0.0), step.get("foreign_side_cpu_pct", 0.0))
    return "foreign load" if foreign >= NOISY_FOREIGN_PCT else "unclear"


def _first_failure(
    steps: list[dict[str, Any]], ok: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """The first step above the fastest one that is ``ok`` that is not ``ok``."""
    best = max((s["offered_per_s"] for s in steps if ok(s)), default=0)
    return next((s for s in steps if s["offered_per_s"] > best and not ok(s)), None)


# -- one hub -------------------------------------------------------------------------


class _MachineMeter:
    """CPU used on the pinned CPUs by processes that are not part of the run.

    ``foreign_hub_cpu_pct`` is what other processes took on the hub's CPU(s) (busy
    time of those CPUs minus the hub's own), ``foreign_side_cpu_pct`` the same on the
    others, ``steal_hub_cpu_pct`` what the hypervisor took. When the hub and the rest
    share the same CPUs (``bench.workers`` on a 2-CPU machine) both foreign figures
    are what other processes took of those CPUs. A quiet machine shows ~0;
    figures measured beside a foreign load are not comparable. Empty when unpinned.
    """

    def __init__(self, cpus: tuple[set[int], set[int]] | None) -> None:
        self.cpus = (sorted(cpus[0]), sorted(cpus[1])) if cpus else None
        self.last = self._read()

    def _read(self) -> tuple[tuple[float, float], tuple[float, float]] | None:
        if self.cpus is None:
            return None

        def busy(cpus: list[int]) -> tuple[float, float]:
            both = [procs.cpu_busy_seconds(cpu) for cpu in cpus]
            return sum(b for b, _ in both), sum(s for _, s in both)

        try:
            return busy(self.cpus[0]), busy(self.cpus[1])
        except OSError:
            return None

    def mark(self, wall_s: float, hub_s: float, side_s: float) -> dict[str, float]:
        """Foreign and steal CPU percentages since the previous mark."""
        now, last = self._read(), self.last
        self.last = now
        if now is None or last is None:
            return {}
        (hub_busy, hub_steal), (side_busy, _) = now
        (hub_busy0, hub_steal0), (side_busy0, _) = last

        def pct(x: float) -> float:
            return round(max(0.0, 100 * x / wall_s), 1)

        if self.cpus is not None and self.cpus[0] == self.cpus[1]:
            foreign = pct(hub_busy - hub_busy0 - hub_s - side_s)
            return {
                "foreign_hub_cpu_pct": foreign,
                "foreign_side_cpu_pct": foreign,
                "steal_hub_cpu_pct": pct(hub_steal - hub_steal0),
            }
        return {
            "foreign_hub_cpu_pct": pct(hub_busy - hub_busy0 - hub_s),
            "foreign_side_cpu_pct": pct(side_busy - side_busy0 - side_s),
            "steal_hub_cpu_pct": pct(hub_steal - hub_steal0),
        }


class HubBench:
    """All workloads against one hub; owns its redis, hub, publisher and workers."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        plan: Plan,
        cpus: tuple[set[int], set[int]] | None,
        logdir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env or {})
        self.plan = plan
        self.cpus = cpus
        self.logdir = logdir
        self.step = 0
        self.rss_peak = 0
        self.foreign_peak = 0.0
        self.hub: subprocess.Popen[bytes] | None = None
        self.group: list[int] = []  # the hub's processes, once it is ready
        self.hub_log = logdir / f"{name}-hub.log"

    def _next_step(self) -> int:
        self.step += 1
        return self.step

    def _rss(self) -> int:
        """The RSS of the hub's processes together (one, or a supervisor and workers)."""
        assert self.hub is not None
        rss = 0
        for pid in self.group or [self.hub.pid]:
            with contextlib.suppress(OSError):
                rss += procs.rss_bytes(pid)
        self.rss_peak = max(self.rss_peak, rss)
        return rss

    def _check_hub(self) -> None:
        if self.hub is not None and self.hub.poll() is not None:
            raise BenchError(
                f"hub exited with {self.hub.returncode}:\n{procs.log_tail(self.hub_log)}"
            )

    def run(self) -> dict[str, Any]:
        """Run W4, W3, W2, W1 in that order; never raises except on KeyboardInterrupt.

        The result has ``ok`` (all workloads measured) and ``error`` (a message, or
        None) beside each workload's figures.
        """
        result: dict[str, Any] = {
            "command": self.argv,
            "extra_env": self.env,
            "ok": False,
            "error": None,
        }
        with contextlib.ExitStack() as stack:
            try:
                self._run(result, stack)
                result["ok"] = True
            except Exception as exc:  # report it and go on with the next hub
                result["error"] = f"{type(exc).__name__}: {exc}"
                if self.hub is not None:
                    result["hub_log_tail"] = procs.log_tail(self.hub_log, 30)
        result["hub_rss_peak_bytes"] = self.rss_peak
        result["foreign_hub_cpu_pct_peak"] = self.foreign_peak
        if self.hub is not None:
            result.setdefault("hub_log_tail", procs.log_tail(self.hub_log, 10))
        return result

    def _run(self, result: dict[str, Any], stack: contextlib.ExitStack) -> None:
        plan = self.plan
        hub_cpus = self.cpus[0] if self.cpus else None
        redis_port = procs.free_port()
        redis = procs.start_redis(redis_port, self.logdir / f"{self.name}-redis.log")
        stack.callback(procs.stop, redis)
        port = procs.free_port()
        secret = os.urandom(24).hex()
        self.hub = procs.spawn(
            self.argv,
            self.hub_log,
            env=_clean_env(port, redis_port, secret, self.env),
            cpus=hub_cpus,
            cwd=Path(self.env.get("BENCH_CWD", REPO_DIR)),
        )
        stack.callback(procs.stop, self.hub, 10)
        result["ready_s"] = round(procs.wait_ready(self.hub, HOST, port, self.hub_log), 3)
        hub_pid = self.hub.pid
        result["hub_cpu_affinity"] = sorted(os.sched_getaffinity(hub_pid))
        # A hub may be several processes (smapws with SMAPWS_WORKERS): its CPU and
        # RSS are the group's, the processes running once it is ready.
        self.group = procs.process_tree(hub_pid)
        result["hub_processes"] = len(self.group)

        loadgen = LoadGen(plan.workers)
        stack.callback(loadgen.shutdown)
        publisher = Publisher(HOST, redis_port)
        stack.callback(publisher.shutdown)
        meters = {
            "hub": procs.CpuMeter(self.group),
            "loadgen": procs.CpuMeter(loadgen.pids),
            "publisher": procs.CpuMeter([publisher.pid]),
            "redis": procs.CpuMeter([redis.pid]),
            "coordinator": procs.CpuMeter([os.getpid()]),
        }

        machine = _MachineMeter(self.cpus)

        def mark_all(wall_s: float | None) -> dict[str, float]:
            """CPU shares since the previous call over ``wall_s``; None only re-marks."""
            used = {k: m.mark() for k, m in meters.items()}
            if wall_s is None:
                machine.mark(1.0, 0.0, 0.0)
                return {}
            pct = {f"{k}_cpu_pct": round(100 * v / wall_s, 1) for k, v in used.items()}
            pct.update({f"{k}_cpu_s": round(v, 3) for k, v in used.items()})
            side = sum(v for k, v in used.items() if k != "hub")
            pct["core1_busy_pct"] = round(100 * side / wall_s, 1)
            pct.update(machine.mark(wall_s, used["hub"], side))
            self.foreign_peak = max(self.foreign_peak, pct.get("foreign_hub_cpu_pct", 0.0))
            return pct

        time.sleep(plan.settle_s)
        rss0 = self._rss()

        # W4: connect storm.
        users = [user_id(i % plan.users) for i in range(plan.connections)]
        mark_all(None)
        t0 = time.monotonic()
        storm = loadgen.connect(
            HOST,
            port,
            users,
            secret,
            protocol=peers.protocol(self.name),
            max_inflight=plan.max_inflight,
            deadline_s=180,
        )
        cpu = mark_all(time.monotonic() - t0)
        self._check_hub()
        result["w4_connect"] = {
            "connections": plan.connections,
            "ok": storm.ok,
            "failed": storm.failed,
            "statuses": storm.statuses,
            "seconds": round(storm.seconds, 3),
            "handshakes_per_s": round(storm.handshakes_per_s, 1),
            "loadgen_cpu_s": round(storm.worker_cpu_s, 3),
            **cpu,
        }
        if storm.ok == 0:
            raise BenchError(f"no connection opened: {storm.statuses}")

        # W3: idle memory (and the CPU an idle hub spends on its open connections).
        mark_all(None)
        t0 = time.monotonic()
        time.sleep(plan.settle_s)
        idle_cpu = mark_all(time.monotonic() - t0)["hub_cpu_pct"]
        rss_n = self._rss()
        _, open_now = loadgen.counts()
        health = _read_health(port)
        result["w3_idle_memory"] = {
            "connections": storm.ok,
            "open_after_settle": open_now,
            "rss_0_bytes": rss0,
            "rss_n_bytes": rss_n,
            "kib_per_connection": round((rss_n - rss0) / storm.ok / 1024, 2),
            "idle_hub_cpu_pct": idle_cpu,
            "hub_health": health,
        }

        # W2: fan-out bursts, first with the clients reading as the frames arrive,
        # then with every load-generator process stopped (SIGSTOP) for the burst:
        # the receive stamps are the kernel's, taken as each frame reaches the
        # client socket, so a stopped load generator cannot be what limits the
        # figure. The frames wait in the socket buffers (one per connection).
        runs = [self._burst(loadgen, publisher, mark_all, paused=False)]
        runs += [
            self._burst(loadgen, publisher, mark_all, paused=p)
            for p in [True, False, True, False, True][: 2 * plan.fanout_runs - 1]
        ]

        def median_last(rows: list[dict[str, Any]]) -> float | None:
            lasts = [r["last_tab_ms"] for r in rows]
            return statistics.median(lasts) if lasts and None not in lasts else None

        paused = [r for r in runs if r["clients_paused"]]
        reading = [r for r in runs if not r["clients_paused"]]
        result["w2_fanout"] = {
            "users": plan.users,
            "deliveries": plan.users * plan.tabs,
            "runs": reading,
            "paused_runs": paused,
            "last_tab_ms_median": median_last(paused),
            "last_tab_ms_median_reading": median_last(reading),
            "done_while_paused": all(r["done_while_paused"] for r in paused),
        }

        # W1: routed, stepping the offered rate up until the hub no longer keeps up
        # (never before the cost rate has been measured).
        steps: list[dict[str, Any]] = []
        overloads = 0
        for rate in plan.rates:
            row = self._routed_step(rate, loadgen, publisher, mark_all)
            steps.append(row)
            overloads = 0 if row["kept_up"] else overloads + 1
            stop = overloads >= plan.stop_after_overloads or row["drain_s"] > DEEP_OVERLOAD_DRAIN_S
            if stop and rate >= plan.cost_rate:
                break
            if row["drain_s"] > KEEP_UP_DRAIN_S:
                _wait_quiet(loadgen)  # start the next step without a backlog
        best = max((s["delivered_per_s"] for s in steps if s["passed"]), default=None)
        sustained = max((s["delivered_per_s"] for s in steps if s["kept_up"]), default=None)
        cost = next((s for s in steps if s["offered_per_s"] == plan.cost_rate), None)
        result["w1_routed"] = {
            "message_bytes": MESSAGE_SIZE,
            "p99_budget_ms": P99_BUDGET_MS,
            "steps": steps,
            "max_delivered_per_s_p99_ok": best,
            "p99_ok_limited_by": limited_by(_first_failure(steps, lambda s: s["passed"])),
            "max_delivered_per_s_kept_up": sustained,
            "kept_up_limited_by": limited_by(_first_failure(steps, lambda s: s["kept_up"])),
            "cost_rate": plan.cost_rate,
            "cost_step": cost,
            "client_bound_steps": [
                s["offered_per_s"] for s in steps if s["core1_busy_pct"] >= SATURATED_PCT
            ],
        }
        _, stats = loadgen.collect([])
        result["loadgen_events"] = stats
        result["hub_rss_end_bytes"] = self._rss()
        self._check_hub()
        loadgen.close_all()

    def _burst(
        self,
        loadgen: LoadGen,
        publisher: Publisher,
        mark_all: Callable[[float | None], dict[str, float]],
        *,
        paused: bool,
    ) -> dict[str, Any]:
        """One W2 burst; with ``paused`` the load generator is stopped from just
        before the publish until ``pause_s`` later."""
        plan = self.plan
        step = self._next_step()
        expected = plan.users * plan.tabs
        mark_all(None)
        t0 = time.monotonic()
        if paused:
            loadgen.pause()
        try:
            pub = publisher.burst(step, plan.users)
            if paused:
                time.sleep(max(0.0, plan.pause_s - (time.monotonic() - t0)))
        finally:
            loadgen.resume()
        paused_ms = (time.monotonic() - t0) * 1000
        _wait_received(loadgen, step, expected, timeout_s=20)
        cpu = mark_all(time.monotonic() - t0)
        samples, _ = loadgen.collect([step])
        summary = percentiles(samples[step].latency_ns, expected)
        summary["last_tab_ms"] = summary.pop("max_ms")
        summary["publish_write_ms"] = round(pub["send_s"] * 1000, 3)
        summary["redis_receivers"] = pub["receivers"]
        summary["clients_paused"] = paused
        if paused:
            summary["paused_ms"] = round(paused_ms, 1)
            last = summary["last_tab_ms"]
            summary["done_while_paused"] = last is not None and last < paused_ms
        self._check_hub()
        time.sleep(0.3)
        return {**summary, **cpu}

    def _routed_step(
        self,
        rate: int,
        loadgen: LoadGen,
        publisher: Publisher,
        mark_all: Callable[[float | None], dict[str, float]],
        label: str = "step",
    ) -> dict[str, Any]:
        plan = self.plan
        step = self._next_step()
        mark_all(None)
        t0 = time.monotonic()
        pub = publisher.rate(step, plan.users, rate / plan.tabs, plan.step_s)
        expected = pub["published"] * plan.tabs
        drain_s = _wait_received(loadgen, step, expected, timeout_s=15)
        cpu = mark_all(time.monotonic() - t0)
        samples, _ = loadgen.collect([step])
        summary = percentiles(samples[step].latency_ns, expected)
        p99 = summary["p99_ms"]
        delivered = delivered_rate(samples[step], expected)
        kept_up = (
            summary["lost"] <= MAX_LOST_SHARE * expected
            and drain_s <= KEEP_UP_DRAIN_S
            and delivered >= KEEP_UP_SHARE * expected / pub["elapsed_s"]
        )
        row = {
            "kind": label,
            "offered_per_s": rate,
            "published": pub["published"],
            "publish_s": round(pub["elapsed_s"], 3),
            "delivered_per_s": delivered,
            "drain_s": round(drain_s, 3),
            **summary,
            "kept_up": kept_up,
            "passed": kept_up and p99 is not None and p99 <= P99_BUDGET_MS,
            "hub_rss_bytes": self._rss(),
            **cpu,
            "hub_cpu_us_per_delivery": _per_delivery(cpu.get("hub_cpu_s"), summary["received"]),
            "loadgen_cpu_us_per_delivery": _per_delivery(
                cpu.get("loadgen_cpu_s"), summary["received"]
            ),
            "worst_ms_per_second": worst_per_second(samples[step]),
        }
        self._check_hub()
        return row


# -- reporting -----------------------------------------------------------------------

# (key, label, lower is better)
SUMMARY_ROWS: list[tuple[str, str, bool]] = [
    ("w1_cpu_us_per_delivery", "hub CPU per delivery at the cost rate (us)", True),
    ("w1_p99_at_cost_ms", "W1 p99 at the cost rate (ms)", True),
    ("w1_kept_up_per_s", "W1 deliveries/s kept up (any p99)", False),
    ("w1_max_delivered_per_s", "W1 deliveries/s at p99<=50ms", False),
    ("w2_last_tab_ms", "W2 fan-out, last tab, clients stopped (ms)", True),
    ("w2_last_tab_reading_ms", "W2 fan-out, last tab, clients reading (ms)", True),
    ("w3_kib_per_connection", "W3 idle RSS per connection (KiB)", True),
    ("w4_handshakes_per_s", "W4 authenticated handshakes/s", False),
    ("hub_rss_peak_mib", "hub RSS peak (MiB)", True),
    ("clients_cpu_us_per_delivery", "clients' CPU per delivery at cost rate (us)", True),
    ("core1_busy_pct_at_cost", "clients' CPU busy at the cost rate (%)", True),
]
# Ratio columns: (label, numerator hub, denominator hub).
RATIOS: list[tuple[str, str, str]] = [
    ("smapws/baseline", "smapws", "baseline"),
    ("smapws/go", "smapws", "go"),
    ("smapws/centrifuge", "smapws", "centrifuge"),
]


def summarize(hub: dict[str, Any]) -> dict[str, float | None]:
    """The headline figures of one hub's result (None where not measured)."""

    def get(*path: str) -> Any:
        node: Any = hub
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    peak = hub.get("hub_rss_peak_bytes")
    return {
        "w1_cpu_us_per_delivery": get("w1_routed", "cost_step", "hub_cpu_us_per_delivery"),
        "w1_p99_at_cost_ms": get("w1_routed", "cost_step", "p99_ms"),
        "w1_kept_up_per_s": get("w1_routed", "max_delivered_per_s_kept_up"),
        "w1_max_delivered_per_s": get("w1_routed", "max_delivered_per_s_p99_ok"),
        "w2_last_tab_ms": get("w2_fanout", "last_tab_ms_median"),
        "w2_last_tab_reading_ms": get("w2_fanout", "last_tab_ms_median_reading"),
        "w3_kib_per_connection": get("w3_idle_memory", "kib_per_connection"),
        "w4_handshakes_per_s": get("w4_connect", "handshakes_per_s"),
        "hub_rss_peak_mib": round(peak / 2**20, 1) if peak else None,
        "clients_cpu_us_per_delivery": get("w1_routed", "cost_step", "loadgen_cpu_us_per_delivery"),
        "core1_busy_pct_at_cost": get("w1_routed", "cost_step", "core1_busy_pct"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def comparison(hubs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{figure: {hub: value, ..., "ratio": smapws/baseline, "ratio_go": smapws/go,
    "ratio_centrifuge": smapws/centrifuge}}``,
    plus ``x_floor`` (each hub's CPU per delivery over the floor's) and ``limits``
    (what limited each hub's throughput figures)."""
    sums = {name: summarize(result) for name, result in hubs.items()}
    out: dict[str, dict[str, Any]] = {}
    for key, _, _ in SUMMARY_ROWS:
        row: dict[str, Any] = {name: s[key] for name, s in sums.items()}
        row["ratio"] = _ratio(row.get("smapws"), row.get("baseline"))
        row["ratio_go"] = _ratio(row.get("smapws"), row.get("go"))
        row["ratio_centrifuge"] = _ratio(row.get("smapws"), row.get("centrifuge"))
        out[key] = row
    cpu = out["w1_cpu_us_per_delivery"]
    out["x_floor"] = {name: _ratio(cpu.get(name), cpu.get("floor")) for name in sums}
    out["limits"] = {
        name: {
            "kept_up": (result.get("w1_routed") or {}).get("kept_up_limited_by"),
            "p99_ok": (result.get("w1_routed") or {}).get("p99_ok_limited_by"),
            "w2_done_while_paused": (result.get("w2_fanout") or {}).get("done_while_paused"),
        }
        for name, result in hubs.items()
    }
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def format_table(table: dict[str, dict[str, Any]], hubs: Sequence[str]) -> str:
    """A plain-text table: one row per figure, one column per hub, then the ratios;
    then CPU per delivery over the floor's and what limited each throughput figure."""
    ratios = [r for r in RATIOS if {r[1], r[2]} <= set(hubs)]
    if "smapws" in hubs:  # before/after runs, variants: smapws against smapws@REV, smapws+...
        others = [h for h in hubs if h.startswith(("smapws@", "smapws+"))]
        ratios += [(f"smapws/{h}", "smapws", h) for h in others]
    cols = [*hubs, *(label for label, _, _ in ratios)]
    width = max(len(label) for _, label, _ in SUMMARY_ROWS)
    lines = [f"{'figure':<{width}}  better" + "".join(f"{c:>16}" for c in cols)]
    for key, label, lower in SUMMARY_ROWS:
        row = table[key]
        cells = [_fmt(row.get(h)) for h in hubs]
        for _, a, b in ratios:
            r = _ratio(row.get(a), row.get(b))
            cells.append("-" if r is None else f"{r:.2f}x")
        better = "lower " if lower else "higher"
        lines.append(f"{label:<{width}}  {better}" + "".join(f"{c:>16}" for c in cells))
    if "floor" in hubs:
        x = table["x_floor"]
        lines.append(
            f"{'CPU per delivery / floor':<{width}}  lower "
            + "".join(f"{'-' if x.get(h) is None else f'{x[h]:.2f}x':>16}" for h in hubs)
        )
    limits = table["limits"]
    for what, label in (
        ("kept_up", "kept-up figure limited by"),
        ("p99_ok", "p99-ok figure limited by"),
    ):
        lines.append(
            f"{label:<{width}}        " + "".join(f"{limits[h][what]!s:>16}" for h in hubs)
        )
    return "\n".join(lines)


def targets(table: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for smapws, each with its measured figure and verdict
    (``met`` is None when a figure is missing)."""

    def row(key: str, hub: str) -> float | None:
        value = table[key].get(hub)
        return value if isinstance(value, int | float) else None

    p99 = row("w1_p99_at_cost_ms", "smapws")
    shakes = _ratio(row("w4_handshakes_per_s", "smapws"), row("w4_handshakes_per_s", "go"))
    kib = row("w3_kib_per_connection", "smapws")
    cpu = table["w1_cpu_us_per_delivery"]
    # Issue 17's (CPU <= 1.0x Go and below Centrifuge, handshakes >= 0.6x Go,
    # <= 10 KiB idle), and the earlier ones it did not replace.
    specs: list[tuple[str, float | None, float, bool]] = [
        ("hub CPU per delivery <= 0.8x baseline", cpu["ratio"], 0.8, True),
        ("hub CPU per delivery <= 1.0x go", cpu["ratio_go"], 1.0, True),
        ("hub CPU per delivery < 1.0x centrifuge", cpu["ratio_centrifuge"], 0.9999, True),
        ("p99 at the cost rate <= 10 ms", p99, 10.0, True),
        ("handshakes/s >= 0.6x go", shakes, 0.6, False),
        ("idle RSS per connection <= 10 KiB", kib, 10.0, True),
    ]  # fmt: skip
    out = []
    for label, value, bound, upper in specs:
        met = None if value is None else (value <= bound if upper else value >= bound)
        out.append({"target": label, "measured": value, "met": met})
    return out


def format_targets(rows: list[dict[str, Any]]) -> str:
    """One line per target: measured figure and met/missed."""
    lines = []
    for r in rows:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[r["met"]]
        lines.append(f"  {r['target']:<40} {_fmt(r['measured']):>10}  {verdict}")
    return "\n".join(lines)


def plot(hubs: dict[str, dict[str, Any]], path: Path) -> bool:
    """Write p99 (and p50) latency against offered rate; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ceiling = 1.0
    xmin, xmax = math.inf, 0.0
    for result in hubs.values():
        for s in (result.get("w1_routed") or {}).get("steps", []):
            xmin, xmax = min(xmin, s["offered_per_s"]), max(xmax, s["offered_per_s"])
            for k in ("p99_ms", "p50_ms"):
                if s[k] is not None:
                    ceiling = max(ceiling, s[k])
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:gray")
    for (name, result), color in zip(hubs.items(), colors, strict=False):
        steps = (result.get("w1_routed") or {}).get("steps", [])
        if not steps:
            continue
        xs = [s["offered_per_s"] for s in steps]
        p99 = [s["p99_ms"] if s["p99_ms"] is not None else ceiling * 2 for s in steps]
        p50 = [s["p50_ms"] if s["p50_ms"] is not None else ceiling * 2 for s in steps]
        ax.plot(xs, p99, "o-", color=color, label=f"{name} p99")
        ax.plot(xs, p50, "s--", color=color, alpha=0.5, label=f"{name} p50")
        lost = [(x, y) for x, y, s in zip(xs, p99, steps, strict=True) if s["p99_ms"] is None]
        if lost:
            ax.plot([x for x, _ in lost], [y for _, y in lost], "x", color="red", markersize=10)
    ax.axhline(P99_BUDGET_MS, color="grey", linestyle=":", label="50 ms budget")
    ax.set_yscale("log")
    if xmax > 20 * xmin:
        ax.set_xscale("log")
    ax.set_xlabel("offered deliveries/s (W1, ~200 B messages to random users)")
    ax.set_ylabel("publish-to-receive latency (ms)")
    ax.set_title("smapws benchmark: latency against offered rate (red x: deliveries lost)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def machine_info(cpus: tuple[set[int], set[int]] | None) -> dict[str, Any]:
    """What the figures depend on: CPUs, pinning, Python, kernel, library versions."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for dist in ("websockets", "trio", "trio-websocket", "redis", "PyJWT", "smapws"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    redis_version = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5)
        redis_version = out.stdout.strip()
    peers_versions: dict[str, str | None] = {}
    for name, argv in (("go", ["go", "version"]), ("node", ["node", "--version"])):
        peers_versions[name] = None
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            peers_versions[name] = out.stdout.strip() or None
    for package in peers.CENTRIFUGE_PACKAGES[1:]:
        peers_versions[package] = None
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            peers_versions[package] = out.stdout.strip() or None
    with contextlib.suppress(OSError, ValueError):
        lock = json.loads((peers.NODEHUB_DIR / "package-lock.json").read_text())
        for package in ("ws", "redis", "jsonwebtoken"):
            entry = lock.get("packages", {}).get(f"node_modules/{package}", {})
            peers_versions[f"npm {package}"] = entry.get("version")
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        commit = out.stdout.strip() or None
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": platform.release(),
        "redis_server": redis_version,
        "packages": versions,
        "peers": peers_versions,
        "git_commit": commit,
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "pinning": ({"hub": sorted(cpus[0]), "everything_else": sorted(cpus[1])} if cpus else None),
    }


# -- entry point ---------------------------------------------------------------------


def _choose_cpus(pin: bool) -> tuple[set[int], set[int]] | None:
    usable = sorted(os.sched_getaffinity(0))
    if not pin or len(usable) < 2:
        return None
    return {usable[0]}, {usable[1]}


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if max(soft, hard) < needed:
        print(f"warning: fd limit {max(soft, hard)} < {needed} needed by the hub", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Plan]:
    """Parse the command line into options and the :class:`Plan` to run."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke size: 20 connections, seconds")
    parser.add_argument("--hubs", default=",".join(peers.HUBS),
                        help="comma list of: " + ", ".join(peers.HUBS) +
                        "; smapws@REV is smapws as of git revision REV; smapws+SMAPWS_X=V "
                        "runs smapws with that setting")  # fmt: skip
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="output folder")
    parser.add_argument("--users", type=int, help="override the number of users")
    parser.add_argument("--tabs", type=int, help="override connections per user")
    parser.add_argument("--workers", type=int, help="override load-generator processes")
    parser.add_argument("--rates", help="override W1 offered deliveries/s, comma list")
    parser.add_argument("--step-seconds", type=float, help="override W1 seconds per step")
    parser.add_argument("--no-pin", action="store_true", help="do not pin hub and clients")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.users:
        plan = replace(plan, users=args.users)
    if args.tabs:
        plan = replace(plan, tabs=args.tabs)
    if args.workers:
        plan = replace(plan, workers=args.workers)
    if args.rates:
        plan = replace(plan, rates=tuple(int(r) for r in args.rates.split(",")))
    if args.step_seconds:
        plan = replace(plan, step_s=args.step_seconds)
    hubs = [h.strip() for h in args.hubs.split(",") if h.strip()]
    unknown = [h for h in hubs if not peers.valid_name(h)]
    if unknown or not hubs:
        parser.error(f"unknown hub(s) {unknown}; choose from {', '.join(peers.HUBS)}")
    args.hub_list = hubs
    return args, plan


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 0 if every hub completed every workload, else 1."""
    args, plan = parse_args(argv)
    cpus = _choose_cpus(not args.no_pin)
    _raise_fd_limit(plan.connections + 1000)
    stamp = datetime.datetime.now(datetime.UTC)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench-{stamp:%Y%m%d-%H%M%S}" + ("-quick" if args.quick else "")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": stamp.isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "machine": machine_info(cpus),
        "plan": {**asdict(plan), "connections": plan.connections},
        "hubs": {},
    }
    started = time.monotonic()
    with (
        _sigterm_as_interrupt(),
        procs.pinned_self(cpus[1] if cpus else None),
        tempfile.TemporaryDirectory(prefix="smapws-bench-") as tmp,
    ):
        for hub in args.hub_list:
            print(f"== {hub}: {plan.connections} connections ...", flush=True)
            t0 = time.monotonic()
            try:
                argv, env = peers.prepare(hub, Path(tmp))
            except peers.PeerError as exc:
                result = {"ok": False, "error": f"could not prepare {hub}: {exc}"}
            else:
                result = HubBench(hub, argv, plan, cpus, Path(tmp), env).run()
            result["wall_s"] = round(time.monotonic() - t0, 1)
            report["hubs"][hub] = result
            state = "ok" if result["ok"] else f"FAILED: {result['error']}"
            print(f"   {hub} done in {result['wall_s']} s: {state}", flush=True)
            if not result["ok"] and result.get("hub_log_tail"):
                print(result["hub_log_tail"], file=sys.stderr)
    report["wall_s"] = round(time.monotonic() - started, 1)
    noisy = {
        h: r.get("foreign_hub_cpu_pct_peak", 0.0)
        for h, r in report["hubs"].items()
        if r.get("foreign_hub_cpu_pct_peak", 0.0) > NOISY_FOREIGN_PCT
    }
    report["machine_was_quiet"] = not noisy
    report["summary"] = comparison(report["hubs"])
    report["targets"] = targets(report["summary"])
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_table(report["summary"], args.hub_list))
    print(f"\ntargets (smapws; cost rate {plan.cost_rate:,} deliveries/s):")
    print(format_targets(report["targets"]))
    for hub, peak in noisy.items():
        print(
            f"WARNING: other processes took up to {peak:.0f} % of the hub's CPU while {hub} "
            "was measured: its figures are not comparable (run on a quiet machine)"
        )
    print(f"\nresults: {json_path}")
    if not args.no_plot:
        png = out_dir / f"{name}.png"
        if plot(report["hubs"], png):
            print(f"plot:    {png}")
        else:
            print("plot:    skipped (pip install matplotlib)")
    return 0 if all(r["ok"] for r in report["hubs"].values()) else 1


def _cli() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted: every child process was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_cli())
