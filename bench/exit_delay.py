"""How long ``smapws serve`` takes to exit after a signal, and after it logs
``drained`` (issue 19 reported ~1.9 s after ``drained`` with no connection).

Each run starts a real ``smapws serve`` process (the in-process broker, or
Redis with ``--redis-url``), makes it serve a health check, a WebSocket tab
that comes and goes and a publish, sends SIGTERM and times the exit::

    .venv/bin/python -m bench.exit_delay [--runs 5] [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
API_KEY = "bench-api-key-0123456789"


def one_run(redis_url: str | None) -> tuple[float, float]:
    """``(signal -> exit, drained -> exit)`` in seconds, for one process."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "JWT_SECRET": SECRET,
        "SMAPWS_API_KEY": API_KEY,
        "SMAPWS_HOST": "127.0.0.1",
        "SMAPWS_PORT": "0",
    }
    if redis_url:
        env["REDIS_URL"] = redis_url
    cmd = [sys.executable, "-m", "smapws", "serve"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        return _timed(proc, env)
    finally:
        if proc.poll() is None:  # a failed run leaves no hub behind
            proc.kill()
            proc.wait()


def _timed(proc: subprocess.Popen[str], env: dict[str, str]) -> tuple[float, float]:
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        found = re.search(r"msg=listening .*port=(\d+)", line)
        if found:
            port = int(found.group(1))
            break
    base = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(base + "/health", timeout=5).read()
    from websockets.sync.client import connect

    from smapws._core.auth import mint

    with connect(f"ws://127.0.0.1:{port}/ws?token={mint('u1', key=SECRET, now=time.time())}"):
        pass
    publish = [sys.executable, "-m", "smapws", "publish", "--user", "u1", "--type", "n"]
    subprocess.run([*publish, "--url", base], env=env, check=True, capture_output=True)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    drained = signalled
    for line in proc.stderr:
        if "msg=drained" in line:
            drained = time.monotonic()
    proc.wait(timeout=60)
    exited = time.monotonic()
    return exited - signalled, exited - drained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    runs = [one_run(args.redis_url) for _ in range(args.runs)]
    for name, values in (
        ("signal -> exit", [r[0] for r in runs]),
        ("drained -> exit", [r[1] for r in runs]),
    ):
        print(
            f"{name:16} median {statistics.median(values) * 1000:.0f} ms, "
            f"max {max(values) * 1000:.0f} ms ({args.runs} runs)"
        )


if __name__ == "__main__":
    main()
