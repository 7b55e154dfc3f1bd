"""``SMAPWS_INTERNAL_PORT``: the operator endpoints on a port of their own.

With it set, ``/metrics`` and ``/api/publish`` answer on the internal port
only (404 on the public one), ``/ws`` on the public port only (404 on the
internal one), ``/health`` and ``/ready`` on both. Real sockets on port 0.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import trio
import websockets.exceptions

from smapws import Server, serve
from smapws._cli import _parser
from smapws._config import ConfigError, load
from smapws._io import demo, frontdoor
from smapws._io.server import ListenError

from .conftest import (
    API_KEY,
    SECRET,
    connect,
    free_port,
    http,
    make_config,
    metric,
    receive_json,
    wait_connections,
)
from .test_ops import clean_env

AUTH = {"Authorization": f"Bearer {API_KEY}"}


# -- configuration ---------------------------------------------------------------------------


def test_unset_by_default_and_defaults_to_the_public_host() -> None:
    config = load({"JWT_SECRET": SECRET})
    assert config.internal_port is None and config.internal_host is None
    assert config.internal_address is None
    config = load({"JWT_SECRET": SECRET, "SMAPWS_HOST": "10.0.0.5", "SMAPWS_INTERNAL_PORT": "8082"})
    assert config.internal_address == ("10.0.0.5", 8082)
    config = load(
        {"JWT_SECRET": SECRET, "SMAPWS_INTERNAL_PORT": "8082", "SMAPWS_INTERNAL_HOST": "127.0.0.1"}
    )
    assert config.internal_address == ("127.0.0.1", 8082)
    # An empty value is unset, as for every optional setting.
    assert load({"JWT_SECRET": SECRET, "SMAPWS_INTERNAL_PORT": ""}).internal_address is None


def test_flags_override_the_environment() -> None:
    args = _parser().parse_args(["serve", "--internal-port", "9100", "--internal-host", "::1"])
    flags = {k: v for k, v in vars(args).items() if v is not None}
    env = {"JWT_SECRET": SECRET, "SMAPWS_INTERNAL_PORT": "8082"}
    assert load(env, flags).internal_address == ("::1", 9100)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SMAPWS_INTERNAL_PORT": "metrics"}, "expected a port number 0-65535, got 'metrics'"),
        ({"SMAPWS_INTERNAL_PORT": "65536"}, "expected a port number 0-65535"),
        ({"SMAPWS_INTERNAL_PORT": "-1"}, "expected a port number 0-65535"),
        ({"SMAPWS_INTERNAL_HOST": "127.0.0.1"}, "required when SMAPWS_INTERNAL_HOST is set"),
        ({"SMAPWS_INTERNAL_PORT": "8081"}, "must differ from SMAPWS_PORT (8081)"),
        (
            {
                "SMAPWS_PORT": "9000",
                "SMAPWS_INTERNAL_PORT": "9000",
                "SMAPWS_INTERNAL_HOST": "0.0.0.0",
            },
            "must differ from SMAPWS_PORT (9000)",
        ),
    ],
)
def test_bad_values_are_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({"JWT_SECRET": SECRET, **env})
    text = str(info.value)
    assert text.startswith("SMAPWS_INTERNAL_PORT: ") and message in text
    assert "\n" not in text


def test_the_same_port_number_on_another_address_or_both_any_is_allowed() -> None:
    env = {"JWT_SECRET": SECRET, "SMAPWS_HOST": "10.0.0.5"}
    other = load({**env, "SMAPWS_INTERNAL_PORT": "8081", "SMAPWS_INTERNAL_HOST": "127.0.0.1"})
    assert other.internal_address == ("127.0.0.1", 8081)
    both_any = load({**env, "SMAPWS_PORT": "0", "SMAPWS_INTERNAL_PORT": "0"})
    assert both_any.internal_address == ("10.0.0.5", 0)


# -- the two listeners -----------------------------------------------------------------------


def _pub(user: str, title: str) -> bytes:
    message = {"type": "notification", "payload": {"title": title}}
    return json.dumps({"user_id": user, "message": message}).encode()


@pytest.fixture
async def split_hub(nursery: trio.Nursery) -> Server:
    """A hub with both ports, on the in-process broker."""
    server: Server = await nursery.start(serve, make_config(SMAPWS_INTERNAL_PORT=0))
    return server


async def test_both_ports_are_bound_and_distinct(split_hub: Server) -> None:
    assert split_hub.internal_port is not None
    assert split_hub.port > 0 and split_hub.internal_port > 0
    assert split_hub.port != split_hub.internal_port


async def test_probes_answer_on_both_ports(split_hub: Server) -> None:
    assert split_hub.internal_port is not None
    for port in (split_hub.port, split_hub.internal_port):
        for path in ("/health", "/ready"):
            r = await http(port, "GET", path)
            assert r.status == 200, (port, path)
            assert r.json()["subscriber"]["status"] == "connected"
        assert (await http(port, "HEAD", "/ready")).status == 200


async def test_metrics_only_on_the_internal_port(split_hub: Server) -> None:
    assert split_hub.internal_port is not None
    for method in ("GET", "HEAD"):
        assert (await http(split_hub.port, method, "/metrics")).status == 404
    r = await http(split_hub.internal_port, "GET", "/metrics")
    assert r.status == 200
    assert "websocket_active_connections " in r.body.decode()


async def test_publish_only_on_the_internal_port(split_hub: Server) -> None:
    assert split_hub.internal_port is not None
    async with connect(split_hub, "u1") as ws:
        await wait_connections(split_hub, 1)
        refused = await http(
            split_hub.port, "POST", "/api/publish", body=_pub("u1", "public"), headers=AUTH
        )
        assert refused.status == 404
        # Not even counted as a publish request: the path does not exist there.
        assert metric(split_hub, "websocket_publish_requests_total", {"status": "404"}) == 0
        r = await http(
            split_hub.internal_port,
            "POST",
            "/api/publish",
            body=_pub("u1", "internal"),
            headers=AUTH,
        )
        assert (r.status, r.json()["status"]) == (202, "accepted")
        # The tab gets the internal publish, and nothing of the refused one.
        got = await receive_json(ws)
        assert got["payload"] == {"title": "internal"}


async def test_the_internal_port_does_not_upgrade(split_hub: Server) -> None:
    assert split_hub.internal_port is not None
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        async with connect(split_hub.internal_port, "u1"):
            pass  # pragma: no cover - the upgrade is refused
    assert info.value.response.status_code == 404
    assert split_hub.app.hub.active_connections == 0
    # The same upgrade on the public port is served.
    async with connect(split_hub, "u1"):
        await wait_connections(split_hub, 1)


async def test_the_browser_client_and_the_demo_only_on_the_public_port(
    nursery: trio.Nursery,
) -> None:
    # Pages import /smapws-client.js from the host they connect to; the
    # shipped ConfigMap sets SMAPWS_INTERNAL_PORT, so it must be public.
    server: Server = await nursery.start(
        serve, make_config(SMAPWS_INTERNAL_PORT=0, SMAPWS_DEMO="true")
    )
    assert server.internal_port is not None
    shipped = (resources.files("smapws") / "static" / "smapws-client.js").read_bytes()
    for method in ("GET", "HEAD"):
        r = await http(server.port, method, "/smapws-client.js")
        assert r.status == 200, method
        assert r.headers["content-type"].startswith("application/javascript")
        assert r.body == (shipped if method == "GET" else b"")
        assert (await http(server.internal_port, method, "/smapws-client.js")).status == 404
    assert (await http(server.port, "GET", "/demo")).status == 200
    assert (await http(server.internal_port, "GET", "/demo")).status == 404
    login = await http(server.port, "POST", "/demo/login")
    assert login.status == 200 and "access_token=" in login.headers["set-cookie"]
    assert (await http(server.internal_port, "POST", "/demo/login")).status == 404


def test_the_documented_endpoints_table_lists_every_path_per_port() -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "reference" / "endpoints.rst"
    section = page.read_text().split("\nSo the scraper", 1)[0]
    table: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        if line.startswith("``/"):
            path, public, internal = (c.strip() for c in re.split(r"\s{2,}", line, maxsplit=2))
            table[path.strip("`")] = (public, internal)
    assert set(table) == set(frontdoor.ALL_ROUTES) | set(demo.ROUTES)
    for path, (public, internal) in table.items():
        expected = "yes (demo only)" if path in demo.ROUTES else "yes"
        served = path in frontdoor.PUBLIC_ROUTES or path in demo.ROUTES
        assert public == (expected if served else "404"), path
        assert internal == ("yes" if path in frontdoor.INTERNAL_ROUTES else "404"), path


async def test_one_port_serves_everything_when_unset(memory_hub: Server) -> None:
    assert memory_hub.internal_port is None
    assert (await http(memory_hub.port, "GET", "/metrics")).status == 200
    r = await http(memory_hub.port, "POST", "/api/publish", body=_pub("u1", "x"), headers=AUTH)
    assert r.status == 202


async def test_internal_host_may_differ_from_the_public_one(nursery: trio.Nursery) -> None:
    # Public on 127.0.0.1, internal on another loopback address: the
    # internal port answers only where it was asked to listen.
    config = make_config(SMAPWS_INTERNAL_PORT=0, SMAPWS_INTERNAL_HOST="127.0.0.2")
    server: Server = await nursery.start(serve, config)
    stream = await trio.open_tcp_stream("127.0.0.2", server.internal_port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await stream.receive_some(100)
    assert head.startswith(b"HTTP/1.1 200 ")
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", server.internal_port)


def _taken() -> socket.socket:
    """A listening socket on a free loopback port, so nobody else can bind it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_internal_port_in_use_fails_start_up_naming_it() -> None:
    public = free_port()
    with _taken() as busy:
        taken = busy.getsockname()[1]
        config = make_config(SMAPWS_PORT=public, SMAPWS_INTERNAL_PORT=taken)
        with pytest.raises(ListenError) as info:
            await serve(config)
    # One exception (not a group), one line that names the address.
    assert str(info.value) == f"cannot listen on 127.0.0.1:{taken}: Address already in use"
    # All or nothing: the public port was let go again.
    with socket.socket() as again:
        again.bind(("127.0.0.1", public))


