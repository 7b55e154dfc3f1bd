"""A small TCP load balancer in front of several hubs, for rolling-restart tests.

As a Kubernetes Service with readiness probes does it: every
:data:`PROBE_INTERVAL` it asks each backend's ``/ready``; a new connection
goes to the next ready backend, round robin (to any backend when none is
ready), and a backend that refuses the TCP connection is skipped. Bytes are
then piped both ways until either side closes. Loopback only.

Run as a process (the browser tests drive it from synchronous code)::

    python -m tests.tcpbalancer 8001 8002     # prints "listening <port>"

Backends come and go as a Service's endpoints do during a rolling update:
a line ``add <port>`` or ``remove <port>`` on standard input changes the set
for new connections (open ones stay piped), answered with ``ok``.
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Final

import trio

PROBE_INTERVAL: Final = 0.1
PROBE_TIMEOUT: Final = 0.5
CONNECT_TIMEOUT: Final = 2.0
CHUNK: Final = 65536


class Balancer:
    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.ready: set[int] = set()
        self._turn = itertools.count()

    async def probe_forever(self) -> None:
        while True:
            async with trio.open_nursery() as nursery:
                for port in self.backends:
                    nursery.start_soon(self._probe, port)
            await trio.sleep(PROBE_INTERVAL)

    async def _probe(self, port: int) -> None:
        ok = False
        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(b"GET /ready HTTP/1.1\r\nHost: lb\r\n\r\n")
                    head = await stream.receive_some(64)
                    ok = head.startswith(b"HTTP/1.1 200")
            except (OSError, trio.BrokenResourceError):
                ok = False
        if ok:
            self.ready.add(port)
        else:
            self.ready.discard(port)

    def _order(self) -> list[int]:
        """Backends to try for the next connection: ready ones first, from
        the next in turn."""
        n = next(self._turn)
        rotated = [self.backends[(n + i) % len(self.backends)] for i in range(len(self.backends))]
        return [p for p in rotated if p in self.ready] + [p for p in rotated if p not in self.ready]

    async def handle(self, client: trio.SocketStream) -> None:
        async with client:
            for port in self._order():
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        upstream = await trio.open_tcp_stream("127.0.0.1", port)
                except (OSError, trio.TooSlowError):
                    continue
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(_pipe, upstream, client, nursery.cancel_scope)
                return


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while data := await src.receive_some(CHUNK):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        scope.cancel()  # either side ending ends the pair


async def control(balancer: Balancer) -> None:
    """``add <port>`` / ``remove <port>`` lines on standard input."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buf = b""
    while data := await stdin.receive_some(CHUNK):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            verb, _, arg = line.decode().partition(" ")
            port = int(arg)
            if verb == "add" and port not in balancer.backends:
                balancer.backends.append(port)
            elif verb == "remove" and port in balancer.backends:
                balancer.backends.remove(port)
                balancer.ready.discard(port)
            print("ok", flush=True)


async def main(backends: list[int]) -> None:
    balancer = Balancer(backends)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(balancer.probe_forever)
        nursery.start_soon(trio.serve_listeners, balancer.handle, listeners)
        nursery.start_soon(control, balancer)
        print(f"listening {port}", flush=True)


if __name__ == "__main__":
    trio.run(main, [int(p) for p in sys.argv[1:]])
