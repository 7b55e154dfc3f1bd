"""Fleet figures (issue 10): one hub of a fleet, in pattern mode and in user mode.

``python -m bench.fleet`` measures, in one run that it owns and cleans up, for
``SMAPWS_SUBSCRIBE_MODE=pattern`` and ``=user`` in turn (each a fresh redis-server on
a free port and a fresh hub, pinned to CPU 0 as in :mod:`bench.run`; Redis, the
clients, the publisher and this coordinator on CPU 1):

- **connections**: ``K`` idle connections of ``K`` distinct users (RSS per connection
  in the hub, and in Redis), then ``P`` probe tabs of new users opened one at a time
  by this process: time to the ``101``, and to a message published right after the
  ``101``; then each probe reloads (a close frame, and at once a new connection for
  the same user), timed the same way. Redis's ``INFO commandstats`` counts the
  (UN)SUBSCRIBE commands, after the storm, after the probes, and after every tab
  closed and the subscribe linger passed.
- **capacity**: the hub serves ``U`` users x ``T`` tabs as one of ``F`` hubs of a
  fleet: every ``F``-th published message (~200 B) is for one of its users, round
  robin, the others for the users of the ``F - 1`` other hubs (not running: in user
  mode nobody subscribes to their channels, in pattern mode this hub receives their
  messages all the same). Messages to its users first fill the hub's replay window
  (its steady state). Then total published rates are stepped up; a step passes with
  :mod:`bench.run`'s W1 criteria (every delivery of this hub's users within p99 <=
  50 ms, kept up); a step that fails while other processes took over 10 % of either
  core is run again (3 attempts at most; the least disturbed one stands). Figures:
  the highest total published rate of a passing step, of a kept-up step, and the
  hub's CPU per published message.

and then once:

- **redis**: ``redis-benchmark`` PUBLISH rate (pipelined, 200 B, random channels of
  the fleet's users) of one redis-server alone on CPU 0, with no subscriber, with one
  and with ``F`` pattern subscribers (a fleet in pattern mode), and with one
  connection subscribed to every user's channel (the fleet's hubs in user mode).

Output: ``<out>/fleet-<stamp>.json`` and a table on stdout. The exit status is 0 only
if both modes ran every phase.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/fleet.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs
from bench.loadgen import LoadGen, mint_token, user_id
from bench.publisher import (
    _TICK_S,
    CHANNEL_PREFIX,
    MESSAGE_SIZE,
    Publisher,
    PublisherError,
    _publish_command,
    _Replies,
    encode_message,
    publisher_socket,
)
from bench.run import (
    BENCH_DIR,
    DEEP_OVERLOAD_DRAIN_S,
    HOST,
    KEEP_UP_DRAIN_S,
    KEEP_UP_SHARE,
    MAX_LOST_SHARE,
    NOISY_FOREIGN_PCT,
    P99_BUDGET_MS,
    REPO_DIR,
    _choose_cpus,
    _MachineMeter,
    _raise_fd_limit,
    _sigterm_as_interrupt,
    _wait_received,
    delivered_rate,
    machine_info,
    percentiles,
    worst_per_second,
)
from bench.wsclient import (
    OP_CLOSE,
    OP_TEXT,
    bench_mark,
    client_frame,
    handshake_request,
    parse_frames,
    parse_handshake_response,
)

MODES = ("pattern", "user")
SCHEMA = 1
# A step that did not get the offered rate out of the publisher (CPU 1 too busy) is
# not a measurement of the hub: two such steps, or two not kept up, end the ladder.
PUBLISHED_SHARE = 0.9
# A failed capacity step is run up to this many times in all while other processes
# take the hub's core (see capacity_phase).
NOISY_ATTEMPTS = 3
NOISE = ("foreign_hub_cpu_pct", "foreign_side_cpu_pct")
# A process (or CPU 1) this busy in a step may be what limited it.
SATURATED_PCT = 90.0
# The capacity phase's users, far from the connection phase's (bench0, bench1, ...).
CAPACITY_BASE = 1_000_000
# How long a probe waits for its 101 or its message.
PROBE_TIMEOUT_S = 5.0
# redis-benchmark: connections and pipeline depth (a hub's publisher pipelines too).
RB_CLIENTS = 16
RB_PIPELINE = 32
# The Redis commands of subscriptions that INFO commandstats is asked about.
SUB_COMMANDS = ("subscribe", "unsubscribe", "psubscribe", "punsubscribe", "publish")


class FleetError(Exception):
    """A phase could not be measured (the hub misbehaved or a tool failed)."""


@dataclass(frozen=True)
class Plan:
    """The size and pace of one run (the same for both modes)."""

    fleet: int  # hubs in the (simulated) fleet: 1 published message in `fleet` is local
    users: int  # capacity: users served by the measured hub
    tabs: int  # capacity: connections per user
    rates: tuple[int, ...]  # capacity: total published messages/s, in order
    step_s: float  # capacity: publishing time per step
    warmup_messages: int  # capacity: to this hub's users first, to fill the replay window
    warmup_rate: int  # ... at this rate (messages/s)
    idle: int  # connections: idle connections (one user each)
    probes: int  # connections: probe tabs opened one at a time
    settle_s: float  # idle time before RSS readings
    linger_s: float | None  # SMAPWS_SUBSCRIBE_LINGER (None: the hub's default, 5 s)
    bench_requests: int  # redis-benchmark PUBLISHes per configuration (0: skip)
    workers: int  # load-generator processes
    max_inflight: int
    stop_after_overloads: int


FULL_RATES: tuple[int, ...] = (2500, 5000, 7500, 10000, 12500, 15000, 20000, 25000, 30000)
FULL_RATES += (40000, 50000, 60000, 70000, 80000, 100000, 120000)
FULL = Plan(
    fleet=10,
    users=1000,
    tabs=2,
    rates=FULL_RATES,
    step_s=3.0,
    # The default replay window (32 MiB) holds ~39,000 of these messages.
    warmup_messages=45_000,
    warmup_rate=6000,
    idle=4000,
    probes=300,
    settle_s=2.0,
    linger_s=None,
    bench_requests=400_000,
    workers=2,
    max_inflight=100,
    stop_after_overloads=2,
)
QUICK = Plan(
    fleet=10,
    users=5,
    tabs=2,
    rates=(200, 400),
    step_s=0.5,
    warmup_messages=100,
    warmup_rate=400,
    idle=20,
    probes=5,
    settle_s=0.3,
    linger_s=0.5,
    bench_requests=2000,
    workers=1,
    max_inflight=10,
    stop_after_overloads=2,
)


# -- small helpers -------------------------------------------------------------------


def distribution(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """``count``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms`` of ``values_ms``
    (nearest rank; None when empty)."""
    ordered = sorted(values_ms)

    def pick(q: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)

    return {
        "count": len(ordered),
        "p50_ms": pick(0.5),
        "p90_ms": pick(0.9),
        "p99_ms": pick(0.99),
        "max_ms": pick(1.0),
    }


def _resp(*args: bytes | str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class RedisConn:
    """A blocking RESP connection for the coordinator's few commands (5 s deadline each)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        """Close the connection; never raises."""
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()

    def command(self, *args: bytes | str) -> Any:
        """Send one command and return its reply (int, bytes, str or list)."""
        self.sock.sendall(_resp(*args))
        return self._reply()

    def _reply(self) -> Any:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise FleetError("Redis closed the connection")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body.decode()
        if kind == b"-":
            raise FleetError(f"Redis error: {body.decode(errors='replace')}")
        if kind == b":":
            return int(body)
        if kind == b"$":
            size = int(body)
            return None if size < 0 else self.reader.read(size + 2)[:-2]
        if kind == b"*":
            return [self._reply() for _ in range(int(body))]
        raise FleetError(f"unexpected Redis reply {line[:60]!r}")

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict of strings."""
        text = self.command("INFO", section).decode()
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k: v for k, v in pairs}

    def command_calls(self) -> dict[str, int]:
        """Calls of each of :data:`SUB_COMMANDS` so far (``INFO commandstats``)."""
        stats = self.info("commandstats")
        out = {}
        for name in SUB_COMMANDS:
            fields = dict(f.split("=", 1) for f in stats.get(f"cmdstat_{name}", "").split(",") if f)
            out[name] = int(fields.get("calls", 0))
        return out

    def used_memory(self) -> int:
        """Redis's ``used_memory`` in bytes."""
        return int(self.info("memory")["used_memory"])


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def hub_metrics(port: int) -> dict[str, float]:
    """The hub's unlabelled ``/metrics`` samples, plus subscription commands by verb."""
    status, body = procs.http_get(HOST, port, "/metrics", 5)
    if status != 200:
        raise FleetError(f"/metrics answered {status}")
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("websocket_subscription_commands_total{"):
            name = "subscription_commands_" + name.split('"')[1]
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


