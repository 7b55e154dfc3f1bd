"""The README's quick start, run as a user runs it: its command blocks in one
bash session, in order, from the repository root.

Changed on the way, and only this: the hub's port 8081 and Redis's 6379 become
free ports of this test (``SMAPWS_PORT`` in the environment, and the session's
own ``redis-server``), and the install
block (``python3 -m venv .venv && .venv/bin/pip install .``) is left out: it
would replace the editable install the tests run in (``tests/test_ops.py``
installs the package that way into a fresh venv of its own).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

from .conftest import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "python3 -m venv .venv && .venv/bin/pip install ."


def quick_start_blocks() -> list[str]:
    """The literal blocks between the README's quick-start markers."""
    readme = (ROOT / "README.rst").read_text()
    part = readme.split(".. quick-start-begin", 1)[1].split(".. quick-start-end", 1)[0]
    blocks = re.findall(r"::\n\n((?:    .*\n|\n)+)", part)
    return [re.sub(r"^    ", "", b, flags=re.M).strip() for b in blocks]


def test_the_quick_start_commands_run_as_written(redis_server: RedisServer) -> None:
    blocks = quick_start_blocks()
    assert blocks[0] == INSTALL
    assert len(blocks) == 4, blocks
    port = free_port()
    script = "\n".join(["set -euo pipefail", *blocks[1:]])
    script = script.replace("8081", str(port)).replace("6379", str(redis_server.port))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMAPWS_", "REDIS_", "JWT_"))}
    env["SMAPWS_PORT"] = str(port)  # the hubs' port (the commands name the default, 8081)
    # A session of its own, so that whatever it left running dies with it.
    proc = subprocess.Popen(
        ["bash", "-c", script], cwd=ROOT, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    # /health, then publish's answer and the tab's message (in either order,
    # and possibly on one line: the two processes write concurrently, and with
    # PYTHONUNBUFFERED a print's newline is a write of its own), then the tab's
    # message from Redis.
    assert lines[0].startswith('{"status": "ok"'), lines
    assert '{"status": "accepted", "hubs": 1, "receivers": 1}' in out.stdout
    assert '{"type":"notification","payload":{"title":"hi"}' in out.stdout
    progress = '{"type":"project_progress","payload":{"project_id":"p1","done":150,"total":1000}'
    assert lines[-1].startswith(progress), lines
    assert "1" in lines  # redis-cli: one hub received the PUBLISH
    # Each hub logged where to point a browser, and drained on SIGTERM.
    assert out.stderr.count(f"url=http://127.0.0.1:{port}") == 2, out.stderr
    assert out.stderr.count("msg=drained") == 2, out.stderr
