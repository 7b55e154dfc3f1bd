"""An echo endpoint built from smapws's own WebSocket layer, for
Autobahn|Testsuite's fuzzingclient. A test fixture: not part of the package.

Each connection goes the way the hub's front door takes it
(``smapws._io.frontdoor``): the request head is read and parsed with
``smapws._core.http``, the upgrade is answered by
:meth:`ServerWebSocket.accept` with the bytes read after the head, and the
connection's own task is its writer, sending ready-made frames with
:meth:`ServerWebSocket.send_frames`, while the reader's callback writes at
once with :meth:`ServerWebSocket.try_send` when the writer is idle, as the
hub's router does. What differs: no Origin or token check, and every whole
client message (:meth:`ServerWebSocket.receive`) is sent back, text as text
(encoded by the hub's own ``smapws._core.frames.text_frame``) and binary as
binary. Extensions (permessage-deflate) are not negotiated, as in the hub.

Run alone: ``python -m tests.autobahn.echo_server [--port N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections import deque
from typing import Final

import trio

from smapws._core.frames import text_frame
from smapws._core.http import MAX_HEAD_BYTES, HttpError, head_end, parse_head, response
from smapws._io.ws import ServerWebSocket, WsClosed, valid_key

#: Autobahn's largest messages (cases 9.1.6, 9.2.6) are 16 MiB.
MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
#: Seconds a client has to send its request head (the hub's default).
HANDSHAKE_TIMEOUT: Final = 10.0


def binary_frame(payload: bytes) -> bytes:
    """One final binary frame: the text frame's header with opcode 0x2."""
    return b"\x82" + text_frame(payload)[1:]


class _Echo:
    """The connection's listener, called from the library's reader task and
    never blocking. Like the hub's ``Connection.offer``: while the writer is
    idle, an echo is written at once with :meth:`ServerWebSocket.try_send`;
    what the socket does not take, and every echo while the writer is busy,
    is queued for the writer. The queue is unbounded: a test peer waits for
    its echoes (the hub bounds its own)."""

    def __init__(self, ws: ServerWebSocket) -> None:
        self.ws = ws
        self.pending: deque[bytes] = deque()
        self.closed = False
        self.idle = False
        self._wakeup = trio.Event()

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            frame = text_frame(message.encode("utf-8"))
        else:
            frame = binary_frame(message)
        if self.idle and not self.pending:
            sent = self.ws.try_send(frame)
            if sent == len(frame):
                return
            frame = frame[max(sent, 0) :]
        self.pending.append(frame)
        self._wakeup.set()

    def on_client_message(self) -> None:  # only with listen(); receive() hands messages over
        pass

    def on_pong(self) -> None:
        pass

    def on_closed(self, code: int) -> None:
        self.closed = True
        self._wakeup.set()

    async def write(self) -> None:
        """The writer: until the peer closed (or a write fails: WsClosed)."""
        while True:
            while self.pending:
                await self.ws.send_frames(self.pending.popleft())
            if self.closed:
                return
            self.idle = True
            await self._wakeup.wait()
            self.idle = False
            self._wakeup = trio.Event()


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
        async with trio.open_nursery() as nursery:
            ws = await ServerWebSocket.accept(
                nursery, stream, key, trailing, max_message_size=MAX_MESSAGE_BYTES
            )
            echo = _Echo(ws)
            ws.receive(echo)
            with contextlib.suppress(WsClosed):
                await echo.write()
            # The peer closed (the library answered its close frame), or a
            # write failed: the reader has ended or ends with the stream.
            nursery.cancel_scope.cancel()
    except (WsClosed, trio.BrokenResourceError, trio.ClosedResourceError):
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
