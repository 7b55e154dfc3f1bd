"""Shared fixtures: a real redis-server on a free port, hubs on port 0, clients.

The Redis server is started by the test session itself (never the machine's
6379), so fault tests can kill and restart it.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
import websockets.exceptions
import websockets.trio.client

from smapws import Config, Server, load_config, serve
from smapws._core.auth import mint

SECRET = "test-secret-0123456789abcdef0123456789abcdef"
API_KEY = "test-api-key-0123456789"
#: The headers of a valid WebSocket upgrade, for ``http(..., "GET", "/ws")``.
UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(RuntimeError):
    """redis-server exited at start: its port was taken after it was chosen."""


class RedisServer:
    """A redis-server process of the test session's own."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; run the test command from the README")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
            ],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise PortTaken(f"redis-server exited at start on {self.port}")
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def publish(self, user: str, message: Any) -> int:
        data = message if isinstance(message, bytes | str) else json.dumps(message)
        with self.client() as c:
            return int(c.publish(f"user_noti:{user}", data))


def started_redis(workdir: Path) -> RedisServer:
    """A redis-server on a free port. A port chosen free may be taken before
    redis-server binds it (most often as the ephemeral port of a client's
    connection, from the same range): then another, up to 5 tries."""
    for _ in range(5):
        server = RedisServer(free_port(), workdir)
        try:
            server.start()
        except PortTaken:
            continue
        return server
    raise RuntimeError("no free port redis-server could bind")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="smapws-redis-") as d:
        server = started_redis(Path(d))
        try:
            yield server
        finally:
            server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone (the fault tests kill theirs)."""
    server = started_redis(tmp_path)
    try:
        yield server
    finally:
        server.kill()


def make_config(**overrides: Any) -> Config:
    """A hub config for tests: loopback, any free port, the test secret."""
    env = {
        "SMAPWS_HOST": "127.0.0.1",
        "SMAPWS_PORT": "0",
        "JWT_SECRET": SECRET,
        "SMAPWS_API_KEY": API_KEY,
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return load_config(env)


def token(user: str, *, ttl: float = 3600, key: str = SECRET, **extra: Any) -> str:
    return mint(user, key=key, now=time.time(), ttl=ttl, extra=extra or None)


@pytest.fixture
async def memory_hub(nursery: trio.Nursery) -> Server:
    """A hub on the in-process broker."""
    server: Server = await nursery.start(serve, make_config())
    return server


@pytest.fixture
async def redis_hub(nursery: trio.Nursery, redis_server: RedisServer) -> Server:
    """A hub subscribed to the session's redis-server, ready to deliver."""
    server: Server = await nursery.start(serve, make_config(REDIS_URL=redis_server.url))
    await wait_ready(server)
    return server


async def wait_port_ready(
    port: int, timeout: float = 20, *, exited: Callable[[], object] = lambda: None
) -> None:
    """Until a hub in another process answers ``/ready`` with 200. Fails
    at once when ``exited()`` returns an exit code (the process died)."""
    with trio.fail_after(timeout):
        while True:
            code = exited()
            assert code is None, f"the hub exited with {code}"
            try:
                if (await http(port, "GET", "/ready")).status == 200:
                    return
            except OSError:
                pass
            await trio.sleep(0.05)


