"""Operations: systemd's notify protocol, and the files an operator installs
(systemd/, Containerfile, deploy/kubernetes/), checked against the code.

The notify protocol is tested three ways: its pure parts as functions, its
timeline with trio's MockClock, and end to end by running ``python -m smapws
serve`` with a ``NOTIFY_SOCKET`` of the test's own and reading the datagrams
(with the sender's pid, as systemd checks it for ``NotifyAccess=main``).

The unit file is checked by ``systemd-analyze verify`` and ``systemd-analyze
security --offline`` where systemd-analyze is installed (``bash .ci/run``
installs it), and always by reading its directives. The Containerfile's
instructions are read, its health check command is run against a live hub,
and the package list ``pip install .`` uses is compared with the source tree.
(tests/test_deploy.py builds and runs the image, and runs the unit under a
real systemd.) The Kubernetes manifests are parsed and every path, port and
variable they name is looked up in the code; then a hub run with their
ConfigMap's settings answers each request they send on the port they send
it to.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml
from trio_util import AsyncValue

from smapws import Server, serve
from smapws._config import Config, ConfigError, option_names
from smapws._config import load as load_config
from smapws._io import frontdoor, sdnotify
from smapws._io.sdnotify import Notifier, Status
from smapws._io.server import stop_budget
from smapws._version import __version__

from .conftest import (
    SECRET,
    NotifySocket,
    RedisServer,
    connect,
    free_port,
    http,
    make_config,
    receive_json,
    wait_port_ready,
)

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "smapws.service"
ENV_EXAMPLE = ROOT / "systemd" / "smapws.env.example"
CONTAINERFILE = ROOT / "Containerfile"
CONTAINERIGNORE = ROOT / ".containerignore"
KUBE = ROOT / "deploy" / "kubernetes"

#: Variables that are not smapws settings but may appear in the operations
#: files: the interpreter's own, and the container's PATH.
NOT_SETTINGS = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONFAULTHANDLER"}
#: The seed's pod resources (integration guide, "Kubernetes Configuration").
SEED_RESOURCES = {
    "requests": {"memory": "128Mi", "cpu": "100m"},
    "limits": {"memory": "256Mi", "cpu": "500m"},
}


def defaults() -> Config:
    """The configuration an operator gets without setting anything but a key."""
    return load_config({"JWT_SECRET": SECRET})


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any setting of smapws or systemd's."""
    prefixes = ("SMAPWS_", "REDIS_", "JWT_", "NOTIFY_SOCKET", "WATCHDOG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


# -- sd_notify: the pure parts -------------------------------------------------------------


def test_notify_socket_addresses() -> None:
    assert sdnotify.parse_address(None) is None
    assert sdnotify.parse_address("") is None
    assert sdnotify.parse_address("/run/systemd/notify") == "/run/systemd/notify"
    # systemd's "@" is the Linux abstract namespace, "\0" in Python's spelling.
    assert sdnotify.parse_address("@smapws/notify") == "\0smapws/notify"
    for bad in ("relative/notify", "vsock:2:1234", "@"):
        with pytest.raises(sdnotify.NotifyAddressError):
            sdnotify.parse_address(bad)


def test_watchdog_period_is_half_of_watchdog_usec_for_this_process_only() -> None:
    assert sdnotify.watchdog_period({}, pid=42) is None
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "30000000"}, pid=42) == 15.0
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15
    # Meant for another process (e.g. inherited from a parent): not ours to ping.
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    for off in ("0", "", "soon", "-5"):
        assert sdnotify.watchdog_period({"WATCHDOG_USEC": off}, pid=42) is None


def test_notifications_are_one_assignment_per_line() -> None:
    data = sdnotify.encode({"READY": 1, "STATUS": "line one\nline two"})
    # A newline inside a value would smuggle in a second assignment.
    assert data == b"READY=1\nSTATUS=line one line two\n"
    long = sdnotify.encode({"STATUS": "x" * 1000})
    assert len(long) == len("STATUS=\n") + sdnotify.MAX_STATUS_CHARS
    for key in ("ready", "READY=1\nX", "", "ÄRGER"):
        with pytest.raises(ValueError, match="not a notify key"):
            sdnotify.encode({key: 1})


def _health(status: str, *, draining: bool = False, reconnects: int = 0) -> dict[str, Any]:
    return {
        "draining": draining,
        "subscriber": {"backend": "redis", "status": status, "reconnects": reconnects},
        "websocket": {"active_connections": 3, "active_users": 2},
    }


def test_status_line_says_what_systemctl_status_should_show() -> None:
    assert sdnotify.hub_status(_health("connecting"), 8081) == Status(
        "listening on port 8081, waiting for the redis subscriber", "3 connections, 2 users"
    )
    ready = sdnotify.hub_status(_health("connected"), 8081)
    assert ready.text == "ready on port 8081, redis subscriber connected; 3 connections, 2 users"
    down = _health("down", reconnects=2)
    assert sdnotify.hub_status(down, 8081).state == "degraded on port 8081: redis subscriber down"
    down["subscriber"]["last_error"] = "ConnectionError: Connection refused"
    assert sdnotify.hub_status(down, 8081).state == (
        "degraded on port 8081: redis subscriber down (ConnectionError: Connection refused)"
    )
    assert sdnotify.hub_status(_health("connecting", reconnects=1), 8081).state.startswith(
        "degraded"
    )
    draining = sdnotify.hub_status(_health("connected", draining=True), 8081)
    assert draining.state == "draining on port 8081"


