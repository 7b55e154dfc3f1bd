"""A loopback TCP proxy for fault tests that can go silent without closing.

:meth:`TcpProxy.freeze` makes every connection stop moving bytes in both
directions (nothing is read, nothing written, no socket is closed): to both
ends the link looks alive and idle, as a half-open link does when the peer's
host vanished or a NAT forgot the flow. New connections are accepted (the
kernel answers the SYN) but are frozen too. :meth:`TcpProxy.freeze_existing`
freezes only the connections open now, so that a client that reconnects gets
a working link. :meth:`TcpProxy.thaw` resumes everything.

Runs in the test's own trio loop::

    proxy = await nursery.start(TcpProxy(redis_port).run)
    url = f"redis://127.0.0.1:{proxy.port}/0"
"""

from __future__ import annotations

import trio

#: Bytes moved per read; small enough that a frozen proxy holds little.
CHUNK = 65536


class _Gate:
    """Open or closed; a pipe waits at a closed gate."""

    def __init__(self, is_open: bool) -> None:
        self._open = trio.Event()
        if is_open:
            self._open.set()

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    async def wait_open(self) -> None:
        # Re-read the event each turn: close() replaces it.
        while not self._open.is_set():
            await self._open.wait()


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``host:target_port``."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.port = 0
        #: Connections accepted so far.
        self.accepted = 0
        self._gates: set[_Gate] = set()
        self._freeze_new = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def freeze(self) -> None:
        """Stop moving bytes on every connection, present and future."""
        self._freeze_new = True
        for gate in self._gates:
            gate.close()

    def freeze_existing(self) -> None:
        """Stop moving bytes on the connections open now; new ones flow."""
        for gate in self._gates:
            gate.close()

    def thaw(self) -> None:
        """Move bytes again everywhere (what was held is delivered)."""
        self._freeze_new = False
        for gate in self._gates:
            gate.open()

    async def run(
        self, *, task_status: trio.TaskStatus[TcpProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on a free loopback port and proxy until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        gate = _Gate(not self._freeze_new)
        self._gates.add(gate)
        try:
            async with client:
                try:
                    with trio.fail_after(5):
                        upstream = await trio.open_tcp_stream(*self.target)
                except (OSError, trio.TooSlowError):
                    return
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, upstream, gate, nursery.cancel_scope)
                    nursery.start_soon(self._pipe, upstream, client, gate, nursery.cancel_scope)
        finally:
            self._gates.discard(gate)

    @staticmethod
    async def _pipe(
        src: trio.SocketStream, dst: trio.SocketStream, gate: _Gate, scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                await gate.wait_open()
                data = await src.receive_some(CHUNK)
                if not data:
                    break
                await gate.wait_open()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            # Either side ending ends the pair, as a real connection would.
            scope.cancel()