async def wait_ready(server: Server, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        await server.app.state.wait_value(lambda state: state.ready)


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Server WebSocket frames (unmasked, RFC 6455 §5.2) as (opcode, payload);
    written independently of smapws._core.frames."""
    frames = []
    while data:
        assert data[1] & 0x80 == 0, "server frames are not masked"
        opcode = data[0] & 0x0F
        n = data[1] & 0x7F
        offset = 2
        if n == 126:
            (n,) = struct.unpack("!H", data[2:4])
            offset = 4
        elif n == 127:
            (n,) = struct.unpack("!Q", data[2:10])
            offset = 10
        assert len(data) >= offset + n, "truncated frame"
        frames.append((opcode, data[offset : offset + n]))
        data = data[offset + n :]
    return frames


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> HttpResponse:
    """One raw HTTP/1.1 request over a real socket; reads to EOF."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    hdrs = dict(headers or {})
    if body:
        hdrs.setdefault("Content-Length", str(len(body)))
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    return await raw_request(port, raw)


async def raw_request(port: int, data: bytes, timeout: float = 10) -> HttpResponse:
    """Send ``data`` as is over a new socket and read the response to EOF."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        return await read_response(stream, timeout)


async def read_response(stream: trio.abc.Stream, timeout: float = 10) -> HttpResponse:
    data = b""
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return HttpResponse(status, headers, body)


def connect(
    server: Server | int,
    user: str | None = None,
    *,
    cookie: str | None = None,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> Any:
    """A client connection made with the ``websockets`` package, a library we
    did not write (an async context manager)."""
    extra = dict(headers or {})
    if cookie is None and user is not None:
        cookie = f"access_token={token(user)}"
    if cookie is not None:
        extra["Cookie"] = cookie
    port = server if isinstance(server, int) else server.port
    return websockets.trio.client.connect(
        f"ws://127.0.0.1:{port}/ws{query}",
        additional_headers=extra,
        compression=None,
        proxy=None,
        open_timeout=10,
    )


async def receive_json(ws: Any, timeout: float = 5) -> Any:
    with trio.fail_after(timeout):
        return json.loads(await ws.recv())


async def close_code(ws: Any, timeout: float = 5) -> int | None:
    """Read until the server closes; return the close code it sent."""
    with trio.fail_after(timeout):
        try:
            while True:
                await ws.recv()
        except websockets.exceptions.ConnectionClosed as exc:
            return None if exc.rcvd is None else exc.rcvd.code


async def wait_connections(server: Server, n: int, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while server.app.hub.active_connections != n:
            await trio.sleep(0.005)


def metric(server: Server, name: str, labels: dict[str, str] | None = None) -> float:
    value = server.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


#: Figures the deployment tests measure (name -> value), printed at the end.
DEPLOY_FIGURES = pytest.StashKey[dict[str, str]]()


def figures(config: pytest.Config) -> dict[str, str]:
    """Where a test records a figure to print after the run (image size,
    build time, ...): not asserted, reported."""
    return config.stash.setdefault(DEPLOY_FIGURES, {})


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    measured = config.stash.get(DEPLOY_FIGURES, {})
    if measured:
        terminalreporter.write_sep("-", "deployment figures")
        terminalreporter.write_line("DEPLOY " + " ".join(f"{k}={v}" for k, v in measured.items()))


# -- systemd's notify socket ------------------------------------------------------------------


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-") as d:
        yield Path(d)


@dataclass
class Datagram:
    at: float
    pid: int
    fields: dict[str, str]


@dataclass
class NotifySocket:
    """A systemd stand-in: a datagram socket that records each notification
    with the sender's pid (SCM_CREDENTIALS, as systemd reads it)."""

    path: str
    received: list[Datagram] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, sock: socket.socket, stop: threading.Event) -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", cdata[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._lock:
                self.received.append(Datagram(time.monotonic(), pid, fields))

    def with_key(self, key: str) -> list[Datagram]:
        with self._lock:
            return [d for d in self.received if key in d.fields]

    def wait_for(self, key: str, timeout: float) -> Datagram:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.with_key(key):
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no {key}= within {timeout}s; got {self.received}")


@pytest.fixture
def systemd_socket(notify_dir: Path) -> Iterator[NotifySocket]:
    path = str(notify_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(path)
    recorder = NotifySocket(path)
    stop = threading.Event()
    thread = threading.Thread(target=recorder.run, args=(sock, stop), daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def doc_block(page: str, after: str) -> str:
    """The literal block of ``page`` (a path from the repository's root, e.g.
    ``docs/frontend.rst``) that follows the paragraph starting ``after``."""
    text = (Path(__file__).resolve().parent.parent / page).read_text()
    rest = text.split("\n" + after, 1)[1].split("::\n\n", 1)[1]
    block = []
    for line in rest.splitlines():
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip("\n") + "\n"
