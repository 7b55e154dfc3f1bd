"""Workers (``SMAPWS_WORKERS`` > 1): one port, several hub processes.

The group's rules are tested as plain functions (backoff, the group view and
``/health``, the metrics sum, the status line), the restart policy on trio's
MockClock, and the whole thing as ``python -m smapws serve`` with two worker
processes, the session's real redis-server and a systemd stand-in socket:
tabs on both workers behind one port, a PUBLISH reaching them all, the
metrics of the group, a worker killed and replaced, SIGTERM draining every
worker.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from smapws._config import ConfigError
from smapws._config import load as load_config
from smapws._core.group import GroupView, RestartBackoff, WorkerReport, share
from smapws._io import sdnotify
from smapws._io.app import App, Membership
from smapws._io.brokers.memory import MemoryBroker
from smapws._io.server import STOP_MARGIN_S, serve, stop_budget
from smapws._io.supervisor import (
    METRICS_TIMEOUT,
    UNRESPONSIVE_KILL_S,
    Channel,
    ChannelError,
    Supervisor,
    _ask_metrics,
    _Slot,
    worker_environment,
)
from smapws.metrics import Metrics, cumulative, merge, render, snapshot

from .conftest import (
    SECRET,
    NotifySocket,
    RedisServer,
    close_code,
    connect,
    free_port,
    http,
    make_config,
    receive_json,
    token,
)
from .test_websocket import UPGRADE_HEAD

# -- the pure parts ---------------------------------------------------------------------------


def test_restart_backoff_doubles_for_quick_deaths_and_resets_after_a_stable_run() -> None:
    backoff = RestartBackoff(base=0.5, cap=30, stable_after=10)
    assert [backoff.delay(lived_s=0.2) for _ in range(9)] == [
        0.5, 1, 2, 4, 8, 16, 30, 30, 30,
    ]  # fmt: skip
    assert backoff.delay(lived_s=10) == 0.5  # it ran long enough: news, not a loop
    assert backoff.delay(lived_s=3) == 1


async def no_metrics() -> bytes | None:
    return None


def report(index: int, broker: str = "connected", **kw: Any) -> WorkerReport:
    values: dict[str, Any] = {"pid": 100 + index, "backend": "redis", "draining": False}
    values |= {"connections": 2, "users": 1} | kw
    return WorkerReport(index=index, broker=broker, **values)


def test_the_group_is_ready_when_every_worker_is() -> None:
    both = GroupView((report(0), report(1)), max_connections=100)
    assert both.ready and both.ready_count == 2 and both.totals() == (4, 2, 0)
    assert not GroupView((report(0), None)).ready  # a slot without a worker
    assert not GroupView((report(0), report(1, "down"))).ready
    assert not GroupView((report(0), report(1)), draining=True).ready
    assert not GroupView((report(0), report(1, draining=True))).ready
    assert share(10000, 3) == 3334 and share(8, 2) == 4 and share(1, 4) == 1


async def test_any_worker_answers_health_and_ready_for_the_group() -> None:
    """A worker whose own subscription is fine still answers /ready 503
    when another worker's is down, and /health with the group's totals."""
    app = App(make_config(), MemoryBroker())
    assert app.ready() is False  # the broker has not started
    app.broker.status_value.value = "connected"
    assert app.ready() is True  # a lone hub
    app.update_group(
        GroupView((None, report(1, "down", connections=5, users=3)), max_connections=10)
    )
    assert app.ready() is False
    doc = app.health()
    assert doc["status"] == "degraded"
    # This worker's own entry is its live state, not the supervisor's last word.
    assert doc["workers"]["list"][0] == {
        "worker": 0, "pid": os.getpid(), "status": "ready", "subscriber": "connected",
        "active_connections": 0, "active_users": 0,
    }  # fmt: skip
    assert doc["workers"]["list"][1]["status"] == "not_ready"
    assert doc["websocket"] == {
        "active_connections": 5, "active_users": 3, "max_connections": 10, "pending_upgrades": 0,
    }  # fmt: skip
    assert doc["subscriber"]["status"] == "connected"  # the answering worker's
    app.update_group(GroupView((None, report(1)), max_connections=10))
    assert app.ready() is True and app.health()["status"] == "ok"
    assert app.start_drain() and not app.start_drain()
    assert app.ready() is False and app.health()["draining"] is True


def test_group_metrics_sum_but_not_everything() -> None:
    a, b = Metrics(), Metrics()
    a.messages_sent.inc(3)
    b.messages_sent.inc(4)
    a.connections_rejected.labels("origin").inc()
    b.connections_rejected.labels("expired").inc(2)
    a.delivery_latency.observe(0.002)
    b.delivery_latency.observe(0.3)
    a.subscriber_up.set(1)
    b.subscriber_up.set(0)
    b.draining.set(1)
    text = render(merge([snapshot(a.registry), snapshot(b.registry)])).decode()

    def value(line: str) -> float:
        (found,) = re.findall(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
        return float(found)

    assert value("websocket_messages_sent_total") == 7
    assert value('websocket_connections_rejected_total{reason="origin"}') == 1
    assert value('websocket_connections_rejected_total{reason="expired"}') == 2
    assert value('websocket_delivery_latency_seconds_bucket{le="0.0025"}') == 1
    assert value('websocket_delivery_latency_seconds_bucket{le="+Inf"}') == 2
    assert value("websocket_delivery_latency_seconds_count") == 2
    assert value("websocket_subscriber_up") == 0  # 1 only when every worker is subscribed
    assert value("websocket_draining") == 1
    # One exposition per family, as Prometheus requires.
    assert text.count("# TYPE websocket_messages_sent_total counter") == 1
    # A lone registry renders exactly as the hub's own /metrics does (but
    # for the process's CPU time and memory, read anew by each rendering).

    def steady(text: bytes) -> list[bytes]:
        return [line for line in text.splitlines() if not line.startswith(b"process_")]

    assert steady(render(snapshot(a.registry))) == steady(a.render())


def test_a_dead_workers_counts_stay_in_the_sums() -> None:
    dead, alive = Metrics(), Metrics()
    dead.messages_sent.inc(10)
    dead.slow_consumer_closes.inc(2)
    alive.messages_sent.inc(1)
    retired = merge([[], cumulative(snapshot(dead.registry))])
    # Its gauges are gone with it (no stale connections), its counters are not.
    assert all(kind in ("counter", "histogram") for _, kind, _, _ in retired)
    text = render(merge([retired, snapshot(alive.registry)])).decode()
    assert "\nwebsocket_messages_sent_total 11.0\n" in text
    assert "\nwebsocket_slow_consumer_closes_total 2.0\n" in text
    assert "\nwebsocket_active_connections 0.0\n" in text


def test_group_status_lines() -> None:
    port = 8081
    starting = GroupView((report(0), report(1, "connecting")))
    assert sdnotify.group_status(starting, port).state == (
        "degraded on port 8081: 1 of 2 workers ready (worker 1 redis subscriber connecting)"
    )
    fresh = GroupView((None, report(1, "connecting")))
    assert sdnotify.group_status(fresh, port).state.startswith("starting on port 8081: 0 of 2")
    ready = sdnotify.group_status(GroupView((report(0), report(1))), port)
    assert ready.text == (
        "ready on port 8081, 2 workers, redis subscribers connected; 4 connections, 2 users"
    )
    lost = GroupView((None, report(1)), restarts=1)
    assert sdnotify.group_status(lost, port).state == (
        "degraded on port 8081: 1 of 2 workers ready (worker 0 not running)"
    )
    draining = GroupView((report(0, draining=True), None), draining=True)
    assert sdnotify.group_status(draining, port).state == (
        "draining on port 8081: 1 of 2 workers running"
    )


def test_workers_setting() -> None:
    redis = {"JWT_SECRET": SECRET, "REDIS_URL": "redis://127.0.0.1:1/0"}
    assert load_config(redis).workers == 1
    assert load_config(redis | {"SMAPWS_WORKERS": "3"}).workers == 3
    assert load_config(redis | {"SMAPWS_WORKERS": "auto"}).workers == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", "two", "257"):
        with pytest.raises(ConfigError, match="SMAPWS_WORKERS: expected a number of workers"):
            load_config(redis | {"SMAPWS_WORKERS": bad})
    with pytest.raises(ConfigError, match="SMAPWS_WORKERS: 2 workers need Redis"):
        load_config({"JWT_SECRET": SECRET, "SMAPWS_WORKERS": "2"})


def test_more_than_one_worker_without_redis_is_one_line_and_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "smapws", "serve", "--workers", "2"],
        env={"JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "smapws: configuration error: SMAPWS_WORKERS: 2 workers need Redis (REDIS_URL, "
        "REDIS_HOST, REDIS_SENTINELS or REDIS_CLUSTER_NODES): the in-process broker cannot "
        "reach the other workers' tabs"
    ]


def test_workers_never_see_systemds_variables() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/bin"}
    assert worker_environment(env) == {"PATH": "/bin"}


async def test_control_channel_frames_and_refuses_oversized_ones() -> None:
    a, b = trio.socket.socketpair()
    left = Channel(trio.SocketStream(a))
    right = Channel(trio.SocketStream(b))
    view = GroupView((report(0), None), restarts=2)
    big = {"big": b"x" * 300_000}  # more than a socket buffer: sent in pieces
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.send, view)
            assert await right.receive() == view
            nursery.start_soon(left.send, big)
            assert await right.receive() == big
        await left._stream.send_all((1 << 30).to_bytes(4, "big"))
        with pytest.raises(ChannelError, match="control message of 1073741824 bytes"):
            await right.receive()
        await left.aclose()
        assert await Channel(trio.SocketStream(b)).receive() is None  # EOF
        await right.aclose()


async def test_a_signal_after_the_supervisors_drain_is_still_one_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker told to drain by its supervisor, then reached by the same
    SIGINT/SIGTERM (Ctrl-C reaches the whole process group; so does
    ``KillMode=control-group``): that signal is its first, so it keeps
    draining; only a second signal stops it at once."""
    caplog.set_level(logging.INFO, logger="smapws")
    config = make_config(SMAPWS_DRAIN_TIMEOUT=20, SMAPWS_WRITE_WAIT=3)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve, config, handle_signals=True))
        # A client that never answers the close handshake holds the drain open.
        silent = await trio.open_tcp_stream("127.0.0.1", server.port)
        head = UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={token('u0')}\r\n")
        await silent.send_all(head.encode())
        async with silent, connect(server, "u1") as tab:
            with trio.fail_after(5):
                while server.app.hub.active_connections < 2:
                    await trio.sleep(0.01)
            server.drain()  # what the supervisor's Drain does
            os.kill(os.getpid(), signal.SIGTERM)
            assert await close_code(tab) == 1001  # drained, not dropped
            assert server.app.hub.active_connections == 1  # the silent one, until WRITE_WAIT
    messages = [r.getMessage() for r in caplog.records]
    assert "signal received" in messages and "signal received again, exiting now" not in messages