def test_cli_names_the_internal_address_it_cannot_bind() -> None:
    with _taken() as busy:
        taken = busy.getsockname()[1]
        env = clean_env(
            JWT_SECRET=SECRET,
            SMAPWS_HOST="127.0.0.1",
            SMAPWS_PORT="0",
            SMAPWS_INTERNAL_PORT=str(taken),
        )
        proc = subprocess.run(
            [sys.executable, "-m", "smapws", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"smapws: cannot listen on 127.0.0.1:{taken}: Address already in use"
    ]


async def test_cli_publish_goes_to_the_internal_port(nursery: trio.Nursery) -> None:
    ports = {"SMAPWS_PORT": str(free_port()), "SMAPWS_INTERNAL_PORT": str(free_port())}
    server: Server = await nursery.start(serve, make_config(**ports))
    async with connect(server, "u7") as ws:
        await wait_connections(server, 1)
        env = clean_env(SMAPWS_API_KEY=API_KEY, SMAPWS_HOST="0.0.0.0", **ports)
        argv = [sys.executable, "-m", "smapws", "publish", "--user", "u7", "--type", "alert"]
        proc = await trio.run_process(
            [*argv, "--payload", '{"level": "info"}'],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"status": "accepted", "hubs": 1, "receivers": 1}
        got = await receive_json(ws)
        assert (got["type"], got["payload"]) == ("alert", {"level": "info"})
