"""The router's cost per delivery, in process: one user with ``--tabs``
WebSockets open (a child process reads them all), ``--messages`` routed to
them with ``App.route`` one after the other, each written by the router
straight into the sockets. Prints the router's CPU time per delivery (its
``route`` calls only; the writes included), best of ``--rounds``::

    .venv/bin/python -m bench.micro_fanout [--tabs 200] [--messages 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import trio
import trio.lowlevel

from smapws._config import load
from smapws._io.server import Server, serve

SECRET = "micro-fanout-bench-secret-0123456789abcdef"

_CLIENT = r"""
import selectors, socket, sys, time
from bench.wsclient import handshake_request
from smapws._core.auth import mint
port, n, secret = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sel = selectors.DefaultSelector()
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    request, _ = handshake_request(
        "127.0.0.1", port, "/ws", mint("fan", key=secret, now=time.time(), ttl=3600)
    )
    s.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if not key.fileobj.recv(1 << 20):
            sys.exit(0)
"""


async def measure(tabs: int, messages: int, rounds: int) -> float:
    env = {
        "SMAPWS_HOST": "127.0.0.1",
        "SMAPWS_PORT": "0",
        "JWT_SECRET": SECRET,
        "SMAPWS_MAX_ACCEPT_RATE": "0",
        "SMAPWS_MAX_CONNECTIONS_PER_USER": str(tabs),
    }
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, load(env))
        client = await trio.lowlevel.open_process(
            [sys.executable, "-c", _CLIENT, str(server.port), str(tabs), SECRET],
            stdout=subprocess.PIPE,
        )
        assert client.stdout is not None
        with trio.fail_after(60):
            while not await client.stdout.receive_some(100):
                pass
            while server.app.hub.active_connections < tabs:
                await trio.sleep(0.05)
        app = server.app
        best = float("inf")
        for r in range(rounds):
            datas = [
                json.dumps({"type": "notification", "payload": {"r": r, "n": i}}).encode()
                for i in range(messages)
            ]
            spent = 0.0
            for data in datas:
                start = time.thread_time()
                app.route(b"user_noti:fan", data, wall_time=time.time(), now=trio.current_time())
                spent += time.thread_time() - start
                await trio.lowlevel.checkpoint()  # the connections' tasks and the client run
            await trio.sleep(0.2)
            best = min(best, spent / (messages * tabs))
        client.kill()
        await client.wait()
        nursery.cancel_scope.cancel()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tabs", type=int, default=200)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    per = trio.run(measure, args.tabs, args.messages, args.rounds)
    print(json.dumps({"tabs": args.tabs, "us_per_delivery": round(per * 1e6, 3)}))


if __name__ == "__main__":
    main()