# -- the restart policy, on a MockClock --------------------------------------------------------


async def test_a_worker_that_keeps_dying_is_restarted_with_backoff_never_in_a_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each quick death doubles the wait (0.5 s .. 30 s); a worker that ran
    10 s resets it; once the group drains nothing is restarted."""
    lifetimes = [0.1] * 9 + [20.0, 0.1, 0.1]
    spawns: list[float] = []

    async def run_worker(supervisor: Supervisor, slot: _Slot) -> int:
        spawns.append(round(trio.current_time(), 3))
        await trio.sleep(lifetimes.pop(0))
        return -signal.SIGKILL

    config = make_config(REDIS_URL="redis://127.0.0.1:1/0", SMAPWS_WORKERS=1)
    supervisor = Supervisor(config, [], [], run_worker=run_worker)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(145)
        supervisor.drain()  # during the 2 s backoff after the death at 144.1
    # run() returned by itself once draining: the nursery closed.
    died = [t + 0.1 for t in spawns]
    assert spawns[:10] == [0, 0.6, 1.7, 3.8, 7.9, 16.0, 32.1, 62.2, 92.3, 122.4]
    assert [round(b - a, 3) for a, b in zip(died, spawns[1:], strict=False)][:9] == [
        0.5, 1, 2, 4, 8, 16, 30, 30, 30,
    ]  # fmt: skip
    assert spawns[10] == round(122.4 + 20 + 0.5, 3)  # ran 20 s: back to 0.5 s
    assert spawns[11] == round(spawns[10] + 0.1 + 1, 3)
    assert len(spawns) == 12 and supervisor.restarts == 12
    assert trio.current_time() == pytest.approx(145)


class StuckWorker:
    """A worker process that never exits by itself (it ignores the drain)."""

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.killed_at: float | None = None
        self.gone = trio.Event()

    def kill(self) -> None:
        self.returncode, self.killed_at = -signal.SIGKILL, trio.current_time()
        self.gone.set()


@pytest.mark.parametrize("second_signal", [False, True])
async def test_workers_still_running_at_the_stop_deadline_are_killed(
    autojump_clock: trio.testing.MockClock, second_signal: bool
) -> None:
    """After the first signal the workers get the lone hub's stop budget
    (drain + write wait + 5 s); after a second one, 5 s. Then SIGKILL, and
    the supervisor's exit status says so."""
    stuck: list[StuckWorker] = []

    async def run_worker(supervisor: Supervisor, slot: _Slot) -> int:
        proc = StuckWorker()
        stuck.append(proc)
        slot.proc, slot.last_seen = proc, trio.current_time()  # type: ignore[assignment]
        await proc.gone.wait()
        slot.proc = None
        return -signal.SIGKILL

    config = make_config(
        REDIS_URL="redis://127.0.0.1:1/0",
        SMAPWS_WORKERS=2,
        SMAPWS_DRAIN_TIMEOUT=20,
        SMAPWS_WRITE_WAIT=4,
    )
    supervisor = Supervisor(config, [], [], run_worker=run_worker)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(1)
        supervisor.drain()
        if second_signal:
            await trio.sleep(2)
            supervisor.stop()
    expected = 1 + 2 + STOP_MARGIN_S if second_signal else 1 + 20 + 4 + STOP_MARGIN_S
    assert [p.killed_at for p in stuck] == [expected, expected]
    assert supervisor.killed and supervisor.restarts == 0


