"""What the browser tests share: Chromium from Debian driven by Playwright,
hub processes, the TCP balancer, and a test page around smapws-client.js.

The tests are synchronous (Playwright's sync API) and the hubs run as real
processes (``python -m smapws serve``), so a rolling restart is a real
SIGTERM, drain and start.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import SECRET, free_port

CHROMIUM = "/usr/bin/chromium"
#: Launch arguments that work on the development machines and in CI.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium under Playwright's sync API, closed at the end."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash .ci/run` (it installs Debian's chromium)")
    # trio-asyncio (imported with the Redis broker) installs its own asyncio
    # event loop policy; Playwright's sync API needs a plain asyncio loop.
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        asyncio.set_event_loop_policy(policy)


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def get(port: int, path: str, *, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def health(port: int) -> dict[str, Any]:
    status, body = get(port, "/health")
    assert status == 200, status
    result: dict[str, Any] = json.loads(body)
    return result


def metric(port: int, name: str) -> float:
    """A sample of the hub's ``/metrics`` (0 when absent)."""
    _, body = get(port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class HubProcess:
    """``python -m smapws <command>`` on a fixed port, restartable."""

    def __init__(self, workdir: Path, command: str = "serve", **settings: Any) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.command = command
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> HubProcess:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SMAPWS_", "REDIS_", "JWT_"))
        }
        env.update(
            SMAPWS_HOST="127.0.0.1",
            SMAPWS_PORT=str(self.port),
            JWT_SECRET=SECRET,
            **{k: str(v) for k, v in self.settings.items()},
        )
        self.starts += 1
        log = open(self.workdir / f"hub-{self.port}-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smapws", self.command], env=env, stderr=log, cwd=ROOT
        )
        log.close()
        wait_for(self._ready, 30, f"hub on port {self.port} ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "the hub exited"
        return get(self.port, "/ready")[0] == 200

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM (a drain), then wait for the exit; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def restart(self) -> None:
        assert self.stop() == 0
        self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class BalancerProcess:
    """tests/tcpbalancer.py in its own process."""

    def __init__(self, backends: list[int]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.tcpbalancer", *map(str, backends)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("listening "), line
        self.port = int(line.split()[1])

    def _tell(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == b"ok\n"

    def add(self, port: int) -> None:
        """New connections may go to ``port`` (once its /ready says so)."""
        self._tell(f"add {port}")

    def remove(self, port: int) -> None:
        """New connections no longer go to ``port``; open ones stay."""
        self._tell(f"remove {port}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


#: A page around the client, served by :class:`PageServer` (a frontend's dev
#: server: another origin than the hub's). ``?hub=<port>`` says where the hub
#: (or the balancer) is; the module is imported from there, as a page does.
#: ``makeClient(options)`` starts a WebSocketService and records what it
#: emits in ``window.clients[i]``; ``options.refresh`` makes onTokenExpired
#: set the cookie to ``window.freshToken``.
TEST_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"></head><body>
<script type="module">
const hub = `127.0.0.1:${new URLSearchParams(location.search).get("hub")}`;
const { WebSocketService, backoffDelay } = await import(`http://${hub}/smapws-client.js`);
window.backoffDelay = backoffDelay;
window.clients = [];
window.refreshes = 0;
window.makeClient = (options = {}) => {
  const opts = { url: `ws://${hub}/ws`, ...options };
  if (opts.refresh) {
    opts.onTokenExpired = async () => {
      window.refreshes += 1;
      document.cookie = `access_token=${window.freshToken}; path=/`;
    };
  }
  const service = new WebSocketService(opts);
  const rec = { service, messages: [], states: [], resyncs: [], events: [] };
  service.on("message", (m) => rec.messages.push(m));
  service.on("state", (s) => rec.states.push({ ...s, at: Date.now() }));
  service.on("resync", (p) => rec.resyncs.push(p));
  for (const name of ["progress", "completed", "notification", "alert"]) {
    service.on(name, (payload) => rec.events.push([name, payload]));
  }
  window.clients.push(rec);
  service.connect();
  return window.clients.length - 1;
};
window.ready = true;
</script></body></html>"""


class PageServer:
    """A frontend's dev server on loopback: serves :data:`TEST_PAGE` at
    ``/test.html`` (in a thread). Its origin is what the hubs must allow."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(TEST_PAGE)))
                self.end_headers()
                self.wfile.write(TEST_PAGE)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def open_test_page(
    browser: Any, pages: PageServer, hub_port: int, token: str, *, http_only: bool = True
) -> Any:
    """The test page, talking to the hub (or balancer) on ``hub_port``, with
    the ``access_token`` cookie set for 127.0.0.1 (any port, as browsers do)."""
    context = browser.new_context()
    context.add_cookies(
        [{"name": "access_token", "value": token, "url": pages.origin, "httpOnly": http_only}]
    )
    page = context.new_page()
    page.goto(f"{pages.origin}/test.html?hub={hub_port}")
    page.wait_for_function("window.ready === true")
    return page


def client(page: Any, i: int, what: str) -> Any:
    """``window.clients[i].<what>`` (JSON-able parts of a client's record)."""
    return page.evaluate(f"window.clients[{i}].{what}")
