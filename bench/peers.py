"""The hubs the benchmark compares, and what each needs before it can start.

``prepare(name)`` returns the command line and extra environment of one hub,
installing and building what it needs first, and only when missing:

- ``go``: Debian's ``golang-go`` and the three libraries the peer imports
  (``apt-get install``), then ``go build`` into ``bench/baselines/gohub/gohub``
  (again whenever ``main.go`` is newer than the binary). Runs with
  ``GOMAXPROCS=1``: one core, like every other hub.
- ``centrifuge``: the same toolchain, Debian's ``centrifugal/centrifuge`` 0.15
  and what it needs (:data:`CENTRIFUGE_PACKAGES`), then ``go build`` into
  ``bench/baselines/centrifugehub/centrifugehub`` (again whenever ``main.go`` is
  newer). Runs with ``GOMAXPROCS=1``; its clients speak Centrifuge's protocol
  (:data:`PROTOCOLS`).
- ``node``: ``nodejs`` (``apt-get install``) and ``npm ci`` from the committed
  ``package-lock.json`` into ``bench/baselines/nodehub/node_modules``.
- ``smapws``, ``baseline`` and ``floor`` run on the project's virtualenv.

Installing needs root (``apt-get``) and the package registries; a hub whose
preparation fails is reported as failed and the run goes on with the others.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BASELINES = BENCH_DIR / "baselines"
GOHUB_DIR = BASELINES / "gohub"
NODEHUB_DIR = BASELINES / "nodehub"
CENTRIFUGEHUB_DIR = BASELINES / "centrifugehub"

#: What the Go peer builds with: the toolchain and Debian's packaged libraries,
#: found through ``GOPATH=/usr/share/gocode`` without Go modules.
GO_PACKAGES = (
    "golang-go",
    "golang-github-gorilla-websocket-dev",
    "golang-github-gomodule-redigo-dev",
    "golang-github-golang-jwt-jwt-dev",
)
#: What the Centrifuge peer builds with besides :data:`GO_PACKAGES`: the library
#: and the packages its imports need that Debian does not pull in by itself.
CENTRIFUGE_PACKAGES = (
    *GO_PACKAGES,
    "golang-github-centrifugal-centrifuge-dev",
    "golang-github-centrifugal-protocol-dev",
    "golang-github-fzambia-eagle-dev",
    "golang-github-igm-sockjs-go-dev",
    "golang-github-mna-redisc-dev",
)
GOPATH = "/usr/share/gocode"

#: The names ``--hubs`` accepts, in the order a full run measures them.
HUBS = ("smapws", "baseline", "go", "centrifuge", "node", "floor")

#: What the load generator speaks after the upgrade to each hub not named here
#: (plain: nothing, one message per frame) or named (``centrifuge``: the connect
#: command first, newline-delimited messages in a frame).
PROTOCOLS = {"centrifuge": "centrifuge"}


def protocol(name: str) -> str:
    """The client protocol the load generator speaks to hub ``name``."""
    return PROTOCOLS.get(name, "plain")


class PeerError(Exception):
    """A hub could not be installed or built."""


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise PeerError(f"{' '.join(argv)} failed ({proc.returncode}):\n" + "\n".join(tail))


def _installed(package: str) -> bool:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and proc.stdout.endswith("installed")


_apt_updated = False


def apt_install(packages: tuple[str, ...]) -> list[str]:
    """``apt-get install`` those of ``packages`` that are missing; return them."""
    global _apt_updated
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PeerError(f"missing Debian packages (install as root): {' '.join(missing)}")
    print(f"   installing {' '.join(missing)} (apt-get)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        _run(["apt-get", "update", "-qq"], env=env)
        _apt_updated = True
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    return missing


def build_go(
    where: Path = GOHUB_DIR, packages: tuple[str, ...] = GO_PACKAGES, what: str = "the Go peer"
) -> Path:
    """The binary of the Go program in ``where`` (named after the folder),
    installing ``packages`` and building it if needed."""
    apt_install(packages)
    source = where / "main.go"
    binary = where / where.name
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    go = shutil.which("go") or "/usr/bin/go"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH}
    env.setdefault("GOCACHE", str(Path.home() / ".cache" / "go-build"))
    print(f"   building {what} (go build)", flush=True)
    _run([go, "build", "-o", str(binary), "."], cwd=where, env=env)
    return binary


def install_node() -> str:
    """``node``, with the Node peer's modules installed (``npm ci``) if needed."""
    if shutil.which("node") is None:
        apt_install(("nodejs",))
    if shutil.which("npm") is None:
        apt_install(("npm",))
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise PeerError("node or npm not found after installing nodejs")
    lock = NODEHUB_DIR / "package-lock.json"
    stamp = NODEHUB_DIR / "node_modules" / ".package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        print("   installing the Node peer's modules (npm ci)", flush=True)
        _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODEHUB_DIR)
    return node