# -- the split publisher -------------------------------------------------------------


def _run_split(
    sock: socket.socket,
    step: int,
    local: list[bytes],
    foreign: list[bytes],
    every: int,
    rate: float,
    duration_s: float,
) -> dict[str, Any]:
    """Publish ``rate`` messages/s for ``duration_s``: message ``seq`` goes to a local
    user when ``seq % every == 0`` (round robin), else to a foreign one (round robin)."""
    replies = _Replies(sock)
    total = int(rate * duration_s)
    # The schedule is fixed before the clock starts: only the stamps are made on time.
    heads = [
        local[(seq // every) % len(local)] if seq % every == 0 else foreign[seq % len(foreign)]
        for seq in range(total)
    ]
    cpu0 = time.process_time()
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            t_ns = time.monotonic_ns()
            sock.sendall(
                b"".join(
                    _publish_command(heads[seq], encode_message(step, seq, t_ns))
                    for seq in range(sent, due)
                )
            )
            sent = due
            replies.poll()
        time.sleep(_TICK_S)
    elapsed = time.monotonic() - start
    replies.wait(sent, 30)
    return {
        "published": sent,
        "local": (sent + every - 1) // every,
        "receivers": replies.receivers,
        "elapsed_s": elapsed,
        "cpu_s": time.process_time() - cpu0,
    }


def _split_main(
    ctl: multiprocessing.connection.Connection,
    port: int,
    local: list[bytes],
    foreign: list[bytes],
) -> None:
    """Entry point of the split publisher process: ``("rate", step, rate, seconds,
    every)`` or quit."""
    sock = publisher_socket(HOST, port)
    while True:
        try:
            cmd = ctl.recv()
        except (EOFError, OSError):
            return
        if cmd[0] != "rate":
            return
        try:
            step, rate, seconds, every = cmd[1:]
            ctl.send(("done", _run_split(sock, step, local, foreign, every, rate, seconds)))
        except (OSError, PublisherError) as exc:
            ctl.send(("error", f"{type(exc).__name__}: {exc}"))


class _Child(Publisher):
    """A spawned helper process, driven like :class:`Publisher` (its ``_ask``, ``pid``
    and ``shutdown``, which never raises) but running ``target(pipe, *args)``."""

    def __init__(self, target: Callable[..., None], *args: Any, name: str) -> None:
        # Publisher.__init__ is not called on purpose: it would start the plain publisher.
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=target, args=(child, *args), name=name, daemon=True)
        self._proc.start()
        child.close()

    def ask(self, cmd: tuple[Any, ...], timeout_s: float) -> dict[str, Any]:
        """Send ``cmd``; the child's ``("done", result)`` answer, else PublisherError."""
        return self._ask(cmd, timeout_s)


def _drain_main(ctl: multiprocessing.connection.Connection, port: int, commands: bytes) -> None:
    """A subscriber that reads and discards everything (``commands`` sent once per
    connection, ``connections`` of them) until told to quit."""
    import selectors

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, count = ctl.recv()
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(count):
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.sendall(commands)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    sel.register(ctl, selectors.EVENT_READ)
    ctl.send(("done", {}))
    while True:
        for key, _ in sel.select(1.0):
            if key.fileobj is ctl:
                return
            with contextlib.suppress(BlockingIOError):
                if not key.fileobj.recv(1 << 22):  # type: ignore[union-attr]
                    return


# -- one hub ------------------------------------------------------------------------


@dataclass
class Hub:
    """A running hub and its own redis-server."""

    mode: str
    port: int
    redis_port: int
    secret: str
    proc: subprocess.Popen[bytes]
    redis: subprocess.Popen[bytes]
    log: Path

    def check(self) -> None:
        """Raise :class:`FleetError` (with the log's tail) if the hub has exited."""
        if self.proc.poll() is not None:
            raise FleetError(f"hub exited with {self.proc.returncode}:\n{procs.log_tail(self.log)}")

    def rss(self) -> int:
        return procs.rss_bytes(self.proc.pid)


@contextlib.contextmanager
def running_hub(
    mode: str, plan: Plan, cpus: tuple[set[int], set[int]] | None, logdir: Path
) -> Iterator[Hub]:
    """A fresh redis-server and a fresh ``smapws serve`` in ``mode``, stopped on exit."""
    with contextlib.ExitStack() as stack:
        redis_port = procs.free_port()
        redis = procs.start_redis(redis_port, logdir / f"{mode}-redis.log")
        stack.callback(procs.stop, redis)
        port = procs.free_port()
        secret = os.urandom(24).hex()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SMAPWS_", "REDIS_", "JWT_")) and k != "PYTHONPATH"
        }
        env |= {
            "SMAPWS_HOST": HOST,
            "SMAPWS_PORT": str(port),
            "REDIS_URL": f"redis://{HOST}:{redis_port}/0",
            "JWT_SECRET": secret,
            "SMAPWS_LOG_LEVEL": "warning",
            "PYTHONPATH": str(REPO_DIR),
            "SMAPWS_SUBSCRIBE_MODE": mode,
            # Capacity is measured: the admission limits (operator policy) are lifted,
            # as in bench.run. Everything else is the hub's default.
            "SMAPWS_MAX_ACCEPT_RATE": "0",
            # The load comes from one address and a few users (see bench.run).
            "SMAPWS_MAX_ACCEPT_RATE_PER_USER": "0",
            "SMAPWS_MAX_PENDING_PER_ADDRESS": "0",
            "SMAPWS_MAX_CONNECTIONS": "20000",
        }
        if plan.linger_s is not None:
            env["SMAPWS_SUBSCRIBE_LINGER"] = str(plan.linger_s)
        log = logdir / f"{mode}-hub.log"
        proc = procs.spawn(
            [sys.executable, "-m", "smapws", "serve"],
            log,
            env=env,
            cpus=cpus[0] if cpus else None,
            cwd=REPO_DIR,
        )
        stack.callback(procs.stop, proc, 10)
        procs.wait_ready(proc, HOST, port, log)
        yield Hub(mode, port, redis_port, secret, proc, redis, log)


