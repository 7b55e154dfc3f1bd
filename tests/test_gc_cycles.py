"""A connection's life leaves nothing to the cyclic garbage collector.

The hub raises the collector's first threshold and freezes its start-up heap
(``smapws._cli``), so a full collection runs rarely: state that only the
cyclic collector can free piles up for minutes. The 30-minute soak (issue 16)
grew 107 MiB/h that way: every closed connection's objects (``Connection`` ->
WebSocket -> its listener, the ``Connection``) waited in the oldest
generation, 27 objects and their buffers each. Reference counting must free
a connection as soon as it ends, however it ends, and so every HTTP request
and every message (and, with Redis, what an outage throws away).

Each test warms its hub up first, then calls :func:`forget`: a hub's start
(and a Redis client's first connection) makes one-off cycles; what is
watched is what comes per request, connection or message after that. When a
test fails, :func:`cycles` names the member types of each cycle (the
strongly connected components of the garbage): that is how the cycles were
found.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import importlib.util
import json
import os
import socket
import struct
import types
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
import websockets.exceptions
from wsproto.connection import Connection, ConnectionType

from smapws import Server, serve
from smapws._core.envelope import parse
from smapws._core.history import History, HistoryLimits
from smapws._io import assets, frontdoor
from smapws._io.app import App
from tests.conftest import (
    API_KEY,
    UPGRADE_HEADERS,
    RedisServer,
    close_code,
    connect,
    http,
    make_config,
    metric,
    parse_frames,
    raw_request,
    receive_json,
    token,
    wait_connections,
    wait_ready,
)
from tests.test_fleet import settle
from tests.test_websocket import UPGRADE_HEAD, Valve, memory_app, route, running

#: Modules whose objects are the hub's own (the test clients are the
#: ``websockets`` package's and raw trio streams, outside these).
OURS = ("smapws", "wsproto", "trio_websocket", "h11")


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """Everything the cyclic collector finds unreachable from here on, kept
    (``gc.DEBUG_SAVEALL``) instead of freed."""
    gc.collect()
    gc.garbage.clear()
    gc.disable()  # (see ours(): no collection but the ones the test makes)
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


#: The directories of :data:`OURS`' code (a generator's or a coroutine's
#: code names its file, not its module).
_OUR_DIRS = tuple(
    os.path.abspath(d) + os.sep
    for m in OURS
    if (spec := importlib.util.find_spec(m)) is not None
    for d in spec.submodule_search_locations or ()
)


def _ours(o: object) -> bool:
    """An object of :data:`OURS`, or a generator or coroutine of their code."""
    if isinstance(o, weakref.ProxyTypes):
        return False  # (a dead one raises on any question)
    if _package(o) in OURS:
        return True
    code = _code(o)
    return code is not None and code.co_filename.startswith(_OUR_DIRS)


def test_the_census_counts_the_code_of_ours_alone() -> None:
    """Review 6: the census took any code under a directory named like one
    of :data:`OURS` for ours, so in a clone in its default directory,
    ``smapws/``, the tests' own generators and coroutines and the libraries'
    in its ``.venv`` were counted as the hub's."""
    checkout = os.path.join(os.sep, "home", "dev", "smapws")
    for path in (
        os.path.join(checkout, ".venv", "lib", "site-packages", "trio", "_core", "_run.py"),
        os.path.join(checkout, "tests", "test_gc_cycles.py"),
    ):
        namespace: dict[str, Any] = {}
        exec(compile("def gen():\n    yield\n", path, "exec"), namespace)
        assert not _ours(namespace["gen"]())
    assert _ours(Connection(ConnectionType.SERVER).events())  # wsproto's own


def _code(o: object) -> types.CodeType | None:
    """The code of a generator or a coroutine, else None."""
    if isinstance(o, types.GeneratorType):
        return o.gi_code
    if isinstance(o, types.CoroutineType):
        return o.cr_code
    return None


