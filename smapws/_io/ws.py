"""The one module that touches trio-websocket.

Everything else in smapws sees :class:`ServerWebSocket` and :class:`WsClosed`,
so the WebSocket library can be swapped (for instance for ``websockets.trio``)
by rewriting this file alone.

Two things here go past trio-websocket's public API, on purpose:

- :meth:`ServerWebSocket.send_frames` writes frames that the router encoded
  once for all connections (server frames are unmasked, so the bytes are the
  same for every socket), under the library's own stream lock so that they
  never interleave with its control frames. This is what lets one writer send
  everything queued in one ``send_all`` (see DESIGN.md §4).
- After the upgrade the handshake state machine and headers are dropped: they
  are never used again and are a large part of each idle connection's memory.
"""

from __future__ import annotations

from typing import Any, Final

import trio
import trio_websocket
from trio_websocket._impl import ConnectionClosed as _TwConnectionClosed

#: Client messages are read and discarded one at a time, so the library needs
#: no queue of its own beyond one message in hand.
_CLIENT_QUEUE: Final = 1

#: Close code when the connection ended without a close frame (RFC 6455 §7.1.5).
ABNORMAL_CLOSURE: Final = 1006


class WsClosed(Exception):
    """The WebSocket is closed or closing; ``code`` is the close code seen
    (from the peer, or the one we sent), 1006 when there was none."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"websocket closed ({code})")


class PrefixedStream(trio.abc.Stream):
    """A stream that first returns ``prefix`` (bytes the front door already
    read) and then reads ``stream``. Writes go straight to ``stream``."""

    __slots__ = ("_prefix", "stream")

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix: bytes | None = prefix or None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        prefix = self._prefix
        if prefix is not None:
            await trio.lowlevel.checkpoint()
            if max_bytes is None or max_bytes >= len(prefix):
                self._prefix = None
                return prefix
            self._prefix = prefix[max_bytes:]
            return prefix[:max_bytes]
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


class _NoHandshake:
    """Stands in for wsproto's finished ``H11Handshake`` after the upgrade:
    ``WSConnection.events()`` still asks it for events; it has none."""

    __slots__ = ()

    def events(self) -> tuple[()]:
        return ()


_NO_HANDSHAKE: Final = _NoHandshake()


def _code(reason: Any) -> int:
    code = getattr(reason, "code", None)
    return code if isinstance(code, int) else ABNORMAL_CLOSURE


class ServerWebSocket:
    """A server-side WebSocket after a successful upgrade."""

    __slots__ = ("_ws",)

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    @classmethod
    async def accept(
        cls,
        nursery: trio.Nursery,
        stream: trio.abc.Stream,
        head: bytes,
        *,
        max_message_size: int,
    ) -> ServerWebSocket:
        """Complete the upgrade whose request ``head`` was already read from
        ``stream``. The library's reader task runs in ``nursery``.

        The caller must bound this with a deadline: a handshake wsproto
        refuses never produces a request. Raises :class:`WsClosed` when the
        peer goes away during the upgrade.
        """
        request = await trio_websocket.wrap_server_stream(
            nursery,
            PrefixedStream(stream, head),
            message_queue_size=_CLIENT_QUEUE,
            max_message_size=max_message_size,
        )
        try:
            ws = await request.accept()
        except _TwConnectionClosed as exc:
            raise WsClosed(_code(exc.reason)) from None
        # Leftovers of the upgrade, never used again (see module docstring).
        ws._wsproto.handshake = _NO_HANDSHAKE  # type: ignore[assignment]
        ws._handshake_headers = ()
        ws._connection_proposal = None
        return cls(ws)

    @property
    def close_code(self) -> int | None:
        """The close code once closing started (ours or the peer's), else None."""
        reason = self._ws.closed
        return None if reason is None else _code(reason)

    async def receive(self) -> str | bytes:
        """The next client message. Raises :class:`WsClosed`."""
        try:
            return await self._ws.get_message()
        except _TwConnectionClosed as exc:
            raise WsClosed(_code(exc.reason)) from None

    async def send_frames(self, data: bytes) -> None:
        """Write ready-made server frames (see :mod:`smapws._core.frames`).

        Raises :class:`WsClosed` when closing has started or the peer is gone.
        """
        ws = self._ws
        async with ws._stream_lock:
            if ws._close_reason is not None:
                raise WsClosed(_code(ws._close_reason))
            try:
                await ws._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await ws._abort_web_socket()
                raise WsClosed(ABNORMAL_CLOSURE) from None

    async def ping(self) -> None:
        """Send a ping and wait for its pong. Raises :class:`WsClosed`."""
        try:
            await self._ws.ping()
        except _TwConnectionClosed as exc:
            raise WsClosed(_code(exc.reason)) from None

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame and wait for the peer's; closes the TCP
        connection in any case. Bound it with a deadline: a peer that never
        answers is waited for until cancelled."""
        await self._ws.aclose(code, reason)

    async def abort(self) -> None:
        """Close the TCP connection now, without a close handshake."""
        with trio.CancelScope(shield=True):
            await self._ws._close_stream()
