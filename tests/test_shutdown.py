"""Drain on shutdown, in process and as a real process receiving SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jwt
import pytest
import trio
import trio.lowlevel
import trio.testing

from smapws import Server, serve

from .conftest import (
    SECRET,
    RedisServer,
    close_code,
    connect,
    free_port,
    http,
    make_config,
    token,
    wait_connections,
    wait_port_ready,
)
from .test_websocket import UPGRADE_HEAD, raw_upgrade


async def test_drain_refuses_new_work_and_closes_with_1001() -> None:
    async with trio.open_nursery() as nursery:
        cfg = make_config(SMAPWS_DRAIN_TIMEOUT=20, SMAPWS_WRITE_WAIT=3)
        server: Server = await nursery.start(serve, cfg)
        # A client that never answers the close handshake holds the drain open
        # for SMAPWS_WRITE_WAIT, long enough to look at the hub meanwhile.
        silent = await trio.open_tcp_stream("127.0.0.1", server.port)
        head = UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={token('u0')}\r\n")
        await silent.send_all(head.encode())
        async with silent, connect(server, "u1") as ws1, connect(server, "u2") as ws2:
            await wait_connections(server, 3)
            server.drain()
            await trio.lowlevel.checkpoint()
            assert server.app.draining
            # /ready turns 503 at once; /health still answers.
            ready = await http(server.port, "GET", "/ready")
            assert ready.status == 503 and ready.json()["draining"] is True
            # New upgrades get 503 with Retry-After.
            r = await raw_upgrade(server.port, user="u3")
            assert r.status == 503 and "retry-after" in r.headers
            # Open connections are closed with 1001.
            for ws in (ws1, ws2):
                assert await close_code(ws) == 1001
    # serve() returned by itself once drained: the nursery exited.
    assert server.app.hub.active_connections == 0


def test_sigterm_drains_and_exits_0(redis_server: RedisServer) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMAPWS_", "REDIS_", "JWT_"))}
    env.update(
        SMAPWS_HOST="127.0.0.1",
        SMAPWS_PORT=str(port),
        REDIS_URL=redis_server.url,
        JWT_SECRET=SECRET,
        SMAPWS_DRAIN_TIMEOUT="10",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "smapws", "serve"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        result = trio.run(_sigterm_scenario, proc, port)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=10)
    assert result == [1001, 1001]
    assert proc.returncode == 0
    assert "signal received" in stderr and "signal=SIGTERM" in stderr
    assert "signal ignored: smapws has no reload" in stderr and "signal=SIGHUP" in stderr
    assert "draining" in stderr
    assert SECRET not in stderr


async def _sigterm_scenario(proc: subprocess.Popen[str], port: int) -> list[int | None]:
    await wait_port_ready(port, 20, exited=proc.poll)
    codes = []
    async with connect(port, "u1") as a, connect(port, "u1") as b:
        health = (await http(port, "GET", "/health")).json()
        assert health["websocket"]["active_connections"] == 2
        # A hangup (the terminal it was started from closed) is logged and
        # ignored: it used to kill the hub, every tab dropped without a close
        # frame (1006 below, and no exit 0).
        proc.send_signal(signal.SIGHUP)
        health = (await http(port, "GET", "/health")).json()
        assert health["websocket"]["active_connections"] == 2
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for ws in (a, b):
            codes.append(await close_code(ws, timeout=10))
    while proc.poll() is None and time.monotonic() - start < 10:
        await trio.sleep(0.05)
    return codes


def test_token_command_mints_a_verifiable_token() -> None:
    env = {"JWT_SECRET": SECRET, "PATH": os.environ.get("PATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "smapws", "token", "--user", "u42", "--ttl", "120"],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    claims = jwt.decode(out, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "u42"
    assert 100 < claims["exp"] - time.time() <= 120


def test_publish_command_through_the_http_api() -> None:
    """`smapws publish` without Redis goes to a running hub's API."""

    async def scenario() -> dict[str, object]:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, make_config())
            async with connect(server, "u5") as ws:
                await wait_connections(server, 1)
                env = {
                    "PATH": os.environ.get("PATH", ""),
                    "SMAPWS_API_KEY": "test-api-key-0123456789",
                    "SMAPWS_PORT": str(server.port),
                }
                await trio.run_process(
                    [sys.executable, "-m", "smapws", "publish", "--user", "u5",
                     "--type", "notification", "--payload", '{"a": 1}'],
                    env=env, capture_stdout=True,
                )  # fmt: skip
                with trio.fail_after(5):
                    msg: dict[str, object] = json.loads(await ws.recv())
            nursery.cancel_scope.cancel()
        return msg

    msg = trio.run(scenario)
    assert msg["type"] == "notification" and msg["payload"] == {"a": 1}


async def test_drain_spreads_the_closes_over_the_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """10,000 tabs are not all told to reconnect in the same instant."""
    from smapws._io.app import App
    from smapws._io.brokers.memory import MemoryBroker
    from smapws._io.connection import Connection
    from smapws._io.server import Server

    app = App(make_config(SMAPWS_DRAIN_TIMEOUT=30, SMAPWS_WRITE_WAIT=10), MemoryBroker())
    conns = []
    for i in range(10_000):
        conn = Connection(app, f"u{i % 500}", expires_at=None, remote="-", now=0.0)
        app.hub.add(conn.user_id, conn)
        conns.append(conn)

    def closed() -> int:
        return sum(c.close_code == 1001 for c in conns)

    async with trio.open_nursery() as nursery:
        server = Server(app, 0, nursery.cancel_scope)
        nursery.start_soon(server._drain_when_asked)
        start = trio.current_time()
        server.drain()
        assert app.draining and not app.ready()
        # Window: 30 - 10 - 1 = 19 s, so ~526 closes a second.
        await trio.sleep(1)
        assert 400 < closed() < 700
        await trio.sleep(8.5)
        assert 4500 < closed() < 5500
        await trio.sleep(10)
        assert closed() == 10_000
        # Nobody completes the close handshake here: the drain gives up at
        # SMAPWS_DRAIN_TIMEOUT and cancels the hub.
    assert trio.current_time() - start == 30


@pytest.fixture
def idle_jump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only once the hub has been idle for half a
    real second: real sockets work as usual, while any timed wait left on
    the way out (a linger, a close deadline) is skipped to and shows as
    virtual time passed."""
    return trio.testing.MockClock(autojump_threshold=0.5)


async def test_serve_returns_the_moment_it_has_drained(
    idle_jump_clock: trio.testing.MockClock,
) -> None:
    """After a health check, a publish, a tab that came and went and a
    socket that sent nothing, a drain with no connection left ends serve()
    with no virtual time passed: the exit waits for no deadline."""
    server: Server
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, make_config(SMAPWS_API_KEY="drain-key-0123456789"))
        assert (await http(server.port, "GET", "/health")).status == 200
        async with connect(server, "u1"):
            await wait_connections(server, 1)
        await wait_connections(server, 0)
        idle = await trio.open_tcp_stream("127.0.0.1", server.port)
        await trio.lowlevel.checkpoint()
        start = trio.current_time()
        server.drain()
    assert trio.current_time() - start == 0
    await idle.aclose()