def ours(garbage: list[object]) -> dict[str, int]:
    """What of ours the cyclic collector finds: kept in ``garbage``
    (``DEBUG_SAVEALL``), and also what it frees all the same. A cycle through
    a generator is the second kind: the collector runs the generator's
    finalizer, which breaks the cycle, and reference counting frees the rest
    before anything is saved (wsproto's frame parser was such a cycle, and
    ``garbage`` alone never showed it). So the objects of ours alive before a
    collection and gone after it are counted too; the fixture keeps the
    collector off meanwhile, so that none is collected unseen. (An address
    and a type: the finalizers the collection runs may allocate where it
    freed.)"""
    alive = {id(o): (type(o), _name(o)) for o in gc.get_objects() if _ours(o)}
    gc.collect()
    after = {id(o): type(o) for o in gc.get_objects()}
    kinds = collections.Counter(name for i, (t, name) in alive.items() if after.get(i) is not t)
    kinds.update(_name(o) for o in garbage if _ours(o))
    return dict(kinds)


def forget(garbage: list[object]) -> None:
    """Free what the collector has found so far (one-off start-up cycles).
    Clearing ``gc.garbage`` alone would not: its cycles would be found again."""
    gc.set_debug(0)
    garbage.clear()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)


def _module(o: object) -> str:
    """The module of ``o``'s type ("?" for a type whose ``__module__`` is not
    a string: some extension types', met in the whole suite's heap)."""
    module = getattr(type(o), "__module__", None)
    return module if isinstance(module, str) else "?"


def _package(o: object) -> str:
    return _module(o).split(".")[0]


def _name(o: object) -> str:
    code = getattr(o, "f_code", None)  # a frame: which function's
    if code is not None:
        return f"frame {code.co_name}"
    code = _code(o)
    if code is not None:
        return f"{type(o).__name__} {code.co_qualname}"
    return f"{_module(o)}.{type(o).__qualname__}"


def cycles(garbage: list[object]) -> list[tuple[str, ...]]:
    """The member types of every cycle in ``garbage`` (its strongly
    connected components, Tarjan's algorithm over ``gc.get_referents``),
    for the failure message: what keeps the objects of ours alive."""
    gc.collect()
    objects = {id(o): o for o in garbage}
    edges = {
        i: [id(r) for r in gc.get_referents(o) if id(r) in objects] for i, o in objects.items()
    }
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    found: list[tuple[str, ...]] = []
    for root in objects:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            for j in range(i, len(edges[v])):
                w = edges[v][j]
                if w not in index:
                    work += [(v, j + 1), (w, 0)]
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                if low[v] == index[v]:
                    members = []
                    while (w := stack.pop()) != v:
                        on_stack.discard(w)
                        members.append(w)
                    on_stack.discard(v)
                    if members or v in edges[v]:
                        found.append(tuple(sorted(_name(objects[m]) for m in [v, *members])))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
    return found


def assert_nothing_of_ours(garbage: list[object]) -> None:
    kinds = ours(garbage)
    assert kinds == {}, (kinds, collections.Counter(cycles(garbage)).most_common(10))


async def publish(server: Server, user: str, n: int) -> None:
    data = json.dumps({"type": "project_progress", "payload": {"n": n}}).encode()
    await server.app.broker.publish(b"user_noti:" + user.encode(), data)