class _Meters:
    """CPU of every process of a run between marks, and what others took (``_MachineMeter``)."""

    def __init__(self, pids: dict[str, list[int]], cpus: tuple[set[int], set[int]] | None) -> None:
        self.meters = {k: procs.CpuMeter(v) for k, v in pids.items()}
        self.machine = _MachineMeter(cpus)
        self.t0 = time.monotonic()
        self.foreign_peak = {"hub": 0.0, "side": 0.0}

    def start(self) -> None:
        for m in self.meters.values():
            m.mark()
        self.machine.mark(1.0, 0.0, 0.0)
        self.t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        """CPU seconds (``<name>_cpu_s``) and percentages since :meth:`start`."""
        wall = max(1e-9, time.monotonic() - self.t0)
        used = {k: m.mark() for k, m in self.meters.items()}
        out = {f"{k}_cpu_s": round(v, 4) for k, v in used.items()}
        out |= {f"{k}_cpu_pct": round(100 * v / wall, 1) for k, v in used.items()}
        side = sum(v for k, v in used.items() if k != "hub")
        out["core1_busy_pct"] = round(100 * side / wall, 1)
        out |= self.machine.mark(wall, used["hub"], side)
        for core in self.foreign_peak:
            pct = out.get(f"foreign_{core}_cpu_pct", 0.0)
            self.foreign_peak[core] = max(self.foreign_peak[core], pct)
        return out


# -- phase 1: what a connection costs -------------------------------------------------