async def test_a_worker_that_stops_reporting_is_not_ready_then_killed_and_replaced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 16: a frozen worker was reported ready forever. Silent for more
    than STALE_HEARTBEATS heartbeats (4 s), it is ``unresponsive`` (the
    group's /ready is 503, /health names it); silent UNRESPONSIVE_KILL_S more,
    it is killed and replaced."""
    frozen: list[StuckWorker] = []
    spawned: list[float] = []

    async def run_worker(supervisor: Supervisor, slot: _Slot) -> int:
        proc = StuckWorker()
        spawned.append(trio.current_time())
        slot.proc = proc  # type: ignore[assignment]
        slot.report, slot.last_seen = report(slot.index), trio.current_time()
        supervisor._changed()
        if slot.index == 0 and len(frozen) == 0:
            frozen.append(proc)  # the first worker of slot 0 never reports
        else:

            async def keep_reporting() -> None:
                while True:
                    slot.last_seen = trio.current_time()
                    await trio.sleep(supervisor.heartbeat_s)

            async with trio.open_nursery() as n:
                n.start_soon(keep_reporting)
                await proc.gone.wait()
                n.cancel_scope.cancel()
        await proc.gone.wait()
        slot.proc = slot.report = None
        return proc.returncode or 0

    config = make_config(REDIS_URL="redis://127.0.0.1:1/0", SMAPWS_WORKERS=2)
    supervisor = Supervisor(config, [], [], run_worker=run_worker)
    assert supervisor.heartbeat_s == 1.0
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(4.5)
        assert supervisor.view.value.ready  # 4 heartbeats may be missed
        await trio.sleep(1)
        view = supervisor.view.value
        assert not view.ready
        assert [w and w.status for w in view.workers] == ["unresponsive", "ready"]
        app = App(make_config(), MemoryBroker(), member=Membership(1, view, no_metrics))
        app.broker.status_value.value = "connected"
        assert app.ready() is False
        assert app.health()["workers"]["list"][0]["status"] == "unresponsive"
        status = sdnotify.group_status(view, 8081)
        assert (
            status.state == "degraded on port 8081: 1 of 2 workers ready (worker 0 not answering)"
        )
        await trio.sleep(15.6 - 5.5)
        assert frozen[0].killed_at == 4 + UNRESPONSIVE_KILL_S + 1  # the tick after 14 s
        assert len(spawned) == 3 and supervisor.restarts == 1  # replaced after 0.5 s
        assert supervisor.view.value.ready
        supervisor.drain()
        for slot in supervisor.slots:
            if slot.proc is not None:
                slot.proc.kill()


async def test_a_workers_metrics_request_never_waits_on_a_frozen_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 16: with the supervisor frozen, each /metrics request of a
    worker blocked in its send once the control socket was full (2,286 hung,
    ~2,300 fds). Now a request is queued or refused at once: 503 (None)
    after METRICS_TIMEOUT when unanswered, at once when the queue is full."""
    outbox, unsent = trio.open_memory_channel[object](2)
    asked: dict[int, tuple[trio.Event, list[bytes]]] = {}
    start = trio.current_time()
    assert await _ask_metrics(outbox, asked) is None
    assert trio.current_time() - start == METRICS_TIMEOUT
    assert await _ask_metrics(outbox, asked) is None  # queued too: 2 of 2
    assert trio.current_time() - start == 2 * METRICS_TIMEOUT
    start = trio.current_time()
    for _ in range(1000):
        assert await _ask_metrics(outbox, asked) is None
    assert trio.current_time() == start and not asked  # at once, nothing left waiting
    assert [type(unsent.receive_nowait()).__name__ for _ in range(2)] == ["MetricsRequest"] * 2


async def test_watchdog_needs_every_worker_alive_and_none_died_since_the_last_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = make_config(REDIS_URL="redis://127.0.0.1:1/0", SMAPWS_WORKERS=2)
    supervisor = Supervisor(config, [], [], watchdog_s=2.0)  # WatchdogSec=4s
    assert supervisor.ping_s == 1.0 and supervisor.heartbeat_s == 0.5
    running: Any = object()  # what a slot holds while its worker runs
    for slot in supervisor.slots:
        slot.proc, slot.last_seen = running, trio.current_time()
    assert supervisor._watchdog_ok()
    await trio.sleep(1.9)  # reports are due every 0.5 s; 4 missed make a worker stuck
    assert supervisor._watchdog_ok()
    await trio.sleep(0.2)
    supervisor.slots[0].last_seen = trio.current_time()
    assert not supervisor._watchdog_ok()  # slot 1: silent for 2.1 s (a stuck loop)
    supervisor.slots[1].last_seen = trio.current_time()
    supervisor.slots[1].died_since_tick = True  # died and was replaced in between
    assert not supervisor._watchdog_ok()
    assert supervisor._watchdog_ok()  # the next tick, all well again
    supervisor.slots[1].proc = None
    assert not supervisor._watchdog_ok()  # waiting for its replacement


# -- real processes ---------------------------------------------------------------------------


def hub_env(redis_server: RedisServer, port: int, **extra: str) -> dict[str, str]:
    prefixes = ("SMAPWS_", "REDIS_", "JWT_", "NOTIFY_SOCKET", "WATCHDOG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env |= {
        "SMAPWS_HOST": "127.0.0.1",
        "SMAPWS_PORT": str(port),
        "REDIS_URL": redis_server.url,
        "JWT_SECRET": SECRET,
        "SMAPWS_WORKERS": "2",
        "SMAPWS_DRAIN_TIMEOUT": "10",
        "SMAPWS_WRITE_WAIT": "2",
    }
    return env | extra


@contextlib.asynccontextmanager
async def group_process(env: dict[str, str], log: Path) -> AsyncIterator[trio.Process]:
    """``python -m smapws serve`` in the background (stderr to ``log``), in
    a process group of its own (as a shell's job); killed, with its
    workers, if the test leaves it running."""
    with log.open("w") as stderr:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "smapws", "serve"],
            env=env,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            for pid in _worker_pids(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            await proc.wait()


def _worker_pids(parent: int) -> list[int]:
    """The children of ``parent`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    pids.append(int(entry.name))
    return pids


async def health(port: int) -> dict[str, Any]:
    r = await http(port, "GET", "/health")
    assert r.status == 200
    doc: dict[str, Any] = r.json()
    return doc


async def wait_group_ready(port: int, proc: trio.Process, timeout: float = 30) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            assert proc.returncode is None, f"the supervisor exited with {proc.returncode}"
            with contextlib.suppress(OSError):
                r = await http(port, "GET", "/ready")
                if r.status == 200:
                    doc: dict[str, Any] = r.json()
                    return doc
            await trio.sleep(0.05)


async def open_tabs_on_both(
    port: int, user: str, stack: contextlib.AsyncExitStack, batch: int = 6
) -> tuple[list[Any], dict[str, Any]]:
    """Open tabs of ``user`` in batches until each worker holds some (the
    kernel gives each connection to whichever worker accepts first);
    returns the tabs and a /health document whose counts include them all."""
    tabs: list[Any] = []
    # Under load one worker can win accept() many times in a row (CI saw 30
    # of 30): enough rounds that the other one gets some.
    for _ in range(20):
        for _ in range(batch):
            tabs.append(await stack.enter_async_context(connect(port, user)))
        with trio.fail_after(10):  # the other worker's count arrives with its next report
            while True:
                doc = await health(port)
                if doc["websocket"]["active_connections"] == len(tabs):
                    break
                await trio.sleep(0.1)
        if all(w["active_connections"] > 0 for w in doc["workers"]["list"]):
            return tabs, doc
    raise AssertionError(f"every tab went to one worker: {doc['workers']}")


def metric_value(text: bytes, name: str) -> float:
    found = re.findall(rf"^{re.escape(name)} (\S+)$", text.decode(), re.MULTILINE)
    assert len(found) == 1, f"{name}: {found}"
    return float(found[0])


async def test_two_workers_share_a_port_and_drain_on_sigterm(
    redis_server: RedisServer, systemd_socket: NotifySocket, notify_dir: Path
) -> None:
    """Under a systemd stand-in (WatchdogSec=1s): READY=1 from the
    supervisor once both workers are subscribed; tabs on both workers behind
    one port get one PUBLISH; /metrics on the internal port is the group's;
    SIGTERM drains every worker (1001) and the supervisor exits 0."""
    port, internal = free_port(), free_port()
    env = hub_env(
        redis_server,
        port,
        SMAPWS_INTERNAL_PORT=str(internal),
        NOTIFY_SOCKET=systemd_socket.path,
        WATCHDOG_USEC="1000000",
    )
    log = notify_dir / "group.log"
    async with group_process(env, log) as proc, contextlib.AsyncExitStack() as stack:
        doc = await wait_group_ready(port, proc)
        assert doc["workers"]["ready"] == 2 and doc["status"] == "ok"
        ready = await trio.to_thread.run_sync(systemd_socket.wait_for, "READY", 10)
        assert "ready on port" in ready.fields["STATUS"] and "2 workers" in ready.fields["STATUS"]
        worker_pids = {w["pid"] for w in doc["workers"]["list"]}
        assert len(worker_pids) == 2 and proc.pid not in worker_pids

        tabs, doc = await open_tabs_on_both(port, "u-both", stack)
        per_worker = [w["active_connections"] for w in doc["workers"]["list"]]
        print(f"\n{len(tabs)} tabs, per worker: {per_worker}")
        # One PUBLISH: both workers are subscribed, every tab gets it.
        message = {"type": "notification", "payload": {"n": 1}}
        assert redis_server.publish("u-both", message) == 2
        for ws in tabs:
            assert (await receive_json(ws))["payload"] == {"n": 1}

        # /metrics: the internal port of whichever worker answers reports the
        # whole group; the public port serves none.
        assert (await http(port, "GET", "/metrics")).status == 404
        for _ in range(3):
            text = (await http(internal, "GET", "/metrics")).body
            assert metric_value(text, "websocket_active_connections") == len(tabs)
            assert metric_value(text, "websocket_messages_sent_total") == len(tabs)
            assert metric_value(text, "websocket_connections_total") == len(tabs)
            assert metric_value(text, "websocket_broker_messages_received_total") == 2
            assert metric_value(text, "websocket_subscriber_up") == 1
            assert metric_value(text, "websocket_workers") == 2
            assert metric_value(text, "websocket_worker_restarts_total") == 0

        # A hangup of the whole group (its terminal closed) is ignored by
        # the supervisor and the workers alike: it killed all three.
        os.killpg(proc.pid, signal.SIGHUP)
        await trio.sleep(1.5)  # a few watchdog periods
        doc = (await http(port, "GET", "/health")).json()
        assert doc["workers"]["ready"] == 2 and doc["websocket"]["active_connections"] == len(tabs)
        stop_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            codes = [await close_code(ws, timeout=15) for ws in tabs]
            await proc.wait()
    assert codes == [1001] * len(tabs)
    assert proc.returncode == 0
    stderr = log.read_text()
    assert stderr.count("msg=drained") == 2, stderr
    assert "signal received again" not in stderr
    assert stderr.count("signal ignored: smapws has no reload") == 3, stderr

    stopping = systemd_socket.wait_for("STOPPING", 1)
    assert stopping.at >= stop_at
    budget = stop_budget(make_config(SMAPWS_DRAIN_TIMEOUT=10, SMAPWS_WRITE_WAIT=2))
    assert int(stopping.fields["EXTEND_TIMEOUT_USEC"]) == int(budget * 1e6) == 17_000_000
    # NotifyAccess=main: every datagram from the supervisor, none from a worker.
    assert {d.pid for d in systemd_socket.received} == {proc.pid}
    assert len(systemd_socket.with_key("READY")) == 1
    # WatchdogSec=1s: the supervisor pings every 0.25 s (a quarter), never
    # leaving a second without one.
    pings = [d.at for d in systemd_socket.with_key("WATCHDOG") if ready.at <= d.at < stop_at]
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert len(pings) >= 5 and gaps[-1] < 1.0, gaps
    assert 0.2 <= gaps[len(gaps) // 2] <= 0.35, gaps


async def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(
    redis_server: RedisServer, notify_dir: Path
) -> None:
    port = free_port()
    log = notify_dir / "group.log"
    async with group_process(hub_env(redis_server, port), log) as proc:
        async with contextlib.AsyncExitStack() as stack:
            await wait_group_ready(port, proc)
            tabs, doc = await open_tabs_on_both(port, "u-kill", stack)
            before = (await http(port, "GET", "/metrics")).body
            victim = doc["workers"]["list"][0]
            os.kill(victim["pid"], signal.SIGKILL)
            # The tabs the other worker held stay open and keep receiving;
            # the victim's are cut (no close frame).
            with trio.fail_after(10):
                while redis_server.publish("u-kill", {"type": "alert", "payload": {}}) != 1:
                    await trio.sleep(0.02)
            delivered = 0
            for ws in tabs:
                with contextlib.suppress(Exception):
                    if (await receive_json(ws, timeout=2))["type"] == "alert":
                        delivered += 1
            assert delivered == doc["workers"]["list"][1]["active_connections"]
            # The port serves throughout, before the replacement is up.
            async with connect(port, "u-new") as fresh:
                with trio.fail_after(5):
                    while (
                        redis_server.publish("u-new", {"type": "notification", "payload": {}}) < 1
                    ):
                        await trio.sleep(0.02)
                assert (await receive_json(fresh))["type"] == "notification"

        doc = await wait_group_ready(port, proc)
        replaced = doc["workers"]["list"][0]
        assert replaced["pid"] != victim["pid"] and replaced["status"] == "ready"
        assert doc["workers"]["restarts"] == 1
        after = (await http(port, "GET", "/metrics")).body
        assert metric_value(after, "websocket_worker_restarts_total") == 1
        assert metric_value(after, "websocket_workers") == 2
        # What the dead worker had counted stays in the group's counters.
        for counter in ("websocket_connections_total", "process_cpu_seconds_total"):
            assert metric_value(after, counter) >= metric_value(before, counter), counter
        assert metric_value(after, "websocket_connections_total") >= len(tabs) + 1

        # Ctrl-C in a terminal: SIGINT to every process of the job. Each
        # worker drains once (its own signal and the supervisor's word are
        # one drain, not "a second signal: stop now") and all exit 0.
        os.killpg(proc.pid, signal.SIGINT)
        with trio.fail_after(15):
            await proc.wait()
    assert proc.returncode == 0
    stderr = log.read_text()
    assert re.search(r"worker exited, replacing it.* worker=0 exit=SIGKILL", stderr), stderr
    assert stderr.count("msg=drained") == 2 and "signal received again" not in stderr, stderr
    assert len(re.findall(r'msg="worker exited" role=supervisor worker=\d exit=0\n', stderr)) == 2
    assert SECRET not in stderr


async def test_a_stopped_worker_is_not_ready_then_replaced(
    redis_server: RedisServer, notify_dir: Path
) -> None:
    """Issue 16: SIGSTOP of one of two workers left /ready 200 and the worker
    listed ``ready`` for as long as it was stopped. Now, within 4 heartbeats
    and one more, /ready is 503 and /health names it ``unresponsive``; after
    UNRESPONSIVE_KILL_S more it is killed and a new worker takes its slot."""
    port = free_port()
    log = notify_dir / "group.log"
    async with group_process(hub_env(redis_server, port), log) as proc:
        doc = await wait_group_ready(port, proc)
        victim = doc["workers"]["list"][0]["pid"]
        os.kill(victim, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            listed: dict[int, str] = {}
            with trio.fail_after(10):  # the other worker answers (the stopped one accepts nothing)
                # Both: a /ready 503 for another cause (a loaded machine) must not pass for it.
                while (r := await http(port, "GET", "/ready")).status != 503 or listed != {
                    0: "unresponsive",
                    1: "ready",
                }:
                    listed = {
                        w["worker"]: w["status"] for w in (await health(port))["workers"]["list"]
                    }
                    await trio.sleep(0.2)
            noticed = time.monotonic() - stopped
            assert r.json()["status"] == "degraded"
            doc = await wait_group_ready(port, proc, timeout=UNRESPONSIVE_KILL_S + 15)
            replaced = time.monotonic() - stopped
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        assert doc["workers"]["list"][0]["pid"] != victim
        assert doc["workers"]["restarts"] == 1
    stderr = log.read_text()
    assert re.search(rf"worker not answering, not ready.* worker=0 pid={victim}", stderr), stderr
    assert re.search(r"worker exited, replacing it.* worker=0 exit=SIGKILL", stderr), stderr
    print(f"stopped worker: /ready 503 after {noticed:.1f} s, replaced after {replaced:.1f} s")


async def test_a_port_in_use_is_one_line_and_exit_1(
    redis_server: RedisServer, notify_dir: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await trio.run_process(
            [sys.executable, "-m", "smapws", "serve"],
            env=hub_env(redis_server, port),
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines() == [
        f"smapws: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