async def test_connections_closed_every_way_are_freed_by_reference_counting(
    nursery: trio.Nursery, saved_garbage: list[object]
) -> None:
    server: Server = await nursery.start(serve, make_config(SMAPWS_MAX_CLIENT_MESSAGE_BYTES=64))
    # Closed by the client, after deliveries (and a resume with ?since=).
    last = None
    for i in range(5):
        query = f"?since={last}" if last else ""
        async with connect(server, "u1", query=query) as ws:
            await wait_connections(server, 1)
            await publish(server, "u1", i)
            last = (await receive_json(ws))["id"]
    # Dropped by the client without a close frame.
    for _ in range(5):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        request = (
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Cookie: access_token={token('u2')}\r\n\r\n"
        )
        await stream.send_all(request.encode())
        assert b" 101 " in await stream.receive_some(4096)
        await wait_connections(server, 1)
        await stream.aclose()
        await wait_connections(server, 0)
    # Closed by the hub: a client message over the limit (1009).
    for _ in range(5):
        async with connect(server, "u3") as ws:
            await ws.send("x" * 100)
            assert await close_code(ws) == 1009
    # Refused before the upgrade.
    with pytest.raises(websockets.exceptions.InvalidStatus, match="401"):
        async with connect(server, "u4", cookie="access_token=nope"):
            pass
    await wait_connections(server, 0)
    await trio.sleep(0.1)  # the connections' tasks have returned
    assert_nothing_of_ours(saved_garbage)


# -- HTTP requests and refused upgrades ------------------------------------------------------

_AUTH = {"Authorization": f"Bearer {API_KEY}"}
_PUBLISH = json.dumps({"user_id": "h1", "message": {"type": "x", "payload": {}}}).encode()


async def _upgrade_status(port: int, user: str, extra: dict[str, str] | None = None) -> int:
    """The status an upgrade of ``user``'s gets; a 101 is closed at once."""
    headers = {**UPGRADE_HEADERS, "Cookie": f"access_token={token(user)}", **(extra or {})}
    request = "GET /ws HTTP/1.1\r\nHost: x\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request.encode() + b"\r\n")
        head = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
    return int(head.split()[1])


async def _http_round(server: Server) -> list[int]:
    port = server.port
    big_head = b"GET /health HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    statuses = [
        (await http(port, "GET", "/health")).status,
        (await http(port, "GET", "/ready")).status,
        (await http(port, "GET", "/metrics")).status,
        (await http(port, "GET", assets.CLIENT_JS_PATH)).status,
        (await http(port, "GET", "/demo")).status,
        (await http(port, "GET", "/nowhere")).status,
        (await http(port, "PUT", "/health")).status,
        (await raw_request(port, b"HELLO THERE\r\n\r\n")).status,
        (await raw_request(port, big_head)).status,
        (await http(port, "POST", "/api/publish", body=_PUBLISH, headers=_AUTH)).status,
        (await http(port, "POST", "/api/publish", body=_PUBLISH)).status,
        (await http(port, "POST", "/api/publish", body=b"not json", headers=_AUTH)).status,
        (await http(port, "GET", "/ws", headers=UPGRADE_HEADERS)).status,
        (await http(port, "GET", "/ws")).status,
        (await http(port, "GET", "/ws?since=nope", headers=UPGRADE_HEADERS)).status,
        await _upgrade_status(port, "h1", {"Origin": "http://elsewhere.example"}),
        await _upgrade_status(port, "h1", {"Sec-WebSocket-Version": "8"}),
    ]
    async with connect(server, "h1"), connect(server, "h2"):
        await wait_connections(server, 2)
        statuses.append(await _upgrade_status(port, "h1"))  # its second tab
        async with connect(server, "h3"):
            await wait_connections(server, 3)
            statuses.append(await _upgrade_status(port, "h4"))  # the hub is full
    await wait_connections(server, 0)
    return statuses


async def test_http_requests_and_refused_upgrades_are_freed_by_reference_counting(
    nursery: trio.Nursery, saved_garbage: list[object]
) -> None:
    server: Server = await nursery.start(
        serve,
        make_config(
            SMAPWS_ALLOWED_ORIGINS="http://app.example",
            SMAPWS_MAX_CONNECTIONS=3,
            SMAPWS_MAX_CONNECTIONS_PER_USER=1,
            SMAPWS_DEMO=1,
        ),
    )
    statuses = await _http_round(server)
    # HTTP, then refused upgrades: no token, no upgrade, bad ?since=, Origin,
    # version, the user's second tab, the hub full.
    http_statuses = [200, 200, 200, 200, 200, 404, 405, 400, 431, 202, 401, 400]
    assert statuses == [*http_statuses, 401, 426, 400, 403, 426, 429, 503]
    forget(saved_garbage)
    for _ in range(3):
        await _http_round(server)
    await trio.sleep(0.1)
    assert_nothing_of_ours(saved_garbage)


