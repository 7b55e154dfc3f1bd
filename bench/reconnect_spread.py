"""How 1,000 browser tabs come back after a hub drains (issue 9's figure).

Half real, half simulated, and it says which:

- **Real**: a hub (defaults: ``SMAPWS_DRAIN_TIMEOUT=30``, ``SMAPWS_WRITE_WAIT=10``)
  with 1,000 open WebSocket connections is drained; the time each client
  receives its 1001 close frame is recorded.
- **Simulated**: each client's reconnect delay is drawn by smapws-client.js's
  own ``backoffDelay(0)`` (full jitter, 0.5 s cap), executed in headless
  Chromium; the reconnect time is close time + delay. (1,000 real browser
  sockets from one Chromium is beyond its per-profile socket limit.)

Prints the spread of the reconnects (first to last), the busiest second and
100 ms, against two references: the hub closing everything at once (no drain
spread), and the seed's client (a fixed 3 s delay)::

    .venv/bin/python -m bench.reconnect_spread [--clients 1000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import trio

from bench.wsclient import handshake_request, parse_frames, parse_handshake_response
from smapws import Server, load_config, serve
from smapws._core.auth import mint

SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
CLIENT_JS = Path(__file__).resolve().parent.parent / "smapws" / "static" / "smapws-client.js"


def draw_delays(n: int) -> list[float]:
    """``n`` draws of the client's first reconnect delay (ms), in Chromium."""
    from tests.browser import chromium

    with chromium() as browser:
        page = browser.new_page()
        delays: list[float] = page.evaluate(
            """async ([src, n]) => {
                const url = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
                const { backoffDelay } = await import(url);
                return Array.from({ length: n }, () => backoffDelay(0));
            }""",
            [CLIENT_JS.read_text(), n],
        )
    return delays


async def close_times(n: int) -> tuple[float, list[float]]:
    """Drain a hub holding ``n`` connections; each client's close time (s)
    after the drain started."""
    config = load_config(
        {
            "SMAPWS_HOST": "127.0.0.1",
            "SMAPWS_PORT": "0",
            "JWT_SECRET": SECRET,
            "SMAPWS_MAX_ACCEPT_RATE": "0",
            "SMAPWS_MAX_ACCEPT_RATE_PER_USER": "0",
            "SMAPWS_MAX_PENDING_PER_ADDRESS": "0",
            "SMAPWS_LOG_LEVEL": "warning",
        }
    )
    closes: list[float] = []
    started = trio.Event()
    t0 = 0.0

    async def tab(server: Server, i: int) -> None:
        token = mint(f"u{i}", key=SECRET, now=time.time())
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            request, accept = handshake_request("127.0.0.1", server.port, "/ws", token)
            await stream.send_all(request)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(4096)
            head, _, buf = buf.partition(b"\r\n\r\n")
            assert parse_handshake_response(head, accept) == 101
            while True:
                frames, buf = parse_frames(buf)
                if any(op == 0x8 for _, op, _ in frames):
                    await started.wait()
                    closes.append(trio.current_time() - t0)
                    return
                chunk = await stream.receive_some(4096)
                if not chunk:
                    raise AssertionError("closed without a close frame")
                buf += chunk

    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, config)
        async with trio.open_nursery() as tabs:
            for i in range(n):
                tabs.start_soon(tab, server, i)
            while server.app.hub.active_connections < n:
                await trio.sleep(0.05)
            t0 = trio.current_time()
            started.set()
            server.drain()
    window = config.drain_timeout - config.write_wait - 1
    return window, sorted(closes)


def spread(times: list[float]) -> dict[str, float]:
    """First-to-last span and the busiest 1 s and 100 ms windows (arrivals)."""
    times = sorted(times)

    def busiest(width: float) -> int:
        best, j = 0, 0
        for i, t in enumerate(times):
            while times[j] < t - width:
                j += 1
            best = max(best, i - j + 1)
        return best

    return {
        "first_s": round(times[0], 3),
        "last_s": round(times[-1], 3),
        "span_s": round(times[-1] - times[0], 3),
        "busiest_1s": busiest(1.0),
        "busiest_100ms": busiest(0.1),
        "median_s": round(times[len(times) // 2], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args()
    delays = [d / 1000 for d in draw_delays(args.clients)]
    window, closes = trio.run(close_times, args.clients)
    result: dict[str, Any] = {
        "clients": args.clients,
        "drain_window_s": window,
        "closes (real hub)": spread(closes),
        "reconnects: drain spread + smapws-client backoff": spread(
            [c + d for c, d in zip(closes, delays, strict=True)]
        ),
        "reconnects: all closed at once + smapws-client backoff": spread(delays),
        "reconnects: all closed at once + the seed's fixed 3 s": spread([3.0] * args.clients),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
