"""Run Autobahn|Testsuite's fuzzingclient against smapws's WebSocket layer.

    .venv/bin/python -m tests.autobahn.run [--cases 1.* 2.*] [--exclude 9.*] [--out DIR]

1. Installs autobahntestsuite (Python 2.7 only; every package pinned in
   ``requirements*.txt`` and ``build-constraints.txt``, 89 MB, 2-3 minutes
   the first time) into a virtualenv under the cache directory,
   ``$SMAPWS_AUTOBAHN_CACHE`` (default ``~/.cache/smapws-autobahn``), once per
   version of the pins. Python 2.7 is ``$SMAPWS_PYTHON2``, else
   ``python2.7`` on PATH, else pyenv's (``~/.pyenv/versions/2.7*``).
2. Starts the echo endpoint (:mod:`tests.autobahn.echo_server`) on a free
   port in this process and runs ``wstest -m fuzzingclient`` against it.
3. Reads the suite's JSON report (``<out>/reports/index.json``; the HTML
   report is beside it), prints the count of each behaviour and every case
   that is not OK, and exits 1 when a case failed (see :attr:`Result.failed`).

All cases run by default, 12.* and 13.* (permessage-deflate) included: the
endpoint, like the hub, negotiates no extension, so those report
UNIMPLEMENTED.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from tests.autobahn import echo_server

HERE: Final = Path(__file__).resolve().parent
REQUIREMENTS: Final = HERE / "requirements.txt"
VIRTUALENV_REQUIREMENTS: Final = HERE / "requirements-virtualenv.txt"
BUILD_CONSTRAINTS: Final = HERE / "build-constraints.txt"
AGENT: Final = "smapws"

#: What a case may end with and still pass: Autobahn's own outcomes short of
#: a failure (NON-STRICT misses a SHOULD; INFORMATIONAL records behaviour the
#: RFC leaves open; UNIMPLEMENTED is an extension not negotiated).
PASSING: Final = frozenset({"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"})
#: Closing behaviours that the suite's own report marks as failed.
FAILED_CLOSE: Final = frozenset({"FAILED", "UNCLEAN"})


class InstallError(Exception):
    """The suite could not be installed; the message says why."""


def find_python2() -> str:
    """A Python 2.7 interpreter; raises :class:`InstallError` if none."""
    candidates = []
    if os.environ.get("SMAPWS_PYTHON2"):
        candidates.append(os.environ["SMAPWS_PYTHON2"])
    on_path = shutil.which("python2.7")
    if on_path:
        candidates.append(on_path)
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates += sorted((str(p) for p in pyenv.glob("versions/2.7*/bin/python2.7")), reverse=True)
    for python in candidates:
        try:
            out = subprocess.run(
                [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "2.7":
            return python
    tried = ", ".join(candidates) or "none"
    raise InstallError(f"no Python 2.7 found (tried: {tried}); set SMAPWS_PYTHON2")


def cache_root() -> Path:
    if os.environ.get("SMAPWS_AUTOBAHN_CACHE"):
        return Path(os.environ["SMAPWS_AUTOBAHN_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "smapws-autobahn"


def install(cache: Path | None = None) -> Path:
    """The suite's Python (a Python 2.7 virtualenv with autobahntestsuite),
    installed first unless a finished install of the same pins is there.
    Raises :class:`InstallError` with the end of the install log."""
    pins = b"".join(
        p.read_bytes() for p in (REQUIREMENTS, VIRTUALENV_REQUIREMENTS, BUILD_CONSTRAINTS)
    )
    name = "py27-" + hashlib.sha256(pins).hexdigest()[:12]
    root = cache or cache_root()
    home = root / name
    python = home / "venv" / "bin" / "python"
    done = home / "installed"
    root.mkdir(parents=True, exist_ok=True)
    # Two runs at once (a developer and a test) install once.
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir()
        python2 = find_python2()
        tool = home / "virtualenv"
        env = {
            **os.environ,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_PYTHON_VERSION_WARNING": "1",
            "PYTHONWARNINGS": "ignore",
        }
        steps = [
            ([python2, "-m", "pip", "install", "--target", str(tool),
              "-r", str(VIRTUALENV_REQUIREMENTS)], env),
            ([python2, "-m", "virtualenv", "--no-periodic-update", str(home / "venv")],
             {**env, "PYTHONPATH": str(tool)}),
            ([str(python), "-m", "pip", "install", "-r", str(REQUIREMENTS)],
             {**env, "PIP_CONSTRAINT": str(BUILD_CONSTRAINTS)}),
        ]  # fmt: skip
        log_path = home / "install.log"
        with open(log_path, "wb") as log:
            for argv, step_env in steps:
                log.write(f"$ {' '.join(argv)}\n".encode())
                log.flush()
                began = time.monotonic()
                code = subprocess.run(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=step_env, check=False
                ).returncode
                log.write(f"# exit {code} after {time.monotonic() - began:.1f} s\n".encode())
                if code != 0:
                    tail = log_path.read_text(errors="replace").splitlines()[-25:]
                    raise InstallError(
                        f"{argv[0]} {' '.join(argv[1:3])} exited {code}; end of {log_path}:\n"
                        + "\n".join(tail)
                    )
        done.write_text(python2 + "\n")
    return python


@dataclass
class Result:
    """The fuzzingclient's report for the echo endpoint."""

    reports: Path
    cases: dict[str, dict[str, Any]]  # case id -> its entry in index.json

    def behaviours(self) -> Counter[str]:
        return Counter(c["behavior"] for c in self.cases.values())

    def close_behaviours(self) -> Counter[str]:
        return Counter(c["behaviorClose"] for c in self.cases.values())

    def failed(self) -> list[str]:
        """Cases whose behaviour is a failure (FAILED, or anything else not in
        :data:`PASSING`), or whose closing behaviour the report marks failed
        (FAILED, UNCLEAN) though the case ran."""
        return sorted(
            (
                case_id
                for case_id, c in self.cases.items()
                if c["behavior"] not in PASSING
                or (c["behavior"] != "UNIMPLEMENTED" and c["behaviorClose"] in FAILED_CLOSE)
            ),
            key=case_key,
        )

    def detail(self, case_id: str) -> dict[str, Any]:
        """The case's own report: description, expectation, result."""
        detail: dict[str, Any] = json.loads(
            (self.reports / self.cases[case_id]["reportfile"]).read_text()
        )
        return detail


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case_id.split("."))