def valid_name(name: str) -> bool:
    """Whether ``--hubs`` accepts ``name``: one of :data:`HUBS`, or
    ``smapws@REV``; either smapws may carry settings (:func:`settings_of`)."""
    try:
        base, _ = settings_of(name)
    except ValueError:
        return False
    return base in HUBS or (base.startswith("smapws@") and len(base) > len("smapws@"))


def settings_of(name: str) -> tuple[str, dict[str, str]]:
    """``(hub, settings)`` of a hub name with settings appended, each as
    ``+SMAPWS_NAME=value``: ``smapws+SMAPWS_HISTORY_TTL=0`` is smapws with its
    replay windows off, so that it does what the peers do (they keep none).
    Raises ValueError for settings of another hub than smapws, or not of
    that form."""
    base, *pairs = name.split("+")
    settings: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.startswith("SMAPWS_") or not base.startswith("smapws"):
            raise ValueError(f"bad setting {pair!r} in hub name {name!r}")
        settings[key] = value
    return base, settings


def smapws_at(rev: str, into: Path) -> Path:
    """Export the ``smapws`` package as of git revision ``rev`` into ``into``
    (for before/after comparisons of a change in one run)."""
    repo = BENCH_DIR.parent
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", rev, "smapws"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise PeerError(f"git archive {rev}: {archive.stderr.decode(errors='replace')[:300]}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def prepare(name: str, workdir: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """``(argv, extra environment)`` of hub ``name``, ready to start.

    ``smapws@REV`` is smapws as of git revision ``REV``, exported under
    ``workdir`` and run with ``cwd`` and ``PYTHONPATH`` there (the extra
    environment's ``BENCH_CWD`` names the directory to start it in).

    With settings (``smapws+SMAPWS_X=v``, :func:`settings_of`) the hub
    runs with them in its environment.

    Raises :class:`PeerError` when it cannot be installed or built.
    """
    base, settings = settings_of(name)
    if settings:
        argv, extra = prepare(base, workdir)
        return argv, {**extra, **settings}
    if name == "smapws":
        return [sys.executable, "-m", "smapws", "serve"], {}
    if name.startswith("smapws@"):
        rev = name.split("@", 1)[1]
        base = Path(workdir) if workdir is not None else Path(os.environ.get("TMPDIR", "/tmp"))
        where = smapws_at(rev, base / f"smapws-{rev.replace('/', '_')}")
        return [sys.executable, "-m", "smapws", "serve"], {
            "PYTHONPATH": str(where),
            "BENCH_CWD": str(where),
        }
    if name == "baseline":
        return [sys.executable, str(BASELINES / "asyncio_hub.py")], {}
    if name == "floor":
        return [sys.executable, str(BASELINES / "floor_hub.py")], {}
    if name == "go":
        return [str(build_go())], {"GOMAXPROCS": "1"}
    if name == "centrifuge":
        binary = build_go(CENTRIFUGEHUB_DIR, CENTRIFUGE_PACKAGES, "the Centrifuge peer")
        return [str(binary)], {"GOMAXPROCS": "1"}
    if name == "node":
        return [install_node(), str(NODEHUB_DIR / "hub.js")], {}
    raise ValueError(f"unknown hub {name!r}")
