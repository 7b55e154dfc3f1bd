"""An echo endpoint built from smapws's own WebSocket layer, for
Autobahn|Testsuite's fuzzingclient. A test fixture: not part of the package.

Each connection goes the way the hub's front door takes it
(``smapws._io.frontdoor``): the request head is read and parsed with
``smapws._core.http``, the upgrade is answered with
``smapws._core.wsconn.handshake_response``, and the connection is one task
driving the hub's sans-IO state machine (:class:`~smapws._core.wsconn.WsConn`)
as ``smapws._io.connection`` does: read, feed the state machine, write its
output. What differs: no Origin or token check, no heartbeat, and every whole
client message (``assemble=True``) is sent back, text as text (encoded by the
hub's own ``smapws._core.frames.text_frame``) and binary as binary, after
everything the client sent in the same read has been parsed. Extensions
(permessage-deflate) are not negotiated, as in the hub.

Run alone: ``python -m tests.autobahn.echo_server [--port N]``.
"""

from __future__ import annotations

import argparse
import functools
from typing import Final

import trio

from smapws._core.frames import text_frame
from smapws._core.http import MAX_HEAD_BYTES, HttpError, head_end, parse_head, response
from smapws._core.outbox import OutboxLimits
from smapws._core.wsconn import Message, WsConn, WsLimits, handshake_response, valid_key

#: Autobahn's largest messages (cases 9.1.6, 9.2.6) are 16 MiB.
MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
#: Seconds a client has to send its request head (the hub's default).
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds to wait for a write, and for the answer to our close frame.
WRITE_WAIT: Final = 10.0
#: No heartbeat here (the suite's cases time themselves).
LIMITS: Final = WsLimits(
    ping_interval=float("inf"), pong_wait=float("inf"), max_message_bytes=MAX_MESSAGE_BYTES
)
OUTBOX: Final = OutboxLimits()


def binary_frame(payload: bytes) -> bytes:
    """One final binary frame: the text frame's header with opcode 0x2."""
    return b"\x82" + text_frame(payload)[1:]


async def echo(stream: trio.abc.Stream, trailing: bytes) -> None:
    """The connection's one task, until the WebSocket ends."""
    ws = WsConn("echo", LIMITS, OUTBOX, now=trio.current_time(), assemble=True)
    data = trailing
    with trio.move_on_after(float("inf")) as scope:
        while True:
            for event in ws.receive_data(data, trio.current_time()) if data else ():
                if isinstance(event, Message) and event.data is not None:
                    if isinstance(event.data, str):
                        ws.send_frame(text_frame(event.data.encode("utf-8")))
                    else:
                        ws.send_frame(binary_frame(event.data))
            out = ws.data_to_send()
            if out:
                with trio.fail_after(WRITE_WAIT):
                    await stream.send_all(out)
                ws.sent(len(out))
            if ws.finished:
                return
            if ws.close is not None and scope.deadline == float("inf"):
                scope.deadline = trio.current_time() + WRITE_WAIT
            data = await stream.receive_some(65536)
            if not data:
                ws.receive_data(b"", trio.current_time())
                return


async def _read_head(stream: trio.abc.Stream) -> tuple[str, bytes] | None:
    """The client's ``Sec-WebSocket-Key`` and the bytes after its head, or
    None once a refusal was sent."""
    buf = bytearray()
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        while (end := head_end(buf)) < 0:
            if len(buf) > MAX_HEAD_BYTES:
                await stream.send_all(response(431))
                return None
            chunk = await stream.receive_some(4096)
            if not chunk:
                return None
            buf += chunk
    if end < 0:
        await stream.send_all(response(408))
        return None
    try:
        head = parse_head(bytes(buf[:end]))
    except HttpError as exc:
        await stream.send_all(response(exc.status))
        return None
    key = head.header("sec-websocket-key") or ""
    if (
        head.method != "GET"
        or (head.header("upgrade") or "").lower() != "websocket"
        or not head.has_token("connection", "upgrade")
        or head.header("sec-websocket-version") != "13"
        or not valid_key(key)
    ):
        await stream.send_all(response(400))
        return None
    return key, bytes(buf[end:])


async def handle(stream: trio.abc.Stream) -> None:
    """Serve one TCP connection until the WebSocket ends; always closes it."""
    try:
        upgrade = await _read_head(stream)
        if upgrade is None:
            return
        key, trailing = upgrade
        await stream.send_all(handshake_response(key))
        await echo(stream, trailing)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def serve(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve echo WebSockets on ``host``:``port`` (0: a free port) until
    cancelled; ``task_status.started`` gets the port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve, args.port, host=args.host))
            print(f"echo on ws://{args.host}:{port}/ (Ctrl-C stops)", flush=True)

    try:
        trio.run(run)
    except* KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
