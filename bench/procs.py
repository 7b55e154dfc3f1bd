"""Child processes of a benchmark run (redis-server, the hub) and what we read from /proc.

Every process started here runs in its own session (a terminal's Ctrl-C reaches only
the coordinator, which then stops them in order) and gets ``SIGTERM`` if the
coordinator dies (``PR_SET_PDEATHSIG``), so a run never leaves processes behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class ProcError(Exception):
    """A child process failed to start or become ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def spawn(
    argv: Sequence[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr to ``log``, pinned to ``cpus`` if given.

    Pinning uses ``taskset -c`` when it exists (the pid stays the target's: taskset
    execs it), else ``os.sched_setaffinity`` right after the start.
    """
    argv = list(argv)
    taskset = shutil.which("taskset")
    if cpus and taskset:
        argv = [taskset, "-c", ",".join(map(str, sorted(cpus))), *argv]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # safe: the coordinator runs no threads
        )
    if cpus and not taskset:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(proc.pid, cpus)
    return proc


def stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 5.0) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Never raises."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def log_tail(log: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' if unreadable)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_redis(port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start a throw-away redis-server on 127.0.0.1:``port`` and wait until it answers PING.

    Persistence is off. The pub/sub output-buffer limit is lifted so that a hub that
    falls behind shows it as latency, instead of being disconnected by Redis half-way
    through a step (which would make later steps meaningless).
    """
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    argv = [
        exe,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "no",
        "--client-output-buffer-limit", "pubsub 0 0 0",
        "--loglevel", "warning",
    ]  # fmt: skip
    proc = spawn(argv, log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcError(f"redis-server exited ({proc.returncode}):\n{log_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return proc
        time.sleep(0.05)
    stop(proc)
    raise ProcError(f"redis-server not answering on port {port} after 10 s")


def http_get(host: str, port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """``GET path`` over a fresh connection: ``(status, body)``; raises OSError."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(
    proc: subprocess.Popen[bytes], host: str, port: int, log: Path, timeout_s: float = 30.0
) -> float:
    """Poll ``GET /ready`` until 200; return the seconds it took.

    Raises :class:`ProcError` (with the log's tail) if the process exits or the
    deadline passes first.
    """
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise ProcError(f"hub exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            status, _ = http_get(host, port, "/ready", 2)
            if status == 200:
                return time.monotonic() - start
            last = f"HTTP {status}"
        except OSError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise ProcError(f"hub not ready after {timeout_s:.0f} s ({last}):\n{log_tail(log)}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, parents first (a hub with workers is a group:
    ``smapws serve`` with ``SMAPWS_WORKERS`` > 1 is a supervisor and N children)."""
    tree = [pid]
    for parent in tree:  # grows as children are found
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children", "rb") as f:
                    tree.extend(int(child) for child in f.read().split())
    return tree


def cpu_busy_seconds(cpu: int) -> tuple[float, float]:
    """``(user + nice + system, steal)`` seconds CPU ``cpu`` has spent so far (/proc/stat).

    Interrupt and softirq time are left out: the kernel does not charge them to any
    process, so they cannot be compared with per-process CPU.
    """
    with open("/proc/stat", "rb") as f:
        for line in f:
            fields = line.split()
            if fields[0] == f"cpu{cpu}".encode():
                user, nice, system = (int(x) for x in fields[1:4])
                steal = int(fields[8]) if len(fields) > 8 else 0
                return (user + nice + system) / _CLK_TCK, steal / _CLK_TCK
    raise OSError(f"cpu{cpu} not in /proc/stat")


class CpuMeter:
    """CPU used by a set of processes between :meth:`mark` calls (dead pids count 0)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._last = self._read()

    def _read(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def mark(self) -> float:
        """CPU seconds used since the previous mark (or construction)."""
        now = self._read()
        used, self._last = now - self._last, now
        return used


@contextlib.contextmanager
def pinned_self(cpus: set[int] | None) -> Iterator[None]:
    """Run the block with this process (and the children it starts) on ``cpus``."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


#: The JWT secret of the hubs :func:`hub_on_redis` starts.
BENCH_SECRET = "bench-secret-" + "x" * 32


def metric_value(port: int, name: str) -> float:
    """The value of the unlabelled series ``name`` in the hub's ``/metrics`` (0 if absent)."""
    _, body = http_get("127.0.0.1", port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@contextlib.contextmanager
def hub_on_redis(
    workdir: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[int, int, subprocess.Popen[bytes]]]:
    """A throw-away redis-server (:func:`start_redis`) and one ``smapws serve``
    on it (``SMAPWS_LOG_LEVEL=warning`` and ``env`` over the defaults), ready:
    ``(redis port, hub port, hub process)``; both stopped on exit."""
    redis_port, hub_port = free_port(), free_port()
    redis_proc = start_redis(redis_port, workdir / "redis.log")
    full_env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "JWT_SECRET": BENCH_SECRET,
        "SMAPWS_HOST": "127.0.0.1",
        "SMAPWS_PORT": str(hub_port),
        "SMAPWS_LOG_LEVEL": "warning",
        **(env or {}),
    }
    hub = spawn([sys.executable, "-m", "smapws", "serve"], workdir / "hub.log", env=full_env)
    try:
        wait_ready(hub, "127.0.0.1", hub_port, workdir / "hub.log")
        yield redis_port, hub_port, hub
    finally:
        stop(hub)
        stop(redis_proc)
