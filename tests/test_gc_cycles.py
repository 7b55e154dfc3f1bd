"""A connection's life leaves nothing to the cyclic garbage collector.

The hub raises the collector's first threshold and freezes its start-up heap
(``smapws._runtime`` / ``_cli``), so a full collection runs rarely: state that
only the cyclic collector can free piles up for minutes. The 30-minute soak
(issue 16) grew 107 MiB/h that way: every closed connection's objects
(``Connection`` -> WebSocket -> its listener, the ``Connection``) waited in
the oldest generation, 27 objects and their buffers each. Reference counting
must free a connection as soon as it ends, however it ends.
"""

from __future__ import annotations

import collections
import gc
import json
from collections.abc import Iterator

import pytest
import trio
import websockets.exceptions

from smapws import Server, serve
from tests.conftest import close_code, connect, make_config, receive_json, token, wait_connections

#: Modules whose objects are the hub's own (the test clients are the
#: ``websockets`` package's and raw trio streams, outside these).
OURS = ("smapws", "wsproto", "trio_websocket", "h11")


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """Everything the cyclic collector finds unreachable from here on, kept
    (``gc.DEBUG_SAVEALL``) instead of freed."""
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def ours(garbage: list[object]) -> dict[str, int]:
    gc.collect()
    kinds = collections.Counter(
        f"{type(o).__module__}.{type(o).__qualname__}"
        for o in garbage
        if type(o).__module__.split(".")[0] in OURS
    )
    return dict(kinds)


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
    assert ours(saved_garbage) == {}