async def test_accept_rate_refusals_are_freed_by_reference_counting(
    nursery: trio.Nursery, saved_garbage: list[object]
) -> None:
    server: Server = await nursery.start(
        serve, make_config(SMAPWS_MAX_ACCEPT_RATE=1, SMAPWS_MAX_ACCEPT_RATE_PER_USER=1)
    )
    statuses = [await _upgrade_status(server.port, user) for user in ("r1", "r1", "r2")]
    assert statuses == [101, 503, 503]  # the user's share, then the hub's
    forget(saved_garbage)
    for _ in range(5):
        for user in ("r1", "r2"):
            await _upgrade_status(server.port, user)
    await wait_connections(server, 0)
    await trio.sleep(0.1)
    assert_nothing_of_ours(saved_garbage)


# -- WebSocket closes by the hub ----------------------------------------------------------------


def _client_frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    assert len(payload) < 126
    if not masked:
        return bytes([0x80 | opcode, len(payload)]) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + body


async def _upgraded(stream: trio.abc.Stream, user: str, *, ttl: float = 3600) -> None:
    """Upgrade ``stream`` by hand as ``user``; returns after the 101 head."""
    extra = f"Cookie: access_token={token(user, ttl=ttl)}\r\n"
    await stream.send_all(UPGRADE_HEAD.format(query="", extra=extra).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101 "), head


async def _read_to_eof(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def _close_frame_code(data: bytes) -> int | None:
    """The code of the close frame among the server frames ``data``."""
    for opcode, payload in parse_frames(data):
        if opcode == 0x8:
            return int(struct.unpack("!H", payload[:2])[0])
    return None


async def _close_code(server: Server, send: bytes) -> int | None:
    """The close code a raw client that sends ``send`` once upgraded gets."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await _upgraded(stream, "p1")
        await stream.send_all(send)
        with trio.fail_after(5):
            return _close_frame_code(await _read_to_eof(stream))


async def test_protocol_errors_and_floods_are_freed_by_reference_counting(
    nursery: trio.Nursery, saved_garbage: list[object]
) -> None:
    server: Server = await nursery.start(serve, make_config(SMAPWS_MAX_CLIENT_FRAME_RATE=20))
    closes = {
        1002: _client_frame(0x1, b"hi", masked=False),  # an unmasked client frame
        1007: _client_frame(0x1, b"\xff\xfe"),  # not UTF-8
        1008: _client_frame(0x9, b"x") * 100,  # frames faster than the rate
        1000: _client_frame(0x9, b"x") + _client_frame(0x8, struct.pack("!H", 1000)),
    }
    for rounds in (1, 3):
        for _ in range(rounds):
            for code, send in closes.items():
                assert await _close_code(server, send) == code
        await wait_connections(server, 0)
        if rounds == 1:
            forget(saved_garbage)
    await trio.sleep(0.1)
    # A connection that the frame-rate bound closed leaves its parser (with
    # the rest of that read, unparsed) to the collector: running it to its
    # end would parse what the bound refused to (WsConn.release). One each,
    # and nothing else.
    kinds = ours(saved_garbage)
    parsers = {k: n for k, n in kinds.items() if "FrameProtocol" in k or "frame_protocol" in k}
    assert kinds.keys() - parsers.keys() == set(), (kinds, cycles(saved_garbage))
    assert parsers and all(n <= 3 for n in parsers.values()), parsers


async def _flooded(server: Server, *, reset: bool) -> None:
    """A tab with a small receive buffer sent more than its socket takes
    (frames written in part, the rest queued, then a 1013 past the queue's
    bytes), which then reads everything or resets the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await _upgraded(stream, "f1")
    await wait_connections(server, 1)
    data = json.dumps({"type": "notification", "payload": {"x": "y" * 30000}}).encode()
    for _ in range(20):
        await server.app.broker.publish(b"user_noti:f1", data)
        await trio.sleep(0.005)
    if reset:  # RST: the hub's pending write fails
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        with trio.fail_after(5):
            await _read_to_eof(stream)
    await stream.aclose()
    await wait_connections(server, 0)


async def test_partial_writes_and_resets_are_freed_by_reference_counting(
    nursery: trio.Nursery, saved_garbage: list[object]
) -> None:
    server: Server = await nursery.start(
        serve, make_config(SMAPWS_SEND_QUEUE_BYTES=200_000, SMAPWS_WRITE_WAIT=1)
    )
    for rounds in (1, 2):
        for _ in range(rounds):
            await _flooded(server, reset=False)
            await _flooded(server, reset=True)
        if rounds == 1:
            forget(saved_garbage)
    await trio.sleep(0.1)
    assert_nothing_of_ours(saved_garbage)
    assert metric(server, "websocket_slow_consumer_closes_total") >= 3


# -- timeouts, under MockClock (in-memory streams: trio.testing's, outside OURS) ---------------


async def _timed_out(app: App, nursery: trio.Nursery, what: str) -> bytes:
    """One connection that ends by a timeout (or a bound) of the hub's;
    what the hub sent it."""
    client, server_side = trio.testing.memory_stream_pair()
    valve = Valve(server_side)
    nursery.start_soon(frontdoor.handle, app, valve)
    async with client:
        if what == "head":  # the head never completes: 408
            await client.send_all(b"GET /health HTTP/1.1\r\n")
        elif what == "body":  # the publish body never completes: 408
            head = f"POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            await client.send_all(head.encode() + b"Content-Length: 100\r\n\r\n{")
        elif what == "linger":  # answered, but the client never closes
            await client.send_all(b"GET /health HTTP/1.1\r\n\r\n")
            while b"\r\n\r\n" not in await client.receive_some(65536):
                pass
            await trio.sleep(10)
            return b""
        else:
            await _upgraded(client, "t1", ttl=30 if what == "expiry" else 3600)
            if what in ("slow", "write"):
                await trio.sleep(1)
                valve.stall()  # the client stops reading
                for n in range(4 if what == "slow" else 1):
                    route(app, "t1", n=n)
                    await trio.sleep(0.1)
                if what == "write":
                    await trio.sleep(20)
                valve.open.set()
        return await _read_to_eof(client)


async def test_timeouts_are_freed_by_reference_counting(
    autojump_clock: trio.testing.MockClock, saved_garbage: list[object]
) -> None:
    app = memory_app(
        SMAPWS_PING_INTERVAL=54,
        SMAPWS_PONG_WAIT=60,
        SMAPWS_WRITE_WAIT=10,
        SMAPWS_HANDSHAKE_TIMEOUT=10,
        SMAPWS_SEND_QUEUE_HIGH_WATER=2,
        SMAPWS_SEND_QUEUE_MESSAGES=2,
    )
    ends = {
        "head": b" 408 ",
        "body": b" 408 ",
        "linger": b"",
        "pong": b"pong timeout",  # 1011: the silent client answers no ping
        "expiry": b"token expired",  # 1008
        "slow": b"slow consumer",  # 1013
        "write": b"",  # SMAPWS_WRITE_WAIT: abandoned without a close frame
    }
    async with running(app) as nursery:
        for rounds in (1, 3):
            for _ in range(rounds):
                for what, expected in ends.items():
                    assert expected in await _timed_out(app, nursery, what), what
            await trio.sleep(1)
            assert app.hub.active_connections == 0
            if rounds == 1:
                forget(saved_garbage)
        assert_nothing_of_ours(saved_garbage)
    sample = app.metrics.registry.get_sample_value
    for cause in ("pong_timeout", "token_expired", "slow_consumer", "write_timeout"):
        assert sample("websocket_connections_closed_total", {"cause": cause}) == 4, cause


# -- shutdown ---------------------------------------------------------------------------------


async def test_connections_closed_by_a_drain_are_freed_by_reference_counting(
    saved_garbage: list[object],
) -> None:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, make_config(SMAPWS_DRAIN_TIMEOUT=3))
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(connect(server, f"s{i}")) for i in range(4)]
            await wait_connections(server, 4)
            forget(saved_garbage)
            server.drain()
            assert [await close_code(ws) for ws in clients] == [1001] * 4
    # The stopped hub's App is kept here: it is one cycle (its metrics'
    # callbacks hold it), once a process; its connections must add nothing.
    assert server.app.hub.active_connections == 0
    assert_nothing_of_ours(saved_garbage)


# -- Redis mode ---------------------------------------------------------------------------------


def _window(users: int, per_user: int) -> History:
    history = History(HistoryLimits())
    data = json.dumps({"type": "notification", "payload": {"x": "y" * 1000}}).encode()
    for u in range(users):
        for n in range(per_user):
            env = parse(data, wall_time=0, received_at=0, message_id=f"{u:08x}{n:08x}")
            history.record(f"u{u}", f"{u:08x}{n:08x}", "-" * 16, env, now=0)
    return history


def test_a_replay_window_cleared_for_a_hole_is_freed_by_reference_counting(
    saved_garbage: list[object],
) -> None:
    # What a Redis outage does (App.resync: the window has a hole): every
    # user's window with its messages, frames included, up to
    # SMAPWS_HISTORY_MAX_BYTES (32 MiB), must go at once.
    history = _window(users=3, per_user=4)
    history.clear()
    history.forget_user("u0")
    del history
    assert_nothing_of_ours(saved_garbage)


#: What a Redis hub's steady state must not leave either: the client
#: library, the asyncio loop under it and the bridge to it.
REDIS_SIDE = ("redis", "hiredis", "trio_asyncio", "asyncio", "_asyncio")


def _nothing_of_ours_or_redis(garbage: list[object]) -> None:
    gc.collect()
    kinds = collections.Counter(_name(o) for o in garbage if _package(o) in OURS + REDIS_SIDE)
    assert kinds == {}, (kinds, collections.Counter(cycles(garbage)).most_common(10))


async def _redis_publish(redis: RedisServer, user: str, message: Any) -> None:
    """PUBLISH over a raw socket: redis-py's sync client, in the test, would
    leave cycles of its own (each client made is one)."""
    args = [b"PUBLISH", f"user_noti:{user}".encode(), json.dumps(message).encode()]
    command = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    stream = await trio.open_tcp_stream("127.0.0.1", redis.port)
    async with stream:
        await stream.send_all(command)
        reply = b""
        with trio.fail_after(5):
            while not reply.endswith(b"\r\n"):
                reply += await stream.receive_some(64)
    assert reply.startswith(b":"), reply


def _note(n: int) -> dict[str, Any]:
    return {"type": "notification", "payload": {"n": n}}


async def _redis_round(a: Server, b: Server, redis: RedisServer) -> None:
    """A publish through the API, deliveries on ``a``, and a resume on ``b``
    from the fleet's log (``b`` keeps no window of its own)."""
    received = metric(a, "websocket_broker_messages_received_total")
    r = await http(a.port, "POST", "/api/publish", body=_PUBLISH, headers=_AUTH)
    assert r.status == 202
    async with connect(a, "q1") as tab:
        await wait_connections(a, 1)
        await _redis_publish(redis, "q1", _note(0))
        last = (await receive_json(tab))["id"]
    await _redis_publish(redis, "q1", _note(1))
    await settle(a, int(received) + 3)  # routed, and appended to the fleet's log
    async with connect(b, "q1", query=f"?since={last}") as tab:
        missed = await receive_json(tab)
        assert missed["payload"] == {"n": 1}, missed
    await wait_connections(a, 0)
    await wait_connections(b, 0)


async def test_redis_deliveries_resumes_and_publishes_are_freed_by_reference_counting(
    nursery: trio.Nursery, own_redis: RedisServer, saved_garbage: list[object]
) -> None:
    url = own_redis.url
    a: Server = await nursery.start(serve, make_config(REDIS_URL=url))
    b: Server = await nursery.start(serve, make_config(REDIS_URL=url, SMAPWS_HISTORY_MAX_BYTES=1))
    await wait_ready(a)
    await wait_ready(b)
    await _redis_round(a, b, own_redis)
    forget(saved_garbage)
    for _ in range(3):
        await _redis_round(a, b, own_redis)
    await trio.sleep(0.1)
    _nothing_of_ours_or_redis(saved_garbage)
    assert metric(b, "websocket_resumes_total", {"result": "fleet"}) == 4


async def _user_mode_round(server: Server, redis: RedisServer, user: str) -> None:
    async with connect(server, user) as tab:
        await wait_connections(server, 1)
        await _redis_publish(redis, user, _note(0))
        assert (await receive_json(tab))["payload"] == {"n": 0}
    await wait_connections(server, 0)


async def test_user_mode_subscriptions_are_freed_by_reference_counting(
    nursery: trio.Nursery, own_redis: RedisServer, saved_garbage: list[object]
) -> None:
    # A subscription per user, dropped when the user's last tab closes.
    config = make_config(
        REDIS_URL=own_redis.url, SMAPWS_SUBSCRIBE_MODE="user", SMAPWS_SUBSCRIBE_LINGER=0
    )
    server: Server = await nursery.start(serve, config)
    await wait_ready(server)
    for n in range(2):  # (the fleet log's scripts are loaded on first use)
        await _user_mode_round(server, own_redis, f"w{n}")
    await settle(server, 2)  # (and their appends answered: they may trail the rounds)
    forget(saved_garbage)
    for n in range(5):
        await _user_mode_round(server, own_redis, f"m{n}")
    await trio.sleep(0.1)
    _nothing_of_ours_or_redis(saved_garbage)


@pytest.mark.parametrize("mode", ["pattern", "user"])
async def test_a_redis_restart_is_freed_by_reference_counting(
    nursery: trio.Nursery, own_redis: RedisServer, saved_garbage: list[object], mode: str
) -> None:
    # What the outage makes the hub throw away (the replay window, the
    # sessions' state) goes by reference counting. (redis-py, asyncio and
    # trio-asyncio leave cycles of their own per Redis connection made or
    # failed, a few dozen objects per reconnect: not watched here.)
    config = make_config(REDIS_URL=own_redis.url, SMAPWS_SUBSCRIBE_MODE=mode)
    server: Server = await nursery.start(serve, config)
    await wait_ready(server)
    async with connect(server, "k1") as tab:
        await wait_connections(server, 1)
        for outage in range(2):
            for n in range(3):
                await _redis_publish(own_redis, "k1", _note(n))
                assert (await receive_json(tab))["payload"] == {"n": n}
            own_redis.kill()
            with trio.fail_after(5):
                while server.app.ready():
                    await trio.sleep(0.01)
            await trio.to_thread.run_sync(own_redis.start)
            assert (await receive_json(tab, timeout=10))["type"] == "resync"
            await wait_ready(server)
            if outage == 0:
                forget(saved_garbage)
        assert_nothing_of_ours(saved_garbage)