async def run_suite(
    python: Path,
    out: Path,
    *,
    cases: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    timeout: float = 1800,
) -> Result:
    """Run the fuzzingclient (``python`` from :func:`install`) against an echo
    endpoint served in this process; its spec, log and reports go to ``out``.
    Raises ``RuntimeError`` when wstest fails or writes no report,
    ``trio.TooSlowError`` past ``timeout`` seconds (the run is killed)."""
    reports = out / "reports"
    log_path = out / "wstest.log"
    # Local files, before and after the run: blocking is fine here.
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    shutil.rmtree(reports, ignore_errors=True)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(echo_server.serve)
        spec = {
            "outdir": str(reports),
            "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{port}/"}],
            "cases": list(cases),
            "exclude-cases": list(exclude),
            "exclude-agent-cases": {},
        }
        spec_path = out / "fuzzingclient.json"
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        argv = [str(python), "-m", "autobahntestsuite.wstest", "-m", "fuzzingclient"]
        with open(log_path, "wb") as log, trio.fail_after(timeout):  # noqa: ASYNC230
            proc = await trio.run_process(
                [*argv, "-s", str(spec_path)],
                cwd=out,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        nursery.cancel_scope.cancel()
    index = reports / "index.json"
    if proc.returncode != 0 or not index.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"wstest exited {proc.returncode}; end of {log_path}:\n{tail}")
    return Result(reports, json.loads(index.read_text())[AGENT])


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counter.items()))


def report(result: Result) -> str:
    """A summary for people: counts, then every case that is not OK."""
    lines = [
        f"{len(result.cases)} cases",
        f"behaviour: {_counts(result.behaviours())}",
        f"closing behaviour: {_counts(result.close_behaviours())}",
    ]
    unimplemented = Counter(
        i.split(".")[0] + ".*" for i, c in result.cases.items() if c["behavior"] == "UNIMPLEMENTED"
    )
    if unimplemented:
        lines.append(f"UNIMPLEMENTED by group: {_counts(unimplemented)}")
    failed = set(result.failed())
    for case_id in sorted(result.cases, key=case_key):
        c = result.cases[case_id]
        if c["behavior"] in ("OK", "UNIMPLEMENTED") and case_id not in failed:
            continue
        d = result.detail(case_id)
        mark = "FAILED" if case_id in failed else c["behavior"]
        lines.append(
            f"{mark} {case_id} (close {c['behaviorClose']}, code {c['remoteCloseCode']}): "
            f"{d.get('description', '')!s:.120} -> {d.get('result', '')!s:.160}"
            f"; {d.get('resultClose', '')}"
        )
    lines.append(f"failed: {len(failed)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run Autobahn|Testsuite's fuzzingclient against smapws's WebSocket layer."
    )
    parser.add_argument("--cases", nargs="+", default=["*"], help="case patterns (default: all)")
    parser.add_argument("--exclude", nargs="*", default=[], help="case patterns to skip")
    parser.add_argument("--out", type=Path, default=Path("build/autobahn"), help="report folder")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the run")
    args = parser.parse_args(argv)

    start = time.monotonic()
    try:
        python = install()
    except InstallError as exc:
        print(f"autobahn: cannot install the suite: {exc}", file=sys.stderr)
        return 2
    installed = time.monotonic()
    result = trio.run(
        lambda: run_suite(
            python, args.out.resolve(), cases=args.cases, exclude=args.exclude,
            timeout=args.timeout,
        )
    )  # fmt: skip
    ran = time.monotonic()
    print(report(result))
    print(
        f"install {installed - start:.0f} s, run {ran - installed:.0f} s; "
        f"HTML report: {args.out / 'reports' / 'index.html'}"
    )
    return 1 if result.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