# -- sd_notify: the socket ------------------------------------------------------------------


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notifier_sends_to_a_path_and_to_an_abstract_socket(notify_dir: Path) -> None:
    path = str(notify_dir / "notify")
    abstract = f"@smapws-test-{os.getpid()}-{time.monotonic_ns()}"
    with _receiver(path) as by_path, _receiver("\0" + abstract[1:]) as by_name:
        for env, receiver in ((path, by_path), (abstract, by_name)):
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": env})
            assert notifier.enabled
            assert notifier.ready("ready on port 1")
            assert notifier.watchdog()
            assert receiver.recv(4096) == b"READY=1\nSTATUS=ready on port 1\n"
            assert receiver.recv(4096) == b"WATCHDOG=1\n"
            notifier.close()
            # Closed: nothing more is sent (and no socket is leaked).
            assert not notifier.watchdog()


def test_notifier_is_a_no_op_without_systemd(caplog: pytest.LogCaptureFixture) -> None:
    off = Notifier.from_environ({})
    assert not off.enabled
    assert not off.ready("x") and not off.watchdog()
    assert not off.stopping("x", extend_timeout_s=1)
    unusable = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not unusable.enabled and not unusable.ready("x")
    assert "systemd notify disabled" in caplog.text


def _failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.smapws_fields["error"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "systemd notify failed"
    ]


