"""Deployments run for real: the image built from ``Containerfile`` and run by
podman, and ``systemd/smapws.service`` run by a real systemd (PID 1 of a
container), both against the session's redis-server.

No registry image can be pulled here, so the bases are made on the machine: a
Debian from ``debootstrap --variant=minbase`` with only ``python3``,
``python3-venv`` and ``ca-certificates``, imported into podman, and for the
unit that one with ``systemd``, ``systemd-sysv`` and ``dbus`` added by
apt-get (seconds, where a second debootstrap takes minutes). Each is built
once and cached by a tag that carries a hash of its recipe (``podman image
exists`` skips the build). The image under test is built anew each run, with
no layer cache, so its build time is a real one.

Containers run on ``--network host`` with ``CONTAINERS_CONF`` pointing at
``tests/containers.conf`` (runc, cgroupfs, the caller's rlimits). pip inside a
build or a container gets this machine's settings: its CA bundle, a pip.conf
made from ``pip config list`` and the local paths it names (find-links,
file:// indexes, constraints), mounted read-only at the same places.

Marked ``deploy``: ``pytest -m deploy`` runs only these (about two minutes
once the bases exist; making them takes a few more), ``-m "not deploy"``
leaves them out. They need root, podman, runc and debootstrap: ``bash
.ci/run`` installs them. The figures (image size, build time, time from
``systemctl start`` to ready) are printed at the end of the run, on a line
starting with ``DEPLOY``.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import (
    SECRET,
    RedisServer,
    close_code,
    connect,
    figures,
    free_port,
    http,
    receive_json,
    wait_port_ready,
)

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SUITE = "bookworm"
PYTHON_PACKAGES = ("python3", "python3-venv", "ca-certificates")
SYSTEMD_PACKAGES = ("systemd", "systemd-sysv", "dbus")
#: Two test sessions on one machine must not make the same base at once.
BASE_LOCK = Path("/var/tmp/smapws-test-base-images.lock")
#: systemd's range for DynamicUser= (systemd.exec(5)).
DYNAMIC_UIDS = range(61184, 65520)
IMAGE_UID = 10001


# -- podman ------------------------------------------------------------------------------------


def podman(
    *args: str, check: bool = True, timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``podman ARGS`` with the tests' containers.conf; output captured.
    Raises AssertionError with podman's stderr when it fails and ``check``."""
    binary = shutil.which("podman")
    assert binary is not None, "podman is not installed (bash .ci/run installs it)"
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    feed: dict[str, Any] = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    done = subprocess.run(
        [binary, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **feed,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return done


async def apodman(*args: str, check: bool = True, timeout: float = 120) -> str:
    """:func:`podman` in a thread, so the test's trio tasks go on meanwhile."""
    run = partial(podman, *args, check=check, timeout=timeout)
    done = await trio.to_thread.run_sync(run)
    return done.stdout


def inspect(name: str, template: str) -> str:
    return podman("inspect", "--format", template, name).stdout.strip()


def container_exit(name: str) -> int | None:
    """The container's exit code, or None while it runs."""
    running, code = inspect(name, "{{.State.Running}} {{.State.ExitCode}}").split()
    return None if running == "true" else int(code)


@pytest.fixture(scope="module")
def podman_ready() -> None:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(
            f"the deploy tests need root and {', '.join(missing) or 'podman'}: run bash .ci/run "
            "(it installs them), or leave these tests out with -m 'not deploy'"
        )


# -- pip's settings, passed through --------------------------------------------------------------


def _local_paths(value: str) -> Iterator[Path]:
    """The local paths a pip setting names. A file:// index (``.../simple``)
    links to its files by relative paths: its parent directory is given."""
    for word in value.split():
        if word.startswith("file://"):
            path = Path(urllib.parse.unquote(urllib.parse.urlparse(word).path))
            yield path.parent if path.name == "simple" else path
        elif word.startswith("/"):
            yield Path(word)


def pip_settings() -> dict[str, dict[str, str]]:
    """This machine's pip settings as {section: {key: value}}: what ``pip
    config list`` shows from every configuration file and ``PIP_*`` variable,
    the variables winning (as they do for pip)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files: dict[str, dict[str, str]] = {}
    variables: dict[str, str] = {}
    for line in listing.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        section, _, name = key.rpartition(".")
        value = str(ast.literal_eval(raw))
        if section == ":env:":
            variables[name] = value
        else:
            files.setdefault(section, {})[name] = value
    files.setdefault("global", {}).update(variables)
    return files


@pytest.fixture(scope="module")
def pip_mounts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``podman -v`` arguments giving pip in a build or a container this
    machine's settings: the CA bundle (pip reaches the index only with it),
    the pip configuration as /etc/pip.conf, and every local path it names."""
    settings = pip_settings()
    conf = tmp_path_factory.mktemp("pip") / "pip.conf"
    conf.write_text(
        "".join(
            f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
            for section, values in settings.items()
        )
    )
    paths = {CA_BUNDLE} if CA_BUNDLE.exists() else set()
    for values in settings.values():
        for value in values.values():
            paths.update(p for p in _local_paths(value) if p.exists())
    mounts = ["-v", f"{conf}:/etc/pip.conf:ro"]
    for path in sorted(paths):
        if not any(parent in paths for parent in path.parents):
            mounts += ["-v", f"{path}:{path}:ro"]
    return mounts


# -- the local bases -----------------------------------------------------------------------------


def _tag(name: str, recipe: str) -> str:
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return f"localhost/smapws-test/{name}:{SUITE}-{digest}"


@contextlib.contextmanager
def _base_lock() -> Iterator[None]:
    with BASE_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _debootstrap_command(root: Path) -> list[str]:
    includes = ",".join(PYTHON_PACKAGES)
    return ["debootstrap", "--variant=minbase", f"--include={includes}", SUITE, str(root)]


@pytest.fixture(scope="module")
def python_base(podman_ready: None, request: pytest.FixtureRequest) -> str:
    """A Debian with ``python3`` only (no ``python``, no pip outside venvs):
    the kind of base the Containerfile must build on."""
    tag = _tag("debian-python3", " ".join(_debootstrap_command(Path("ROOT"))))
    with _base_lock():
        if podman("image", "exists", tag, check=False).returncode == 0:
            return tag
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="smapws-debootstrap-", dir="/var/tmp") as d:
            root, log = Path(d) / "root", Path(d) / "debootstrap.log"
            with log.open("w") as out:
                done = subprocess.run(
                    _debootstrap_command(root), stdout=out, stderr=subprocess.STDOUT, timeout=1200
                )
            assert done.returncode == 0, log.read_text()[-3000:]
            tarball = Path(d) / "root.tar"
            subprocess.run(["tar", "-C", str(root), "-cf", str(tarball), "."], check=True)
            podman("import", str(tarball), tag, timeout=600)
        figures(request.config)["python_base_made_s"] = f"{time.monotonic() - start:.0f}"
    return tag


@pytest.fixture(scope="module")
def systemd_base(
    python_base: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> str:
    """The same Debian with systemd as /sbin/init, dbus, and nothing of the project."""
    packages = " ".join(SYSTEMD_PACKAGES)
    recipe = (
        f"FROM {python_base}\n"
        "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
        f" --no-install-recommends {packages} && apt-get clean && rm -rf /var/lib/apt/lists/*\n"
    )
    tag = _tag("debian-systemd", recipe)
    with _base_lock():
        if podman("image", "exists", tag, check=False).returncode == 0:
            return tag
        start = time.monotonic()
        context = tmp_path_factory.mktemp("systemd-base")
        (context / "Containerfile").write_text(recipe)
        podman("build", "--network", "host", "--pull=never", "--layers=false",
               "-t", tag, str(context), timeout=900)  # fmt: skip
        figures(request.config)["systemd_base_made_s"] = f"{time.monotonic() - start:.0f}"
    return tag


# -- the container image -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(python_base: str, pip_mounts: list[str], request: pytest.FixtureRequest) -> Iterator[str]:
    """The image built from the repository's Containerfile on the local base,
    from scratch (no layer cache); removed afterwards."""
    tag = f"localhost/smapws-test/smapws:{os.getpid()}"
    start = time.monotonic()
    podman(
        "build", "--network", "host", "--pull=never", "--layers=false", "--format", "docker",
        "--build-arg", f"PYTHON_IMAGE={python_base}", *pip_mounts,
        "-t", tag, "-f", str(ROOT / "Containerfile"), str(ROOT),
        timeout=900,
    )  # fmt: skip
    build_s = time.monotonic() - start
    size = int(inspect(tag, "{{.Size}}"))
    base_size = int(inspect(python_base, "{{.Size}}"))
    record = figures(request.config)
    record["image_size_mb"] = f"{size / 1e6:.0f}"
    record["base_size_mb"] = f"{base_size / 1e6:.0f}"
    record["build_s"] = f"{build_s:.1f}"
    try:
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


def test_the_image_is_the_containerfile_on_a_python3_only_base(
    image: str, python_base: str, pip_mounts: list[str]
) -> None:
    config = json.loads(inspect(image, "{{json .Config}}"))
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["smapws"] and config["Cmd"] == ["serve"]
    assert "8081/tcp" in config["ExposedPorts"]
    assert config["StopSignal"] == "SIGTERM"
    health = json.loads(inspect(image, "{{json .HealthCheck}}"))
    assert health["Test"][:2] == ["CMD", "python3"], "HEALTHCHECK kept (--format docker)"
    # The base really has no `python`: the Containerfile used `python3`.
    no_python = podman("run", "--rm", "--network", "host", "--entrypoint", "sh", python_base,
                       "-c", "command -v python || echo none")  # fmt: skip
    assert no_python.stdout.strip() == "none"
    # Nothing the build mounted for pip stayed in the image.
    probe = "import os, sys; print([p for p in sys.argv[1:] if os.path.lexists(p)])"
    mounted = [m.split(":")[1] for m in pip_mounts[1::2] if m.split(":")[1] != str(CA_BUNDLE)]
    assert "/etc/pip.conf" in mounted
    left = podman("run", "--rm", "--network", "host", "--entrypoint", "python3", image,
                  "-c", probe, *mounted)  # fmt: skip
    assert left.stdout.strip() == "[]"


async def test_the_container_delivers_and_drains_on_podman_stop(
    image: str, redis_server: RedisServer
) -> None:
    """The image against a real Redis: non-root, /ready 200, a cookie tab gets
    a PUBLISHed message, the HEALTHCHECK passes (and fails on a frozen hub),
    ``podman stop`` closes the tab with 1001 and the container exits 0."""
    port = free_port()
    name = f"smapws-test-{os.getpid()}-{port}"
    await apodman(
        "run", "--detach", "--name", name, "--network", "host",
        "-e", f"JWT_SECRET={SECRET}", "-e", f"REDIS_URL={redis_server.url}",
        "-e", "SMAPWS_HOST=127.0.0.1", "-e", f"SMAPWS_PORT={port}",
        image,
    )  # fmt: skip
    try:
        await wait_port_ready(port, 60, exited=lambda: container_exit(name))
        pid = int(inspect(name, "{{.State.Pid}}"))
        status = await trio.Path(f"/proc/{pid}/status").read_text()
        uids = status.split("Uid:")[1].split("\n")[0]
        assert uids.split() == [str(IMAGE_UID)] * 4, "the hub runs as the image's USER"

        podman("healthcheck", "run", name)
        await apodman("kill", "--signal", "SIGSTOP", name)
        frozen = podman("healthcheck", "run", name, check=False)
        await apodman("kill", "--signal", "SIGCONT", name)
        assert frozen.returncode != 0, "the HEALTHCHECK passed on a frozen hub"
        assert frozen.stdout.strip() == "unhealthy", frozen.stderr
        assert podman("healthcheck", "run", name, check=False).returncode == 0

        async with connect(port, "deploy-user") as ws:
            message = {"type": "notification", "payload": {"id": "n1", "text": "from a container"}}
            with trio.fail_after(10):
                while redis_server.publish("deploy-user", message) < 1:
                    await trio.sleep(0.05)
            received = await receive_json(ws)
            assert received["type"] == "notification" and received["payload"] == message["payload"]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(apodman, "stop", "--time", "50", name, timeout=70))
                assert await close_code(ws, timeout=60) == 1001
        assert container_exit(name) == 0
        logs = podman("logs", name)
        lines = [json.loads(line) for line in (logs.stdout + logs.stderr).splitlines() if line]
        assert {"listening", "draining", "drained"} <= {line.get("msg") for line in lines}
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


# -- systemd -----------------------------------------------------------------------------------


@dataclass
class Machine:
    """A container whose PID 1 is systemd, the project installed as the
    README's "With systemd" says."""

    name: str

    def sh(self, script: str, *, check: bool = True, stdin: str | None = None) -> str:
        args = ["exec", "-i", self.name, "sh", "-c", script]
        return podman(*args, check=check, stdin=stdin, timeout=180).stdout

    def systemctl(self, *args: str, check: bool = True) -> str:
        done = podman("exec", self.name, "systemctl", *args, check=check, timeout=180)
        return done.stdout

    def show(self, *props: str) -> dict[str, str]:
        out = self.systemctl("show", "smapws", "--property=" + ",".join(props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def configure(self, port: int, redis_port: int) -> None:
        """/etc/smapws/smapws.env from the example, then edited (appended)."""
        settings = (
            f"JWT_SECRET={SECRET}\nSMAPWS_HOST=127.0.0.1\n"
            f"SMAPWS_PORT={port}\nREDIS_PORT={redis_port}\n"
        )
        self.sh(
            "install -D -m 0600 /src/systemd/smapws.env.example /etc/smapws/smapws.env"
            " && cat >> /etc/smapws/smapws.env",
            stdin=settings,
        )

    def cursor(self) -> str:
        out = self.sh("journalctl --quiet --lines=0 --show-cursor")
        return out.strip().removeprefix("-- cursor: ")

    def journal(self, after: str) -> str:
        return self.sh(f"journalctl --quiet --no-pager -o cat -u smapws --after-cursor='{after}'")

    def proc_status(self, pid: str) -> dict[str, str]:
        out = self.sh(f"cat /proc/{pid}/status")
        return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


@pytest.fixture(scope="module")
def machine(systemd_base: str, pip_mounts: list[str]) -> Iterator[Machine]:
    name = f"smapws-systemd-{os.getpid()}"
    source = [
        arg
        for item in ("pyproject.toml", "README.rst", "smapws", "publisher", "systemd")
        for arg in ("-v", f"{ROOT / item}:/src/{item}:ro")
    ]
    podman("run", "--detach", "--name", name, "--network", "host", "--systemd=always",
           *pip_mounts, *source, systemd_base, "/sbin/init")  # fmt: skip
    machine = Machine(name)
    try:
        # Until systemd's bus is up, systemctl cannot even ask; then --wait
        # waits for the boot to finish.
        deadline = time.monotonic() + 60
        while True:
            state = podman("exec", name, "systemctl", "is-system-running", "--wait", check=False)
            if state.stdout.strip() or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert state.stdout.strip() in ("running", "degraded"), state.stdout + state.stderr
        # The README's steps (pip builds in the source tree: a copy of it).
        machine.sh(
            "cp -r /src /usr/local/src/smapws"
            " && python3 -m venv /opt/smapws/venv"
            " && /opt/smapws/venv/bin/pip install --quiet /usr/local/src/smapws"
            " && install -D -m 0644 /src/systemd/smapws.service"
            " /etc/systemd/system/smapws.service"
            " && install -D -m 0600 /src/systemd/smapws.env.example /etc/smapws/smapws.env"
            " && systemctl daemon-reload && systemctl enable smapws"
        )
        yield machine
    finally:
        # systemd would shut down in order; a throwaway machine need not.
        podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture
def unit(machine: Machine, redis_server: RedisServer) -> Iterator[int]:
    """The unit configured for the session's Redis, stopped and with no
    failure recorded; stopped again afterwards. Yields the hub's port."""
    machine.systemctl("stop", "smapws")
    machine.systemctl("reset-failed", "smapws", check=False)
    port = free_port()
    machine.configure(port, redis_server.port)
    try:
        yield port
    finally:
        machine.systemctl("stop", "smapws", check=False)
        machine.sh("rm -rf /etc/systemd/system/smapws.service.d && systemctl daemon-reload")


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout) as waited:
        while not await trio.to_thread.run_sync(predicate):
            await trio.sleep(0.2)
    assert not waited.cancelled_caught, f"not within {timeout}s: {what}"


async def test_systemctl_start_returns_once_the_hub_is_ready(
    machine: Machine, unit: int, tmp_path: Path
) -> None:
    """Type=notify: with Redis absent the unit stays activating (status line
    saying why, /health 200, /ready 503) and ``systemctl start`` waits; it
    returns when the subscription is up, /ready 200 at that moment."""
    port = unit
    redis = RedisServer(free_port(), tmp_path)
    machine.configure(port, redis.port)
    machine.systemctl("start", "--no-block", "smapws")

    def waiting() -> bool:
        shown = machine.show("ActiveState", "StatusText")
        return shown["ActiveState"] == "activating" and "redis" in shown["StatusText"]

    await _until(waiting, 30, "activating, waiting for Redis")
    assert (await http(port, "GET", "/health")).status == 200
    assert (await http(port, "GET", "/ready")).status == 503

    returned = trio.Event()

    async def start() -> None:
        await trio.to_thread.run_sync(partial(machine.systemctl, "start", "smapws"))
        returned.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            with trio.move_on_after(2):
                await returned.wait()
            assert not returned.is_set(), "systemctl start returned while Redis was absent"
            redis.start()
            with trio.fail_after(60):
                await returned.wait()
            # No polling: ready the moment start returns.
            assert (await http(port, "GET", "/ready")).status == 200
    finally:
        machine.systemctl("stop", "smapws", check=False)
        redis.kill()
    shown = machine.show("Result", "ExecMainStatus")
    assert shown == {"Result": "success", "ExecMainStatus": "0"}


async def test_unit_status_user_and_start_time(
    machine: Machine, unit: int, request: pytest.FixtureRequest
) -> None:
    """With Redis up: the status line, a dynamic non-root user, the hub's
    process sandboxed (no capability, no new privileges, seccomp on); the
    time from ``systemctl start`` to ready is recorded."""
    port = unit
    start = time.monotonic()
    machine.systemctl("start", "smapws")
    wall_s = time.monotonic() - start
    assert (await http(port, "GET", "/ready")).status == 200

    shown = machine.show(
        "ActiveState", "StatusText", "MainPID", "User", "DynamicUser",
        "InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic",
    )  # fmt: skip
    assert shown["ActiveState"] == "active"
    assert shown["StatusText"].startswith(
        f"ready on port {port}, redis subscriber connected; 0 connections"
    )
    assert f'Status: "ready on port {port}' in machine.systemctl(
        "status", "smapws", "--no-pager", check=False
    )
    status = machine.proc_status(shown["MainPID"])
    uid = int(status["Uid"].split()[0])
    assert shown["DynamicUser"] == "yes" and uid in DYNAMIC_UIDS, status["Uid"]
    assert f":{uid}:" not in machine.sh("cat /etc/passwd"), "a static user"
    assert status["Uid"].split() == [str(uid)] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2", "SystemCallFilter= is not in effect"
    ready_s = (
        int(shown["ActiveEnterTimestampMonotonic"]) - int(shown["InactiveExitTimestampMonotonic"])
    ) / 1e6
    record = figures(request.config)
    record["systemd_start_to_ready_s"] = f"{ready_s:.2f}"
    record["systemctl_start_wall_s"] = f"{wall_s:.2f}"


#: Run by ExecStartPre= under the unit's own sandbox: tries to create a file
#: in each directory given and prints one JSON line with what happened.
SANDBOX_PROBE = """
import errno, json, os, sys
outcome = {}
for directory in sys.argv[1:]:
    path = os.path.join(directory, f"probe-{os.getpid()}")
    try:
        with open(path, "x") as f:
            f.write("x")
        outcome[directory] = "written"
    except OSError as exc:
        outcome[directory] = errno.errorcode.get(exc.errno, str(exc.errno))
print("SANDBOX-PROBE " + json.dumps({"uid": os.getuid(), "writes": outcome}), flush=True)
"""
#: World-writable outside the sandbox, so that only the sandbox can refuse.
OPEN_DIRS = ("/srv/open", "/home/open", "/var/lib/open")
SYSTEM_DIRS = ("/etc/smapws", "/opt/smapws/venv", "/usr/local/src", "/run", "/root")
PRIVATE_DIRS = ("/tmp", "/var/tmp")


async def test_the_sandbox_keeps_the_hub_from_writing(machine: Machine, unit: int) -> None:
    """Under the unit's sandbox (an ExecStartPre= drop-in, the way
    ``systemctl edit`` adds one), every directory but a private /tmp is
    read-only or hidden, even those any user may write to outside it."""
    dirs = (*OPEN_DIRS, *SYSTEM_DIRS, *PRIVATE_DIRS)
    machine.sh(
        f"mkdir -p {' '.join(OPEN_DIRS)} && chmod 1777 {' '.join(OPEN_DIRS)}"
        " && cat > /usr/local/lib/sandbox-probe.py",
        stdin=SANDBOX_PROBE,
    )
    machine.sh(
        "mkdir -p /etc/systemd/system/smapws.service.d"
        " && cat > /etc/systemd/system/smapws.service.d/probe.conf && systemctl daemon-reload",
        stdin="[Service]\nExecStartPre=/opt/smapws/venv/bin/python3 "
        f"/usr/local/lib/sandbox-probe.py {' '.join(dirs)}\n",
    )
    # Outside the sandbox, an unprivileged user may write to the open ones.
    outside = machine.sh(
        "setpriv --reuid=65534 --regid=65534 --clear-groups "
        f"python3 /usr/local/lib/sandbox-probe.py {' '.join(OPEN_DIRS)}"
    )
    assert set(json.loads(outside.split(" ", 1)[1])["writes"].values()) == {"written"}

    cursor = machine.cursor()
    machine.systemctl("start", "smapws")
    assert (await http(unit, "GET", "/ready")).status == 200
    line = next(
        line for line in machine.journal(cursor).splitlines() if line.startswith("SANDBOX-PROBE")
    )
    probe = json.loads(line.split(" ", 1)[1])
    assert probe["uid"] in DYNAMIC_UIDS
    writes = probe["writes"]
    assert {d: writes[d] for d in PRIVATE_DIRS} == dict.fromkeys(PRIVATE_DIRS, "written")
    for d in (*OPEN_DIRS, *SYSTEM_DIRS):
        assert writes[d] in ("EROFS", "EACCES", "ENOENT", "EPERM"), (d, writes[d])
    # ProtectSystem=strict: read-only, whatever the directory's mode.
    assert writes["/srv/open"] == writes["/var/lib/open"] == "EROFS"
    # PrivateTmp=yes: what it wrote to /tmp is not in the machine's /tmp.
    assert machine.sh("ls /tmp /var/tmp").count("probe-") == 0


async def _restarted(machine: Machine, port: int, old_pid: str, restarts: int) -> None:
    def back() -> bool:
        shown = machine.show("ActiveState", "MainPID", "NRestarts")
        return (
            shown["ActiveState"] == "active"
            and shown["MainPID"] not in ("0", old_pid)
            and int(shown["NRestarts"]) == restarts + 1
        )

    await _until(back, 90, "restarted and active")
    assert (await http(port, "GET", "/ready")).status == 200


async def test_the_watchdog_restarts_a_frozen_hub(
    machine: Machine, unit: int, request: pytest.FixtureRequest
) -> None:
    """SIGSTOP freezes the hub: its WATCHDOG=1 pings stop, systemd aborts it
    after WatchdogSec= (the unit's 30 s) and Restart= starts it again."""
    machine.systemctl("start", "smapws")
    before = machine.show("MainPID", "NRestarts")
    cursor = machine.cursor()
    frozen_at = time.monotonic()
    machine.sh(f"kill -STOP {before['MainPID']}")
    await _restarted(machine, unit, before["MainPID"], int(before["NRestarts"]))
    figures(request.config)["watchdog_restart_s"] = f"{time.monotonic() - frozen_at:.1f}"
    journal = machine.journal(cursor)
    assert "Watchdog timeout" in journal, journal
    assert "Failed with result 'watchdog'" in journal, journal
    # SIGABRT with PYTHONFAULTHANDLER=1: the stuck thread's traceback.
    assert "Fatal Python error: Aborted" in journal, journal


@pytest.mark.parametrize("signal", ["KILL", "SEGV"])
async def test_restart_brings_back_a_crashed_hub(machine: Machine, unit: int, signal: str) -> None:
    machine.systemctl("start", "smapws")
    before = machine.show("MainPID", "NRestarts")
    cursor = machine.cursor()
    machine.sh(f"kill -{signal} {before['MainPID']}")
    await _restarted(machine, unit, before["MainPID"], int(before["NRestarts"]))
    journal = machine.journal(cursor)
    assert re.search(rf"Main process exited, code=(killed|dumped), status=\d+/{signal}", journal)
    assert "Scheduled restart job" in journal, journal


async def test_systemctl_stop_drains(
    machine: Machine, unit: int, redis_server: RedisServer
) -> None:
    """A cookie tab on the unit's hub gets a PUBLISHed message; ``systemctl
    stop`` closes it with 1001 and the unit ends with Result=success, exit 0."""
    port = unit
    machine.systemctl("start", "smapws")
    cursor = machine.cursor()
    async with connect(port, "unit-user") as ws:
        message = {"type": "notification", "payload": {"text": "from systemd"}}
        with trio.fail_after(10):
            while redis_server.publish("unit-user", message) < 1:
                await trio.sleep(0.05)
        assert (await receive_json(ws))["payload"] == message["payload"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(trio.to_thread.run_sync, machine.systemctl, "stop", "smapws")
            )
            assert await close_code(ws, timeout=60) == 1001
    shown = machine.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    # ExecMainCode=1: CLD_EXITED (not killed by a signal).
    assert shown == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",
        "ExecMainStatus": "0",
    }
    journal = machine.journal(cursor)
    assert "draining" in journal and "drained" in journal, journal
