"""What routing one broker message costs the router, per message: parse,
id, replay window, current state and the offer to each connection of the
user, as ``App.route`` does them (no socket: the offers queue).

Two cases, alternated in one run: a user with one open tab (its queue taken
after each round, as a writer would), and a user nobody holds on this hub
(parsed, identified and kept in the window all the same). And, alternated
in the same run, the envelope alone: framed once with its id (``parse(...,
message_id=)``) against the way it was built before, framed, then the id
spliced in and framed again (:func:`framed_twice`, a copy of the old code).

    .venv/bin/python -m bench.micro_route
"""

from __future__ import annotations

import json
import statistics
import time

import trio

from smapws import load_config
from smapws._core.envelope import Envelope, parse
from smapws._core.frames import text_frame
from smapws._io.app import App
from smapws._io.brokers.memory import MemoryBroker
from smapws._io.connection import Connection

USERS = 100
MESSAGES = 20_000
ROUNDS = 7


def progress(i: int) -> bytes:
    return json.dumps(
        {
            "type": "project_progress",
            "payload": {
                "project_id": f"proj_{i % 7}",
                "status": "CRAWLING",
                "total": 1000,
                "done": i % 1000,
                "errors": 2,
                "progress_percent": (i % 1000) / 10,
            },
        },
        separators=(",", ":"),
    ).encode()


def framed_twice(raw: bytes, mid: str) -> Envelope:
    """The envelope as the router built it before: ``parse`` then the old
    ``with_id`` (a second envelope and frame)."""
    env = parse(raw, wall_time=1.7e9, received_at=0.0)
    text = env.text
    field = b'"id":"' + mid.encode("ascii") + b'"}'
    if b'"id"' in text:
        obj = json.loads(text)
        if "id" in obj:
            obj["id"] = mid
            body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        else:
            body = text[:-1] + b"," + field
    else:
        body = text[:-1] + b"," + field
    return Envelope(env.type, env.kind, env.key, text_frame(body), env.received_at)


def framed_once(raw: bytes, mid: str) -> Envelope:
    return parse(raw, wall_time=1.7e9, received_at=0.0, message_id=mid)


def envelopes(data: list[bytes]) -> None:
    mid = "0123456789abcdef"
    assert framed_once(data[0], mid).frame == framed_twice(data[0], mid).frame
    results: dict[str, list[float]] = {"framed twice": [], "framed once": []}
    for _ in range(ROUNDS):
        for name, build in (("framed twice", framed_twice), ("framed once", framed_once)):
            start = time.perf_counter()
            for raw in data:
                build(raw, mid)
            results[name].append((time.perf_counter() - start) / len(data) * 1e6)
    twice, once = (statistics.median(r) for r in results.values())
    print(
        f"envelope of a {len(data[0])} B progress message with its id: framed twice "
        f"{twice:.2f} us, framed once {once:.2f} us (once/twice {once / twice:.2f}x)"
    )


async def main() -> None:
    config = load_config({"JWT_SECRET": "x" * 32, "SMAPWS_HISTORY_TTL": "300"})
    app = App(config, MemoryBroker())
    conns = []
    for u in range(USERS):
        conn = Connection(app, f"held{u}", expires_at=None, remote="-", now=0.0)
        app.hub.add(conn.user_id, conn)
        conns.append(conn)
    data = [progress(i) for i in range(MESSAGES)]
    cases = {
        "one tab": [f"user_noti:held{i % USERS}".encode() for i in range(MESSAGES)],
        "no tab": [f"user_noti:free{i % USERS}".encode() for i in range(MESSAGES)],
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    route = app.route
    for _ in range(ROUNDS):
        for name, channels in cases.items():
            wall, now = time.time(), trio.current_time()
            start = time.perf_counter()
            for channel, raw in zip(channels, data, strict=True):
                route(channel, raw, wall_time=wall, now=now)
            results[name].append((time.perf_counter() - start) / MESSAGES * 1e6)
            for conn in conns:
                conn.outbox.take_all()
    envelopes(data)
    for name, runs in results.items():
        print(
            f"route() of a {len(data[0])} B progress message, {name}: "
            f"median {statistics.median(runs):.2f} us/message (min {min(runs):.2f})"
        )


if __name__ == "__main__":
    trio.run(main)