def test_notifier_never_raises_and_never_blocks(
    notify_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(notify_dir / "notify")
    # Nobody listening: systemd gone. A failure is False and one log line.
    gone = Notifier(path)
    try:
        assert not gone.watchdog()
        assert not gone.watchdog()
    finally:
        gone.close()
    assert _failures(caplog) == ["ENOENT"]
    # A listener that never reads: its queue fills; sends must not wait.
    with _receiver(path):
        stuck = Notifier(path)
        try:
            start = time.monotonic()
            results = [stuck.watchdog() for _ in range(5000)]
            elapsed = time.monotonic() - start
        finally:
            stuck.close()
    assert results[0] and not results[-1]
    assert elapsed < 2, f"5000 sends to a full socket took {elapsed:.1f}s: they blocked"
    assert _failures(caplog) == ["ENOENT", "EAGAIN"]


class RecordingNotifier(Notifier):
    """Records (virtual time, assignments) instead of sending."""

    def __init__(self) -> None:
        super().__init__("/nonexistent")
        self.sent: list[tuple[float, dict[str, str | int]]] = []

    def send(self, assignments: Mapping[str, str | int]) -> bool:
        self.sent.append((trio.current_time(), dict(assignments)))
        return True

    def times(self, key: str) -> list[float]:
        return [round(t, 6) for t, a in self.sent if key in a]


class FakeHub:
    """Readiness and the state part of the status line change through an
    observable value, as a hub's do (``App.state``); the counts change
    without telling anyone, as a hub's connection count does."""

    def __init__(self) -> None:
        self.state = AsyncValue("waiting")
        self.count = 0

    def ready(self) -> bool:
        return self.state.value == "ready"

    def status(self) -> Status:
        return Status(self.state.value, f"{self.count} connections")


async def test_supervise_timeline(autojump_clock: trio.testing.MockClock) -> None:
    notifier = RecordingNotifier()
    hub = FakeHub()

    async def script() -> None:
        await trio.sleep(2.35)
        hub.state.value = "ready"
        await trio.sleep(10)  # t = 12.35: counts change every second from here on
        for n in range(1, 12):
            hub.count = n
            await trio.sleep(1)
        hub.state.value = "degraded"  # t = 23.35

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(
            lambda task_status: sdnotify.supervise(
                notifier,
                changes=hub.state,
                is_ready=hub.ready,
                describe=hub.status,
                watchdog_s=15.0,
                task_status=task_status,
            )
        )
        await script()
        await trio.sleep(30 - (trio.current_time() - start) + 0.01)
        nursery.cancel_scope.cancel()

    # WATCHDOG=1 at once, then exactly every 15 s of the loop's clock.
    assert notifier.times("WATCHDOG") == [0.0, 15.0, 30.0]
    # READY=1 once, the instant readiness changed (no polling); never before it.
    assert notifier.times("READY") == [2.35]
    statuses = [
        (round(t, 2), str(a["STATUS"]))
        for t, a in notifier.sent
        if "STATUS" in a and "READY" not in a
    ]
    # Before ready: the waiting status, once.
    assert statuses[0] == (0.0, "waiting; 0 connections")
    later = [s for s in statuses if s[0] > 2.5]
    # Count-only changes at most every STATUS_REFRESH_S; a state change at once.
    count_only = [t for t, text in later if text.startswith("ready")]
    assert all(b - a >= sdnotify.STATUS_REFRESH_S for a, b in itertools.pairwise(count_only))
    assert 1 <= len(count_only) <= 3
    degraded = [t for t, text in later if text.startswith("degraded")]
    assert degraded == [23.35]


async def test_supervise_sleeps_between_changes(autojump_clock: trio.testing.MockClock) -> None:
    """Nothing changes for an hour: the notifier wakes for the watchdog and
    the count refresh only, not ten times a second."""
    notifier = RecordingNotifier()
    hub = FakeHub()
    describes = 0

    def status() -> Status:
        nonlocal describes
        describes += 1
        return hub.status()

    with trio.move_on_after(3600):
        await sdnotify.supervise(
            notifier, changes=hub.state, is_ready=hub.ready, describe=status, watchdog_s=15.0
        )
    # One look per watchdog tick (240) and per refresh (720), at most.
    assert describes <= 3600 / 15 + 3600 / sdnotify.STATUS_REFRESH_S + 1
    assert len(notifier.times("STATUS")) == 1


async def test_watchdog_ticks_only_when_allowed(autojump_clock: trio.testing.MockClock) -> None:
    notifier = RecordingNotifier()
    allowed = iter([True, False, True, True, False, True])
    with trio.move_on_after(10.01):
        await sdnotify.supervise(
            notifier,
            changes=AsyncValue(0),
            is_ready=lambda: True,
            describe=lambda: Status("ready", ""),
            watchdog_s=2,
            watchdog_ok=lambda: next(allowed),
        )
    assert notifier.times("WATCHDOG") == [0, 4, 6, 10]


async def test_a_failing_status_never_stops_the_watchdog(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = RecordingNotifier()

    def broken() -> Status:
        raise KeyError("subscriber")

    with trio.move_on_after(10.01):
        await sdnotify.supervise(
            notifier,
            changes=AsyncValue(0),
            is_ready=lambda: True,
            describe=broken,
            watchdog_s=2,
        )
    assert notifier.times("WATCHDOG") == [0, 2, 4, 6, 8, 10]
    assert not notifier.times("READY")
    assert caplog.text.count("systemd status unavailable") == 1


# -- sd_notify: wired into serve() ------------------------------------------------------------


async def _recv(sock: trio.socket.SocketType, timeout: float = 10) -> dict[str, str]:
    with trio.fail_after(timeout):
        data = await sock.recv(4096)
    return dict(line.split("=", 1) for line in data.decode().splitlines())


async def test_serve_notifies_ready_and_stopping(
    notify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(notify_dir / "notify")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    config = make_config(SMAPWS_DRAIN_TIMEOUT=7, SMAPWS_WRITE_WAIT=2)
    with sock:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                lambda task_status: serve(config, notify_systemd=True, task_status=task_status)
            )
            ready = await _recv(sock)
            # The in-process broker: ready as soon as the hub listens.
            assert ready["READY"] == "1"
            assert f"ready on port {server.port}" in ready["STATUS"]
            assert (await http(server.port, "GET", "/ready")).status == 200
            server.drain()
            stopping = await _recv(sock)
            assert stopping["STOPPING"] == "1"
            # systemd is asked for the whole drain: 7 + 2 + margin seconds.
            assert int(stopping["EXTEND_TIMEOUT_USEC"]) == int(stop_budget(config) * 1e6)
            assert stop_budget(config) == 7 + 2 + 5
        # serve() returned by itself after the drain.


async def test_an_embedded_hub_leaves_notify_socket_alone(
    notify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve() inside another program (no handle_signals) must not tell that
    program's systemd unit it is READY or STOPPING."""
    path = str(notify_dir / "notify")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with sock:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, make_config())
            assert (await http(server.port, "GET", "/ready")).status == 200
            server.drain()
            with trio.move_on_after(0.5) as waited:
                await sock.recv(4096)
            assert waited.cancelled_caught, "an embedded hub sent a notification"


def _get(port: int, path: str) -> int:
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_listening(proc: subprocess.Popen[Any], port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the hub exited"
        try:
            if _get(port, "/health") == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the hub did not listen")


def test_smapws_serve_speaks_sd_notify_like_systemd_expects(
    systemd_socket: NotifySocket, notify_dir: Path
) -> None:
    """The daemon under a NOTIFY_SOCKET and WatchdogSec=1s, with Redis absent at
    first: listening, WATCHDOG=1 pings, but no READY=1 until Redis is there and
    /ready is 200; SIGTERM gives STOPPING=1 and exit 0; every datagram comes from
    the main pid (NotifyAccess=main)."""
    hub_port, redis_port = free_port(), free_port()
    env = clean_env(
        NOTIFY_SOCKET=systemd_socket.path,
        WATCHDOG_USEC="1000000",
        SMAPWS_HOST="127.0.0.1",
        SMAPWS_PORT=str(hub_port),
        REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        SMAPWS_RECONNECT_MAX="1",
        SMAPWS_REDIS_TIMEOUT="2",
        JWT_SECRET=SECRET,
    )
    # stderr to a file: a pipe nobody reads could fill and stall the hub.
    log = notify_dir / "hub.log"
    with log.open("w") as stderr_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smapws", "serve"], env=env, stderr=stderr_file
        )
    redis = None
    try:
        _wait_listening(proc, hub_port)
        assert _get(hub_port, "/ready") == 503
        time.sleep(2)
        assert not systemd_socket.with_key("READY"), "READY=1 before Redis was reachable"
        status = systemd_socket.wait_for("STATUS", 1)
        assert "waiting for the redis subscriber" in status.fields["STATUS"]

        with tempfile.TemporaryDirectory(prefix="smapws-redis-") as workdir:
            redis = RedisServer(redis_port, Path(workdir))
            # Before start(), which returns once Redis answers a PING: by then
            # the hub (retrying) may have subscribed and said READY already.
            redis_up = time.monotonic()
            redis.start()
            ready = systemd_socket.wait_for("READY", 15)
            assert ready.at >= redis_up
            assert _get(hub_port, "/ready") == 200
            assert "redis subscriber connected" in ready.fields["STATUS"]

            time.sleep(1.5)
            proc.send_signal(signal.SIGTERM)
            stopping = systemd_socket.wait_for("STOPPING", 10)
            assert proc.wait(timeout=20) == 0
            redis.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if redis is not None:
            redis.kill()
    stderr = log.read_text()

    assert stopping.at > ready.at
    assert int(stopping.fields["EXTEND_TIMEOUT_USEC"]) == int(stop_budget(defaults()) * 1e6)
    assert not [d for d in systemd_socket.with_key("READY") if d.at > stopping.at]
    # WatchdogSec=1s: a ping every ~0.5 s, never a second without one.
    pings = [d.at for d in systemd_socket.with_key("WATCHDOG") if d.at < stopping.at]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 6, pings
    assert max(gaps) < 1.0, gaps
    assert 0.4 <= sorted(gaps)[len(gaps) // 2] <= 0.7, gaps
    # NotifyAccess=main: systemd drops datagrams from any other process.
    assert {d.pid for d in systemd_socket.received} == {proc.pid}
    assert "systemd notify failed" not in stderr


# -- MemoryDenyWriteExecute -----------------------------------------------------------------

PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1
#: Sets the kernel's W^X policy (Linux >= 6.3; kept across execve), the
#: equivalent of systemd's MemoryDenyWriteExecute=yes, then runs the hub.
MDWE_LAUNCHER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-m", "smapws", "serve"])
"""


def _mdwe_supported() -> bool:
    probe = f"import ctypes; print(ctypes.CDLL(None).prctl({PR_GET_MDWE}, 0, 0, 0, 0))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return out.stdout.strip() == "0"


async def test_the_hub_runs_under_memory_deny_write_execute(redis_server: RedisServer) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: CPython without a JIT, trio's
    ctypes use, trio-asyncio, redis-py and PyJWT must never need memory that is
    writable and executable. The kernel enforces the same policy here."""
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    port = free_port()
    env = clean_env(
        SMAPWS_HOST="127.0.0.1",
        SMAPWS_PORT=str(port),
        REDIS_URL=redis_server.url,
        JWT_SECRET=SECRET,
    )
    async with trio.open_nursery() as nursery:
        run = partial(trio.run_process, [sys.executable, "-c", MDWE_LAUNCHER], env=env, check=False)
        proc: trio.Process = await nursery.start(run)
        await wait_port_ready(port, 20, exited=lambda: proc.returncode)
        async with connect(port, "mdwe-user") as ws:
            with trio.fail_after(5):
                while (
                    redis_server.publish("mdwe-user", {"type": "notification", "payload": {}}) < 1
                ):
                    await trio.sleep(0.05)
            assert (await receive_json(ws))["type"] == "notification"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await proc.wait()
    assert proc.returncode == 0


# -- SystemCallFilter ------------------------------------------------------------------------


def _syscall_group(name: str, analyze: str) -> set[str]:
    """The system calls of a systemd ``@group``, nested groups expanded."""
    out = subprocess.run(
        [analyze, "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if item.startswith("@"):
            calls |= _syscall_group(item, analyze)
        elif item and not item.startswith("#"):
            calls.add(item)
    return calls


def _can_strace() -> bool:
    strace = shutil.which("strace")
    if strace is None:
        return False
    probe = subprocess.run([strace, "-qq", "-o", os.devnull, "true"], capture_output=True)
    return probe.returncode == 0


async def test_the_hub_makes_no_system_call_its_unit_filters_out(
    redis_server: RedisServer, notify_dir: Path
) -> None:
    """Every system call of a whole session (start with Redis, sd_notify, a
    WebSocket delivery, the drain), traced with strace, is in the unit's
    SystemCallFilter= (otherwise systemd would answer it with EPERM)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None or not _can_strace():
        pytest.skip("needs systemd-analyze and a working strace (ptrace allowed)")
    service = parse_unit(UNIT)["Service"]
    filters = [v.split() for k, v in service if k == "SystemCallFilter"]
    allowed: set[str] = set()
    for rule in filters:
        negate = rule[0].startswith("~")
        names = [rule[0].lstrip("~"), *rule[1:]]
        calls = set().union(
            *(_syscall_group(n, analyze) if n.startswith("@") else {n} for n in names)
        )
        allowed = allowed - calls if negate else allowed | calls
    assert "epoll_wait" in allowed and "setrlimit" not in allowed

    trace = notify_dir / "strace.out"
    port = free_port()
    env = clean_env(
        SMAPWS_HOST="127.0.0.1",
        SMAPWS_PORT=str(port),
        REDIS_URL=redis_server.url,
        JWT_SECRET=SECRET,
        NOTIFY_SOCKET=f"@smapws-strace-{os.getpid()}",
        WATCHDOG_USEC="1000000",
    )
    argv = ["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m", "smapws", "serve"]
    async with trio.open_nursery() as nursery:
        run = partial(trio.run_process, argv, env=env, check=False)
        strace: trio.Process = await nursery.start(run)
        await wait_port_ready(port, 30, exited=lambda: strace.returncode)
        async with connect(port, "traced-user") as ws:
            with trio.fail_after(10):
                message = {"type": "notification", "payload": {}}
                while redis_server.publish("traced-user", message) < 1:
                    await trio.sleep(0.05)
                assert (await receive_json(ws))["type"] == "notification"
            # strace's first line is the hub's (its first traced process).
            hub_pid = int(trace.read_text().split(None, 1)[0])
            os.kill(hub_pid, signal.SIGTERM)
            with trio.fail_after(30):
                await strace.wait()
    assert strace.returncode == 0
    used = set(re.findall(r"^\d+ +([a-z0-9_]+)\(", trace.read_text(), re.MULTILINE))
    assert {"epoll_wait", "sendto", "accept4"} <= used, "the trace looks empty"
    assert used - allowed == set(), "system calls SystemCallFilter= would refuse"


# -- the systemd unit -------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]}, keeping repeats."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert values, f"{key}= is missing"
    return values[-1]


def seconds(value: str) -> float:
    """A systemd time span (``50``, ``45s``, ``1min 30s``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_unit_file_directives() -> None:
    unit = parse_unit(UNIT)
    service = unit["Service"]
    get = lambda key: unit_value(service, key)  # noqa: E731
    config = defaults()

    assert get("Type") == "notify"
    assert get("NotifyAccess") == "main"
    assert 2 <= seconds(get("WatchdogSec")) <= 120
    assert get("EnvironmentFile") == "-/etc/smapws/smapws.env"
    exe, *args = shlex.split(get("ExecStart"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert exe == "/opt/smapws/venv/bin/smapws" and Path(exe).name in scripts
    assert args == ["serve"]
    assert get("Restart") == "on-failure"
    assert "2" in get("RestartPreventExitStatus").split(), "config errors must not restart-loop"
    assert get("KillSignal") == "SIGTERM"
    # The whole drain fits before systemd's SIGKILL.
    assert seconds(get("TimeoutStopSec")) > stop_budget(config)
    # One descriptor per connection, plus refused handshakes during a storm.
    assert int(get("LimitNOFILE")) >= 1.5 * config.max_connections + 1024

    sandbox = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "SystemCallArchitectures": "native",
    }
    for key, value in sandbox.items():
        assert get(key) == value, f"{key}={get(key)}, expected {value!r}"
    assert set(get("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert next(v for k, v in service if k == "SystemCallFilter") == "@system-service"

    # Environment= names only what the interpreter reads.
    for assignment in shlex.split(" ".join(v for k, v in service if k == "Environment")):
        assert assignment.split("=", 1)[0] in NOT_SETTINGS
    assert unit_value(unit["Install"], "WantedBy") == "multi-user.target"


def _verifiable_unit(directory: Path) -> Path:
    """The unit with ExecStart pointing at this venv's console script (the
    verifier checks that the program exists)."""
    script = Path(sys.executable).parent / "smapws"
    assert script.exists(), f"{script}: the console script is not installed"
    text = UNIT.read_text().replace("/opt/smapws/venv/bin/smapws", str(script))
    path = directory / "smapws.service"
    path.write_text(text)
    return path


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (bash .ci/run installs it); "
    "test_unit_file_directives still checks the unit",
)


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(notify_dir: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = _verifiable_unit(notify_dir)
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unknown keys and bad values are warnings with exit status 0: any output
    # about the unit is a defect.
    complaints = [line for line in out.stderr.splitlines() if "smapws.service" in line]
    assert out.returncode == 0 and not complaints, out.stderr


@needs_systemd_analyze
def test_unit_sandbox_exposure_stays_low(notify_dir: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = _verifiable_unit(notify_dir)
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--man=no", "--threshold=15", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for smapws\.service: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    # 0 is a fully locked-down unit, 10 an unsandboxed one; this unit scores
    # 1.1 ("OK"), losing a handful of directives would take it above 2.
    assert float(match.group(1)) <= 2.0, out.stdout


def read_env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """(assignments, every variable name mentioned, commented out or not)."""
    values: dict[str, str] = {}
    names: set[str] = set()
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if m := re.match(r"#?([A-Z][A-Z0-9_]*)=", line):
            names.add(m.group(1))
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"not VAR=value: {line!r}"
        values[key] = value
    return values, names


def test_env_example_names_only_real_settings_and_loads() -> None:
    values, names = read_env_file(ENV_EXAMPLE)
    unknown = names - set(option_names())
    assert not unknown, f"{ENV_EXAMPLE.name} names variables smapws does not read: {unknown}"
    # As shipped the secret is empty: the hub refuses to start (exit 2) rather
    # than run with a key everybody knows.
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        load_config(values)
    config = load_config({**values, "JWT_SECRET": SECRET})
    assert config.port == 8081
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    limit = int(unit_value(parse_unit(UNIT)["Service"], "LimitNOFILE"))
    assert limit >= 1.5 * config.max_connections + 1024
    timeout_stop = seconds(unit_value(parse_unit(UNIT)["Service"], "TimeoutStopSec"))
    assert timeout_stop > stop_budget(config)


# -- the Containerfile ------------------------------------------------------------------------


def parse_containerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        word, _, args = line.partition(" ")
        instructions.append((word.upper(), args.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_containerfile_instructions() -> None:
    steps = parse_containerfile(CONTAINERFILE)
    final = final_stage(steps)
    one = lambda word: [a for w, a in final if w == word][-1]  # noqa: E731

    froms = [a for w, a in steps if w == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the image"
    # One base for both stages (the venv links to its interpreter), chosen
    # with --build-arg PYTHON_IMAGE; by default the official slim image.
    assert [f.split()[0] for f in froms] == ["${PYTHON_IMAGE}"] * len(froms)
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    default = re.fullmatch(r"docker\.io/library/python:(\d+)\.(\d+)-slim", args["PYTHON_IMAGE"])
    assert default, args["PYTHON_IMAGE"]
    assert requires == ">=3.11" and tuple(map(int, default.groups())) >= (3, 11)
    # The final stage runs nothing: what a build mounts for pip stays out of it.
    assert [w for w, _ in final if w == "RUN"] == []

    # The README's install: `pip install .` into a venv, whose bin is on PATH;
    # `python3`, the one name every Python base has (Debian's has no `python`).
    runs = " ".join(a for w, a in steps if w == "RUN")
    assert "python3 -m venv /opt/smapws/venv" in runs
    commands = " ".join(a for w, a in steps if w in ("RUN", "HEALTHCHECK"))
    assert not re.search(r'(^|[\s"])python([\s"]|$)', commands), "no `python` on a Debian base"
    assert "/opt/smapws/venv/bin/pip install ." in runs
    env = dict(re.findall(r"([A-Z][A-Z0-9_]*)=(\S+)", " ".join(a for w, a in final if w == "ENV")))
    assert env["PATH"].startswith("/opt/smapws/venv/bin:")
    unknown = set(env) - set(option_names()) - NOT_SETTINGS
    assert not unknown, f"ENV names variables smapws does not read: {unknown}"
    load_config({k: v for k, v in env.items() if k not in NOT_SETTINGS} | {"JWT_SECRET": SECRET})

    # Non-root, and numeric, so that Kubernetes' runAsNonRoot can verify it.
    user = one("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}"
    assert one("EXPOSE") == str(defaults().port) == "8081"
    assert one("STOPSIGNAL") == "SIGTERM"
    assert json.loads(one("ENTRYPOINT")) == ["smapws"]
    assert json.loads(one("CMD")) == ["serve"]
    health = one("HEALTHCHECK")
    assert "curl" not in health and "wget" not in health
    assert "/health" in health


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .containerignore keeps ``path`` out of the build context
    (the last matching pattern wins; ``!`` re-includes)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) for p in prefixes) or fnmatch.fnmatch(
            path, pat.replace("**/", "*")
        ):
            ignored = not negate
    return ignored


def test_containerfile_copies_what_pip_install_needs() -> None:
    steps = parse_containerfile(CONTAINERFILE)
    copies = [a.split() for w, a in steps if w == "COPY" and not a.startswith("--from")]
    sources = [src for *srcs, _dest in copies for src in srcs]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["readme"] in sources, "pip install . reads the readme"
    assert "pyproject.toml" in sources
    # smapws_publisher's source is publisher/smapws_publisher (package-dir).
    package_dir = pyproject["tool"]["setuptools"].get("package-dir", {})
    for package in pyproject["tool"]["setuptools"]["packages"]:
        top = package.split(".")[0]
        assert package_dir.get(top, top) in sources, f"package {package} is not copied"

    patterns = [
        line.strip()
        for line in CONTAINERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = ["pyproject.toml", "README.rst"] + [
        str(p.relative_to(ROOT))
        for top in ("smapws", *package_dir.values())
        for p in (ROOT / top).rglob("*")
        if p.suffix in (".py", ".typed")
    ]
    excluded = [p for p in needed if _ignored(p, patterns)]
    assert not excluded, f".containerignore keeps these out of the build: {excluded}"
    assert _ignored(".venv/bin/python", patterns) and _ignored("tests/test_ops.py", patterns)
    assert _ignored("publisher/examples/publish_sync.py", patterns)
    assert _ignored("smapws/__pycache__/x.pyc", patterns)


def test_pip_install_ships_every_module() -> None:
    """The image gets a real `pip install .`, not the editable install the
    tests run on: a package missing from pyproject's explicit list would be
    missing from the image only."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "smapws").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk - listed == set(), "packages pip install . would leave out"
    missing_init = {
        pkg for pkg in on_disk if not (ROOT / pkg.replace(".", "/") / "__init__.py").exists()
    }
    assert not missing_init
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["smapws"]


DEAD_PROXY = "http://127.0.0.1:9"


def _healthcheck_argv() -> list[str]:
    final = final_stage(parse_containerfile(CONTAINERFILE))
    spec = [a for w, a in final if w == "HEALTHCHECK"][-1]
    exec_form = spec[spec.index("CMD") + len("CMD") :].strip()
    argv: list[str] = json.loads(exec_form)
    assert argv[0] == "python3", "the image's own interpreter (no curl in a slim image)"
    return [sys.executable, *argv[1:]]


async def test_container_healthcheck_passes_on_a_live_hub_and_fails_without() -> None:
    argv = _healthcheck_argv()
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, make_config())
        # A proxy in the environment (common in corporate images) must not
        # swallow the check: this one goes nowhere.
        env = clean_env(SMAPWS_PORT=str(server.port), http_proxy=DEAD_PROXY, HTTP_PROXY=DEAD_PROXY)
        up = await trio.run_process(argv, env=env, check=False, capture_stderr=True)
        nursery.cancel_scope.cancel()
    assert up.returncode == 0, up.stderr
    down = await trio.run_process(
        argv, env=clean_env(SMAPWS_PORT=str(free_port())), check=False, capture_stderr=True
    )
    assert down.returncode != 0


# -- Kubernetes ------------------------------------------------------------------------------


def kube() -> dict[str, dict[str, Any]]:
    """Every manifest in deploy/kubernetes/, keyed by kind, or by
    ``Kind/name`` for a kind with several (the two Services)."""
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        docs += [doc | {"_file": path.name} for doc in yaml.safe_load_all(path.read_text()) if doc]
    kinds = [doc["kind"] for doc in docs]
    by_key: dict[str, dict[str, Any]] = {}
    for doc in docs:
        key = doc["kind"]
        if kinds.count(key) > 1:
            key += "/" + doc["metadata"]["name"]
        assert key not in by_key, f"two {key}s"
        by_key[key] = doc
    return by_key


def _container(k: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = k["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def _configmap_config(k: dict[str, dict[str, Any]]) -> Config:
    return load_config({**k["ConfigMap"]["data"], "JWT_SECRET": SECRET})


def _container_port(k: dict[str, dict[str, Any]], port: int | str) -> int:
    """The container port a probe or a Service's ``targetPort`` names."""
    ports = {p["name"]: p["containerPort"] for p in _container(k)["ports"]}
    return ports[port] if isinstance(port, str) else port


def _service_ports(k: dict[str, dict[str, Any]], service: str) -> dict[str, int]:
    """A Service's ports by name, each as the container port it reaches."""
    spec = k[f"Service/{service}"]["spec"]
    return {p["name"]: _container_port(k, p["targetPort"]) for p in spec["ports"]}


def test_kubernetes_manifests_fit_together() -> None:
    k = kube()
    assert set(k) >= {
        "Deployment",
        "Service/smapws",
        "Service/smapws-internal",
        "Ingress",
        "ConfigMap",
        "PodDisruptionBudget",
    }
    kustomization = k.pop("Kustomization")
    assert sorted(kustomization["resources"]) == sorted(d["_file"] for d in k.values())

    deployment = k["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    for service in ("smapws", "smapws-internal"):
        assert k[f"Service/{service}"]["spec"]["selector"].items() <= pod_labels.items()
    assert k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    container = _container(k)
    assert container["envFrom"] == [{"configMapRef": {"name": k["ConfigMap"]["metadata"]["name"]}}]


def test_kubernetes_paths_ports_and_variables_exist_in_the_code() -> None:
    k = kube()
    container = _container(k)
    config = _configmap_config(k)  # also: every value in the ConfigMap is valid
    assert config.port == defaults().port == 8081
    assert config.internal_port is not None, "metrics and publish off the public port"
    public, internal = config.port, config.internal_port

    # Each port is where the code serves it: the container declares both, the
    # public Service reaches only the public port, the internal one only the
    # internal port.
    assert sorted(p["containerPort"] for p in container["ports"]) == sorted((public, internal))
    assert set(_service_ports(k, "smapws").values()) == {public}
    assert set(_service_ports(k, "smapws-internal").values()) == {internal}
    served = {public: frontdoor.PUBLIC_ROUTES, internal: frontdoor.INTERNAL_ROUTES}

    probes = {
        "livenessProbe": "/health",
        "readinessProbe": "/ready",
    }
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, f"{probe} must use {path}"
        # On the public port: the listener the clients use is the one to probe.
        assert _container_port(k, get["port"]) == public, probe
        assert "GET" in served[public][path]
    annotations = k["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    scraped = int(annotations["prometheus.io/port"])
    assert scraped == internal, "/metrics is 404 on the public port"
    assert "GET" in served[scraped][annotations["prometheus.io/path"]]
    assert annotations["prometheus.io/path"] not in served[public]

    names = set(k["ConfigMap"]["data"]) | {e["name"] for e in container["env"]}
    assert {"REDIS_HOST", "REDIS_PORT", "REDIS_DB"} <= names, "the seed's variable names"
    unknown = names - set(option_names())
    assert not unknown, f"variables smapws does not read: {unknown}"
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert secret_env["JWT_SECRET"]["key"] == "JWT_SECRET"
    assert "optional" not in secret_env["JWT_SECRET"], "the hub cannot start without it"
    # The publish API behind smapws-internal: off (404) until the Secret has a key.
    assert secret_env["SMAPWS_API_KEY"] == {
        "name": "smapws-secrets",
        "key": "SMAPWS_API_KEY",
        "optional": True,
    }
    assert not {"JWT_SECRET", "REDIS_PASSWORD", "SMAPWS_API_KEY"} & set(k["ConfigMap"]["data"])


def _ingress_paths(ingress: dict[str, Any]) -> list[dict[str, Any]]:
    spec = ingress["spec"]
    assert "defaultBackend" not in spec, "everything else must not reach the hub"
    return [path for rule in spec["rules"] for path in rule["http"]["paths"]]


def test_kubernetes_ingress_routes_only_the_websocket_and_client_with_long_timeouts() -> None:
    k = kube()
    ingress = k["Ingress"]
    config = _configmap_config(k)
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["spec"]["ingressClassName"] == "nginx"

    paths = _ingress_paths(ingress)
    routed = [(p["path"], p["pathType"]) for p in paths]
    assert routed == [("/ws", "Exact"), ("/smapws-client.js", "Exact")]
    services = {p["name"]: p for p in k["Service/smapws"]["spec"]["ports"]}
    by_number = {p["port"]: p for p in services.values()}
    for path in paths:
        backend = path["backend"]["service"]
        assert backend["name"] == k["Service/smapws"]["metadata"]["name"]
        port = backend["port"].get("name") or backend["port"]["number"]
        target = (services.get(port) or by_number[port])["targetPort"]
        assert _container_port(k, target) == config.port, "the public port"
        # The ConfigMap sets SMAPWS_INTERNAL_PORT: each path must be served
        # on the public port then, and not on the internal one.
        assert config.internal_address is not None
        assert "GET" in frontdoor.PUBLIC_ROUTES[path["path"]]
        assert path["path"] not in frontdoor.INTERNAL_ROUTES

    # The WebSocket upgrade needs HTTP/1.1 to the pod; the proxy must keep a
    # connection open longer than the hub may stay silent on it (the seed:
    # idle timeout above PongWait).
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-http-version"] == "1.1"
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        seconds = int(notes[f"nginx.ingress.kubernetes.io/{timeout}"])
        assert seconds > max(config.pong_wait, config.ping_interval), timeout
        assert seconds >= 3600, "the figure README and service.yaml name"
    tls_hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
    assert {r["host"] for r in ingress["spec"]["rules"]} <= tls_hosts, "TLS ends here"


def test_kubernetes_image_is_the_one_the_operations_page_builds() -> None:
    k = kube()
    image = _container(k)["image"]
    (override,) = k["Kustomization"]["images"]
    assert image.partition(":")[0] == override["name"]
    assert override["newTag"] == __version__
    pushed = f"{override['newName']}:{override['newTag']}"
    assert "/" in override["newName"], "a registry: a cluster cannot pull a local image"
    readme = (ROOT / "docs" / "operations.rst").read_text()
    assert f"build -t {pushed} -f Containerfile ." in readme
    assert f"push {pushed}" in readme
    assert f"kustomize edit set image {override['name']}={pushed}" in readme


async def test_kubernetes_routes_answer_on_the_ports_the_manifests_name(
    nursery: trio.Nursery,
) -> None:
    """A hub run with the ConfigMap's settings (loopback, free ports, the
    in-process broker): every request the manifests send reaches a route on
    the port they send it to, and what they keep off a port is 404 there."""
    k = kube()
    container = _container(k)
    data = {key: v for key, v in k["ConfigMap"]["data"].items() if not key.startswith("REDIS_")}
    config = _configmap_config(k)
    assert config.internal_port is not None
    local = data | {
        "SMAPWS_HOST": "127.0.0.1",
        "SMAPWS_PORT": "0",
        "SMAPWS_INTERNAL_PORT": "0",
        "SMAPWS_ALLOWED_ORIGINS": "",
        "SMAPWS_LOG_LEVEL": "warning",
        "JWT_SECRET": SECRET,
        "SMAPWS_API_KEY": "k8s-test-key-0123456789",
    }
    server: Server = await nursery.start(serve, load_config(local))
    assert server.internal_port is not None
    bound = {config.port: server.port, config.internal_port: server.internal_port}

    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        r = await http(bound[_container_port(k, get["port"])], "GET", get["path"])
        assert r.status == 200, probe
    annotations = k["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    r = await http(bound[int(annotations["prometheus.io/port"])], "GET", "/metrics")
    assert r.status == 200 and b"websocket_active_connections" in r.body

    ws_path, client_path = _ingress_paths(k["Ingress"])
    assert ws_path["path"] == "/ws", "the path connect() asks for"
    public = bound[_service_ports(k, "smapws")["http"]]
    internal = bound[_service_ports(k, "smapws-internal")["internal"]]
    # The browser client pages import from the hub's host, where the Ingress
    # sends it: the public port.
    assert client_path["path"] == "/smapws-client.js"
    r = await http(public, "GET", client_path["path"])
    assert r.status == 200 and b"export default websocketService" in r.body
    async with connect(public, "u1") as ws:
        body = json.dumps(
            {"user_id": "u1", "message": {"type": "notification", "payload": {"n": 1}}}
        ).encode()
        auth = {"Authorization": "Bearer k8s-test-key-0123456789"}
        assert (await http(public, "POST", "/api/publish", body=body, headers=auth)).status == 404
        r = await http(internal, "POST", "/api/publish", body=body, headers=auth)
        assert r.status == 202
        assert (await receive_json(ws))["payload"] == {"n": 1}
    assert (await http(public, "GET", "/metrics")).status == 404
    assert (await http(internal, "GET", "/ws")).status == 404


def test_kubernetes_grace_period_covers_the_drain() -> None:
    k = kube()
    spec = k["Deployment"]["spec"]["template"]["spec"]
    container = _container(k)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    # The preStop sleep lets endpoint removal reach every proxy before the drain.
    assert 2 <= pre_stop <= 15
    config = _configmap_config(k)
    assert spec["terminationGracePeriodSeconds"] > pre_stop + stop_budget(config)
    assert spec["terminationGracePeriodSeconds"] > pre_stop + stop_budget(defaults())


def test_kubernetes_resources_security_and_availability() -> None:
    k = kube()
    deployment = k["Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    container = _container(k)
    assert deployment["spec"]["replicas"] == 3
    assert container["resources"] == SEED_RESOURCES
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The image's USER, as a number: runAsNonRoot cannot check a name.
    image_user = [a for w, a in final_stage(parse_containerfile(CONTAINERFILE)) if w == "USER"][-1]
    assert str(spec["securityContext"]["runAsUser"]) == image_user.split(":")[0]
    # Service links would set SMAPWS_PORT=tcp://... and REDIS_PORT=tcp://...,
    # names the hub reads: it would refuse to start.
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False
    # A rollout never drops below the replica count; evictions go one at a time.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = k["PodDisruptionBudget"]["spec"]
    assert pdb.get("maxUnavailable") == 1 or 0 < pdb.get("minAvailable", 0) < 3
    config = _configmap_config(k)
    assert config.broker == "redis", "several pods need Redis; memory is single-node"