class _Tab:
    """A probe tab: a blocking WebSocket opened by the coordinator."""

    def __init__(self, port: int, token: str) -> None:
        """Open it; ``self.open_ms`` is the time from ``connect()`` to the whole 101."""
        t0 = time.monotonic_ns()
        self.t0 = t0
        self.sock = socket.create_connection((HOST, port), timeout=PROBE_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request, accept = handshake_request(HOST, port, "/ws", token)
        self.sock.sendall(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = self.sock.recv(65536)
            if not data:
                raise FleetError("probe tab closed during its handshake")
            buf += data
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        status = parse_handshake_response(head, accept)
        self.open_ms = (time.monotonic_ns() - t0) / 1e6
        if status != 101:
            raise FleetError(f"probe handshake answered {status}")

    def wait_mark(self, step: int, seq: int) -> int | None:
        """Read until the text frame marked ``step:seq``; its arrival (monotonic ns),
        or None after :data:`PROBE_TIMEOUT_S`."""
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while True:
            frames, self.buf = parse_frames(self.buf)
            for _fin, opcode, payload in frames:
                mark = bench_mark(payload) if opcode == OP_TEXT else None
                if mark is not None and mark[:2] == (step, seq):
                    return time.monotonic_ns()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                return None
            self.buf += data

    def close(self) -> None:
        """Close like a browser tab: a close frame (1001), then the socket."""
        with contextlib.suppress(OSError):
            self.sock.sendall(client_frame(OP_CLOSE, (1001).to_bytes(2, "big")))
        self.sock.close()


def _probe(
    hub: Hub, redis: RedisConn, token: str, user: str, step: int, seq: int
) -> tuple[_Tab, dict[str, Any]]:
    """Open a tab, publish one message to its user right after the 101, time both."""
    tab = _Tab(hub.port, token)
    message = encode_message(step, seq, time.monotonic_ns())
    receivers = redis.command("PUBLISH", CHANNEL_PREFIX + user.encode(), message)
    got = tab.wait_mark(step, seq)
    return tab, {
        "open_ms": tab.open_ms,
        "first_ms": None if got is None else (got - tab.t0) / 1e6,
        "receivers": receivers,
    }


def connection_phase(
    hub: Hub, plan: Plan, loadgen: LoadGen, redis: RedisConn, meters: _Meters
) -> dict[str, Any]:
    """Idle memory, connect and reload times, and the subscription commands."""
    time.sleep(plan.settle_s)
    rss0, mem0 = hub.rss(), redis.used_memory()
    calls0 = redis.command_calls()
    users = [user_id(i) for i in range(plan.idle)]
    meters.start()
    storm = loadgen.connect(
        HOST, hub.port, users, hub.secret, max_inflight=plan.max_inflight, deadline_s=180
    )
    storm_cpu = meters.stop()
    hub.check()
    if storm.ok != plan.idle:
        raise FleetError(f"{storm.failed} of {plan.idle} idle connections failed: {storm.statuses}")
    time.sleep(plan.settle_s)
    rss_n, mem_n = hub.rss(), redis.used_memory()
    calls_storm = redis.command_calls()

    # Probes: new users, one at a time, then a reload of each.
    opened: dict[str, list[float]] = collections.defaultdict(list)
    missed = collections.Counter[str]()
    receivers = collections.Counter[str]()
    tabs: list[_Tab] = []
    step = 1
    meters.start()
    try:
        for i in range(plan.probes):
            user = user_id(plan.idle + i)
            token = mint_token(hub.secret, user)
            for kind in ("connect", "reload"):
                if kind == "reload":
                    tabs.pop().close()
                tab, row = _probe(hub, redis, token, user, step, 2 * i + (kind == "reload"))
                tabs.append(tab)
                opened[f"{kind}_open"].append(row["open_ms"])
                receivers[f"{kind}_{row['receivers']}"] += 1
                if row["first_ms"] is None:
                    missed[kind] += 1
                else:
                    opened[f"{kind}_first"].append(row["first_ms"])
    finally:
        probe_cpu = meters.stop()
        calls_probes = redis.command_calls()
        for tab in tabs:
            tab.close()
    hub.check()
    subscribed = hub_metrics(hub.port).get("websocket_subscribed_channels")
    loadgen.close_all()
    # Every tab closed: wait out the linger (and the batching) until no channel is left.
    t0 = time.monotonic()
    limit = (5.0 if plan.linger_s is None else plan.linger_s) + 10.0
    while True:
        metrics_end = hub_metrics(hub.port)
        left = metrics_end.get("websocket_subscribed_channels", 0.0)
        if left == 0 or time.monotonic() - t0 > limit:
            break
        time.sleep(0.1)
    unsubscribed_s = time.monotonic() - t0
    calls_end = redis.command_calls()
    return {
        "idle_connections": storm.ok,
        "storm": {
            "seconds": round(storm.seconds, 3),
            "handshakes_per_s": round(storm.handshakes_per_s, 1),
            "hub_cpu_us_per_connection": round(1e6 * storm_cpu["hub_cpu_s"] / storm.ok, 1),
            **storm_cpu,
        },
        "hub_rss_0_bytes": rss0,
        "hub_rss_n_bytes": rss_n,
        "hub_kib_per_connection": round((rss_n - rss0) / storm.ok / 1024, 2),
        "redis_used_memory_0_bytes": mem0,
        "redis_used_memory_n_bytes": mem_n,
        "redis_bytes_per_connection": round((mem_n - mem0) / storm.ok, 1),
        "subscribed_channels_with_probes_open": subscribed,
        "subscribed_channels_end": left,
        # (Pattern mode holds no channel: nothing to wait for.)
        "all_unsubscribed_after_close_s": (
            round(unsubscribed_s, 2) if left == 0 and subscribed else None
        ),
        "probes": plan.probes,
        "connect_open": distribution(opened["connect_open"]),
        "connect_first_message": distribution(opened["connect_first"]),
        "reload_open": distribution(opened["reload_open"]),
        "reload_first_message": distribution(opened["reload_first"]),
        "first_message_missed": dict(missed),
        "publish_receivers": dict(receivers),
        "probe_cpu": probe_cpu,
        "redis_commands": {
            "storm": _delta(calls_storm, calls0),
            "probes": _delta(calls_probes, calls_storm),
            "close_all_and_linger": _delta(calls_end, calls_probes),
            "whole_phase": calls_end,
        },
        "hub_subscription_commands": {
            k.removeprefix("subscription_commands_"): v
            for k, v in metrics_end.items()
            if k.startswith("subscription_commands_")
        },
    }


# -- phase 2: capacity with 90 % foreign messages ---------------------------------------


def capacity_phase(
    hub: Hub,
    plan: Plan,
    loadgen: LoadGen,
    publisher: _Child,
    meters: _Meters,
) -> dict[str, Any]:
    """Step the total published rate up until the hub no longer keeps up."""
    users = [user_id(CAPACITY_BASE + i) for i in range(plan.users)]
    storm = loadgen.connect(
        HOST,
        hub.port,
        [u for u in users for _ in range(plan.tabs)],
        hub.secret,
        max_inflight=plan.max_inflight,
        deadline_s=120,
    )
    if storm.failed:
        raise FleetError(f"{storm.failed} capacity connections failed: {storm.statuses}")
    time.sleep(plan.settle_s)
    warmup = _warm_up(hub, plan, loadgen, publisher)
    steps: list[dict[str, Any]] = []
    overloads = 0
    step = 100
    for rate in plan.rates:
        attempts = []
        while True:
            step += 1
            attempts.append(_capacity_step(hub, plan, loadgen, publisher, meters, step, rate))
            last = attempts[-1]
            # A failed step while other processes took either core (the hub's, or the
            # one of Redis, the publisher and the clients) is no measurement of the hub:
            # it is run again (up to NOISY_ATTEMPTS in all), and the attempt with the
            # least foreign CPU stands (chosen by noise, not by result).
            if last["passed"] or _noise(last) <= NOISY_FOREIGN_PCT:
                break
            if len(attempts) >= NOISY_ATTEMPTS:
                break
            time.sleep(1.0)
        row = min(attempts, key=_noise)
        if len(attempts) > 1:
            row["noisy_attempts"] = [
                {k: a.get(k) for k in ("p99_ms", "kept_up", "passed", "hub_cpu_pct", *NOISE)}
                for a in attempts
            ]
        steps.append(row)
        bad = not row["kept_up"] or not row["rate_reached"]
        overloads = overloads + 1 if bad else 0
        if overloads >= plan.stop_after_overloads or row["drain_s"] > DEEP_OVERLOAD_DRAIN_S:
            break
        time.sleep(0.3)
    loadgen.close_all()
    passed = [s for s in steps if s["passed"]]
    best = max(passed, key=lambda s: s["published_per_s"], default=None)
    kept = [s for s in steps if s["kept_up"] and s["rate_reached"]]
    sustained = max(kept, key=lambda s: s["published_per_s"], default=None)
    # What one core would carry at this step's CPU per message (a projection: the
    # fixed costs are spread thinnest at the highest rate the hub kept up with).
    estimate = (
        round(100 * sustained["published_per_s"] / sustained["hub_cpu_pct"])
        if sustained and sustained["hub_cpu_pct"] > 0
        else None
    )
    return {
        "users": plan.users,
        "tabs": plan.tabs,
        "warmup": warmup,
        "local_share": round(1 / plan.fleet, 4),
        "message_bytes": MESSAGE_SIZE,
        "p99_budget_ms": P99_BUDGET_MS,
        "steps": steps,
        "max_published_per_s_p99_ok": best["published_per_s"] if best else None,
        "best_step": best,
        "max_published_per_s_kept_up": sustained["published_per_s"] if sustained else None,
        "kept_up_step": sustained,
        "one_core_estimate_per_s": estimate,
        "limited_by": [_limited_by(s) for s in steps if not s["passed"]],
    }


def _noise(step: dict[str, Any]) -> float:
    """The larger share of a core that other processes took during ``step`` (%)."""
    return float(max(step.get(f"foreign_{core}_cpu_pct", 0.0) for core in ("hub", "side")))


def _warm_up(hub: Hub, plan: Plan, loadgen: LoadGen, publisher: _Child) -> dict[str, Any]:
    """Fill the hub's replay window with messages for its users (both modes keep those),
    so that the steps measure a hub in its steady state: the window full, evicting.
    (Filling it in a measured step showed as a single 100-200 ms stall there.)"""
    if not plan.warmup_messages:
        return {"messages": 0}
    step = 99
    seconds = plan.warmup_messages / plan.warmup_rate
    pub = publisher.ask(("rate", step, plan.warmup_rate, seconds, 1), seconds + 60)
    _wait_received(loadgen, step, pub["local"] * plan.tabs, timeout_s=30)
    samples, _ = loadgen.collect([step])
    after = hub_metrics(hub.port)
    time.sleep(plan.settle_s)
    return {
        "messages": pub["published"],
        "per_s": plan.warmup_rate,
        "received": len(samples[step].latency_ns),
        "hub_history_entries": after.get("websocket_history_entries"),
        "hub_history_bytes": after.get("websocket_history_bytes"),
    }


def _limited_by(step: dict[str, Any]) -> str:
    """What the step's figures say stopped it: the hub's core, CPU 1, or neither
    (each counting what other processes took of it)."""
    hub_core = step["hub_cpu_pct"] + step.get("foreign_hub_cpu_pct", 0.0)
    side_core = step["core1_busy_pct"] + step.get("foreign_side_cpu_pct", 0.0)
    if step["hub_cpu_pct"] >= SATURATED_PCT:
        return "hub CPU"
    if hub_core >= SATURATED_PCT:
        return "the hub's core (the hub and other processes)"
    if side_core >= SATURATED_PCT or not step["rate_reached"]:
        return "CPU 1 (publisher, Redis, clients, other processes)"
    return "neither core saturated (latency stalls)"


def _capacity_step(
    hub: Hub,
    plan: Plan,
    loadgen: LoadGen,
    publisher: _Child,
    meters: _Meters,
    step: int,
    rate: int,
) -> dict[str, Any]:
    before = hub_metrics(hub.port)
    meters.start()
    pub = publisher.ask(("rate", step, rate, plan.step_s, plan.fleet), plan.step_s + 60)
    expected = pub["local"] * plan.tabs
    drain_s = _wait_received(loadgen, step, expected, timeout_s=15)
    cpu = meters.stop()
    after = hub_metrics(hub.port)
    samples, _ = loadgen.collect([step])
    summary = percentiles(samples[step].latency_ns, expected)
    delivered = delivered_rate(samples[step], expected)
    kept_up = (
        summary["lost"] <= MAX_LOST_SHARE * expected
        and drain_s <= KEEP_UP_DRAIN_S
        and delivered >= KEEP_UP_SHARE * expected / pub["elapsed_s"]
    )
    published_per_s = round(pub["published"] / pub["elapsed_s"])
    p99 = summary["p99_ms"]

    def us_per(cpu_s: float, n: int) -> float | None:
        return round(1e6 * cpu_s / n, 2) if n else None

    def got(name: str) -> int:
        return round(after.get(name, 0.0) - before.get(name, 0.0))

    hub.check()
    return {
        "offered_per_s": rate,
        "published": pub["published"],
        "published_per_s": published_per_s,
        "rate_reached": published_per_s >= PUBLISHED_SHARE * rate,
        "local_messages": pub["local"],
        "redis_receivers": pub["receivers"],
        "hub_broker_received": got("websocket_broker_messages_received_total"),
        "hub_unrouted": got("websocket_messages_unrouted_total"),
        "delivered_per_s": delivered,
        "drain_s": round(drain_s, 3),
        **summary,
        "kept_up": kept_up,
        "passed": kept_up and p99 is not None and p99 <= P99_BUDGET_MS,
        "hub_cpu_us_per_published": us_per(cpu["hub_cpu_s"], pub["published"]),
        "hub_cpu_us_per_local": us_per(cpu["hub_cpu_s"], pub["local"]),
        "redis_cpu_us_per_published": us_per(cpu["redis_cpu_s"], pub["published"]),
        "hub_rss_bytes": hub.rss(),
        "hub_history_entries": after.get("websocket_history_entries"),
        "hub_history_bytes": after.get("websocket_history_bytes"),
        **cpu,
        "worst_ms_per_second": worst_per_second(samples[step]),
    }


# -- one mode -------------------------------------------------------------------------


def run_mode(
    mode: str, plan: Plan, cpus: tuple[set[int], set[int]] | None, logdir: Path
) -> dict[str, Any]:
    """Both phases against one hub in ``mode``; never raises except KeyboardInterrupt."""
    result: dict[str, Any] = {"mode": mode, "ok": False, "error": None}
    foreign_peak = {"hub": 0.0, "side": 0.0}
    with contextlib.ExitStack() as stack:
        hub: Hub | None = None
        try:
            hub = stack.enter_context(running_hub(mode, plan, cpus, logdir))
            result["hub_cpu_affinity"] = sorted(os.sched_getaffinity(hub.proc.pid))
            redis = RedisConn(hub.redis_port)
            stack.callback(redis.close)
            loadgen = LoadGen(plan.workers)
            stack.callback(loadgen.shutdown)
            local = [
                CHANNEL_PREFIX + user_id(CAPACITY_BASE + i).encode() for i in range(plan.users)
            ]
            foreign = [
                CHANNEL_PREFIX + user_id(CAPACITY_BASE + i).encode()
                for i in range(plan.users, plan.users * plan.fleet)
            ]
            publisher = _Child(_split_main, hub.redis_port, local, foreign, name="split-publisher")
            stack.callback(publisher.shutdown)
            meters = _Meters(
                {
                    "hub": [hub.proc.pid],
                    "redis": [hub.redis.pid],
                    "loadgen": loadgen.pids,
                    "publisher": [publisher.pid],
                    "coordinator": [os.getpid()],
                },
                cpus,
            )
            result["connections"] = connection_phase(hub, plan, loadgen, redis, meters)
            result["capacity"] = capacity_phase(hub, plan, loadgen, publisher, meters)
            result["redis_commands_whole_run"] = redis.command_calls()
            foreign_peak = meters.foreign_peak
            result["ok"] = True
        except Exception as exc:  # report it and go on with the other mode
            result["error"] = f"{type(exc).__name__}: {exc}"
            if hub is not None:
                result["hub_log_tail"] = procs.log_tail(hub.log, 30)
    result["foreign_hub_cpu_pct_peak"] = foreign_peak["hub"]
    result["foreign_side_cpu_pct_peak"] = foreign_peak["side"]
    return result


# -- once: Redis's own PUBLISH rate ------------------------------------------------------


def redis_publish_rate(
    plan: Plan, cpus: tuple[set[int], set[int]] | None, logdir: Path
) -> dict[str, Any]:
    """redis-benchmark PUBLISH rate of one redis-server on its own core, per audience."""
    exe = shutil.which("redis-benchmark")
    if exe is None or plan.bench_requests == 0:
        return {"measured": False, "why": "redis-benchmark not found" if exe is None else "off"}
    channels = plan.users * plan.fleet
    names = [f"{CHANNEL_PREFIX.decode()}bench{i:012d}" for i in range(channels)]
    pattern = _resp("PSUBSCRIBE", CHANNEL_PREFIX + b"*")
    # name: (subscriber connections, what each sends, copies of each message Redis sends)
    audiences: dict[str, tuple[int, bytes, int]] = {
        "no_subscriber": (0, b"", 0),
        "pattern_1_hub": (1, pattern, 1),
        f"pattern_{plan.fleet}_hubs": (plan.fleet, pattern, plan.fleet),
        "user_1_hub_per_channel": (1, _resp("SUBSCRIBE", *names), 1),
    }
    payload = encode_message(0, 0, 0).decode()
    out: dict[str, Any] = {
        "measured": True,
        "requests": plan.bench_requests,
        "clients": RB_CLIENTS,
        "pipeline": RB_PIPELINE,
        "channels": channels,
        "message_bytes": len(payload),
        "audiences": {},
    }
    for name, (connections, command, copies) in audiences.items():
        with contextlib.ExitStack() as stack:
            port = procs.free_port()
            redis = procs.start_redis(port, logdir / f"rb-{name}-redis.log")
            stack.callback(procs.stop, redis)
            if cpus:
                os.sched_setaffinity(redis.pid, cpus[0])
            conn = RedisConn(port)
            stack.callback(conn.close)
            if connections:
                drain = _Child(_drain_main, port, command, name="drain")
                stack.callback(drain.shutdown)
                drain.ask(("start", connections), 10)
                if command is pattern:
                    _wait_subscribed(conn, name, connections, "psub")
                else:
                    _wait_subscribed(conn, name, connections * channels, "sub")
            log = logdir / f"rb-{name}.log"
            argv = [exe, "-h", HOST, "-p", str(port), "-c", str(RB_CLIENTS)]
            argv += ["-P", str(RB_PIPELINE), "-n", str(plan.bench_requests)]
            argv += ["-r", str(channels), "-q", "PUBLISH", "user_noti:bench__rand_int__", payload]
            meter = procs.CpuMeter([redis.pid])
            busy0 = _cores_busy(cpus)
            t0 = time.monotonic()
            proc = procs.spawn(argv, log, cpus=cpus[1] if cpus else None)
            stack.callback(procs.stop, proc)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired as exc:
                raise FleetError(f"redis-benchmark ({name}) ran over 120 s") from exc
            wall = time.monotonic() - t0
            text = log.read_text(errors="replace")
            found = re.findall(r"([\d.]+) requests per second", text)
            if proc.returncode != 0 or not found:
                raise FleetError(f"redis-benchmark ({name}) failed: {text[-300:]}")
            redis_s = meter.mark()
            busy = [b - a for a, b in zip(busy0, _cores_busy(cpus), strict=True)]
            out["audiences"][name] = {
                "subscriber_connections": connections,
                "copies_per_publish": copies,
                "publish_per_s": round(float(found[-1])),
                "redis_cpu_pct": round(100 * redis_s / wall, 1),
                "redis_cpu_us_per_publish": round(1e6 * redis_s / plan.bench_requests, 3),
                # Redis's core: what other processes took of it. The other core runs
                # redis-benchmark and the subscribers: all of its busy time.
                **(
                    {
                        "foreign_redis_core_pct": round(
                            max(0.0, busy[0] - redis_s) / wall * 100, 1
                        ),
                        "other_core_busy_pct": round(busy[1] / wall * 100, 1),
                    }
                    if busy
                    else {}
                ),
                # A projection, not a measurement at saturation: what one core
                # would do at the CPU per PUBLISH measured here.
                "one_core_estimate_per_s": (
                    round(plan.bench_requests / redis_s) if redis_s > 0 else None
                ),
            }
    return out


def _cores_busy(cpus: tuple[set[int], set[int]] | None) -> list[float]:
    """Busy seconds so far of the two pinned cores (empty when not pinned)."""
    if not cpus:
        return []
    with contextlib.suppress(OSError):
        return [procs.cpu_busy_seconds(min(c))[0] for c in cpus]
    return []


def _wait_subscribed(conn: RedisConn, audience: str, want: int, field: str) -> None:
    """Wait until Redis's clients hold ``want`` subscriptions of kind ``field`` (``sub``
    or ``psub``) in all (``CLIENT LIST``)."""
    deadline = time.monotonic() + 10
    pattern = re.compile(rb"\b" + field.encode() + rb"=(\d+)")
    while time.monotonic() < deadline:
        if sum(int(n) for n in pattern.findall(conn.command("CLIENT", "LIST"))) >= want:
            return
        time.sleep(0.05)
    raise FleetError(f"the draining subscribers of {audience} are not subscribed after 10 s")


# -- reporting ------------------------------------------------------------------------

# (label, path in a mode's result)
ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("capacity: published msg/s at p99<=50ms", ("capacity", "max_published_per_s_p99_ok")),
    ("  p99-ok step: deliveries/s", ("capacity", "best_step", "delivered_per_s")),
    ("  p99-ok step: hub CPU %", ("capacity", "best_step", "hub_cpu_pct")),
    ("  p99-ok step: p99 (ms)", ("capacity", "best_step", "p99_ms")),
    ("capacity: published msg/s kept up", ("capacity", "max_published_per_s_kept_up")),
    ("  kept-up step: hub CPU %", ("capacity", "kept_up_step", "hub_cpu_pct")),
    (
        "  kept-up step: hub CPU us / published",
        ("capacity", "kept_up_step", "hub_cpu_us_per_published"),
    ),
    (
        "  kept-up step: Redis CPU us / published",
        ("capacity", "kept_up_step", "redis_cpu_us_per_published"),
    ),
    ("  one hub core would carry (msg/s)", ("capacity", "one_core_estimate_per_s")),
    ("idle: hub KiB per connection", ("connections", "hub_kib_per_connection")),
    ("idle: Redis bytes per connection", ("connections", "redis_bytes_per_connection")),
    ("storm: handshakes/s", ("connections", "storm", "handshakes_per_s")),
    ("storm: hub CPU us per connection", ("connections", "storm", "hub_cpu_us_per_connection")),
    ("connect: 101 p50 (ms)", ("connections", "connect_open", "p50_ms")),
    ("connect: 101 p99 (ms)", ("connections", "connect_open", "p99_ms")),
    ("connect: first message p50 (ms)", ("connections", "connect_first_message", "p50_ms")),
    ("connect: first message p99 (ms)", ("connections", "connect_first_message", "p99_ms")),
    ("reload: 101 p50 (ms)", ("connections", "reload_open", "p50_ms")),
    ("reload: 101 p99 (ms)", ("connections", "reload_open", "p99_ms")),
    ("SUBSCRIBE cmds: idle storm", ("connections", "redis_commands", "storm", "subscribe")),
    ("SUBSCRIBE cmds: probes + reloads", ("connections", "redis_commands", "probes", "subscribe")),
    (
        "UNSUBSCRIBE cmds: all closed",
        ("connections", "redis_commands", "close_all_and_linger", "unsubscribe"),
    ),
    ("  all unsubscribed after (s)", ("connections", "all_unsubscribed_after_close_s")),
]


def _same_rate(modes: dict[str, Any]) -> dict[str, Any] | None:
    """Hub CPU per mode at the highest offered rate every mode kept up with."""
    kept = [
        {
            s["offered_per_s"]: s
            for s in _get(modes.get(m), ("capacity", "steps")) or []
            if s["kept_up"]
        }
        for m in MODES
    ]
    common = set(kept[0]).intersection(*kept[1:])
    if not common:
        return None
    rate = max(common)
    rows = {m: k[rate] for m, k in zip(MODES, kept, strict=True)}
    return {
        "offered_per_s": rate,
        **{
            m: {k: r[k] for k in ("hub_cpu_pct", "hub_cpu_us_per_published", "p99_ms")}
            for m, r in rows.items()
        },
    }


def _get(node: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _fmt(v: Any) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The table's figures per mode, and the headline ratios (user / pattern)."""
    modes = report["modes"]
    table = {label: {m: _get(modes.get(m), path) for m in MODES} for label, path in ROWS}

    def ratio(path: tuple[str, ...]) -> float | None:
        user, pattern = (_get(modes.get(m), path) for m in ("user", "pattern"))
        return round(user / pattern, 2) if user and pattern else None

    same = _same_rate(modes)
    return {
        "table": table,
        "ratio_user_over_pattern": {
            "published_per_s_p99_ok": ratio(("capacity", "max_published_per_s_p99_ok")),
            "published_per_s_kept_up": ratio(("capacity", "max_published_per_s_kept_up")),
            "one_core_estimate_per_s": ratio(("capacity", "one_core_estimate_per_s")),
        },
        "same_rate": same,
    }


def format_table(summary: dict[str, Any], redis: dict[str, Any]) -> str:
    """A plain-text table: one row per figure, one column per mode."""
    width = max(len(label) for label, _ in ROWS)
    lines = [f"{'figure':<{width}}" + "".join(f"{m:>12}" for m in MODES)]
    for label, _ in ROWS:
        row = summary["table"][label]
        lines.append(f"{label:<{width}}" + "".join(f"{_fmt(row[m]):>12}" for m in MODES))
    for key, value in summary["ratio_user_over_pattern"].items():
        lines.append(f"user/pattern, {key}: {'-' if value is None else f'{value:.2f}x'}")
    same = summary["same_rate"]
    if same:
        cells = ", ".join(
            f"{m} {same[m]['hub_cpu_pct']}% ({same[m]['hub_cpu_us_per_published']} us/msg)"
            for m in MODES
        )
        lines.append(f"hub CPU at {same['offered_per_s']:,} msg/s (both kept up): {cells}")
    if redis.get("measured"):
        lines.append("redis-server alone on a core, redis-benchmark PUBLISH (200 B, pipelined):")
        for name, row in redis["audiences"].items():
            lines.append(
                f"  {name:<24}{row['publish_per_s']:>10,}/s  redis CPU {row['redis_cpu_pct']:>5}%"
                f"  {row['redis_cpu_us_per_publish']} us/publish"
                f"  (one core: ~{_fmt(row['one_core_estimate_per_s'])}/s)"
            )
    else:
        why = redis.get("why") or redis.get("error")
        lines.append(f"redis-server PUBLISH/s: not measured ({why})")
    return "\n".join(lines)


# -- entry point ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Plan]:
    """Parse the command line into options and the :class:`Plan` to run."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke size: seconds")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="output folder")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of: pattern, user")
    parser.add_argument("--rates", help="override the capacity steps (total published msg/s)")
    parser.add_argument("--step-seconds", type=float, help="override seconds per capacity step")
    parser.add_argument("--idle", type=int, help="override idle connections")
    parser.add_argument("--probes", type=int, help="override probe tabs")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the hub and the rest")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rates:
        plan = replace(plan, rates=tuple(int(r) for r in args.rates.split(",")))
    if args.step_seconds:
        plan = replace(plan, step_s=args.step_seconds)
    if args.idle:
        plan = replace(plan, idle=args.idle)
    if args.probes:
        plan = replace(plan, probes=args.probes)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or set(args.mode_list) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    return args, plan


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fleet figures; return 0 if every mode ran every phase, else 1."""
    args, plan = parse_args(argv)
    cpus = _choose_cpus(not args.no_pin)
    _raise_fd_limit(plan.idle + plan.users * plan.tabs + 1000)
    stamp = datetime.datetime.now(datetime.UTC)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"fleet-{stamp:%Y%m%d-%H%M%S}" + ("-quick" if args.quick else "")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": stamp.isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "machine": machine_info(cpus),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "plan": asdict(plan),
        "modes": {},
    }
    started = time.monotonic()
    with (
        _sigterm_as_interrupt(),
        procs.pinned_self(cpus[1] if cpus else None),
        tempfile.TemporaryDirectory(prefix="smapws-fleet-") as tmp,
    ):
        for mode in args.mode_list:
            print(f"== {mode} mode ...", flush=True)
            t0 = time.monotonic()
            result = run_mode(mode, plan, cpus, Path(tmp))
            result["wall_s"] = round(time.monotonic() - t0, 1)
            report["modes"][mode] = result
            state = "ok" if result["ok"] else f"FAILED: {result['error']}"
            print(f"   {mode} done in {result['wall_s']} s: {state}", flush=True)
            if not result["ok"] and result.get("hub_log_tail"):
                print(result["hub_log_tail"], file=sys.stderr)
        print("== redis-server PUBLISH rate ...", flush=True)
        try:
            report["redis_publish"] = redis_publish_rate(plan, cpus, Path(tmp))
        except (FleetError, procs.ProcError, OSError) as exc:
            report["redis_publish"] = {"measured": False, "error": f"{type(exc).__name__}: {exc}"}
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    peaks = {
        core: max((r[f"foreign_{core}_cpu_pct_peak"] for r in report["modes"].values()), default=0)
        for core in ("hub", "side")
    }
    report["machine_was_quiet"] = max(peaks.values()) <= NOISY_FOREIGN_PCT
    report["summary"] = summarize(report)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_table(report["summary"], report["redis_publish"]))
    print(
        f"load average at start {report['load_average_start']}, "
        f"at end {report['load_average_end']}; other processes took up to "
        f"{peaks['hub']:.0f} % of the hub's core and {peaks['side']:.0f} % of the other"
        + ("" if report["machine_was_quiet"] else " (NOT a quiet machine)")
    )
    print(f"\nresults: {json_path}")
    ok = all(r["ok"] for r in report["modes"].values()) and "error" not in report["redis_publish"]
    return 0 if ok else 1


def _cli() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted: every child process was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_cli())
