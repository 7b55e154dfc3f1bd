"""Soak: a hub under connection churn and traffic at half its measured capacity
for a long time, watched for growth (issue 16)::

    .venv/bin/python -m bench.soak                  # 30 minutes, 2,000 tabs
    .venv/bin/python -m bench.soak --minutes 5 --tabs 500

One ``smapws serve`` on a throw-away ``redis-server`` (defaults, but the accept
rate unbounded), ``--tabs`` WebSockets of ``--tabs / 2`` users opened by client
processes (``--workers``; a process holds at most 20,000 files). Then:

1. **Capacity**: for ``CALIBRATE_S`` the publisher sends as fast as the hub
   reads (pipelined, waiting on ``websocket_broker_messages_received_total``),
   with every tab connected and no churn; capacity is the deliveries per
   second the tabs received.
2. **Soak**, for ``--minutes``: messages to random users at half that
   capacity, and every tab closes after a random lifetime (exponential, mean
   ``--lifetime`` s) and reconnects at once with ``?since=`` the id of the
   last message it received (a resume). Every ``SAMPLE_S`` the hub's RSS
   (``VmRSS``), open descriptors (``/proc/PID/fd``), trio tasks
   (``websocket_tasks``) and connections are sampled with the tabs' counters.

Each message carries the user's sequence number; a tab counts a **gap** when
one is missing without a ``resync`` before it (a message lost that nobody was
told about), and a **duplicate** when one comes twice. The run **fails** (exit
status 1) when a gap is counted or when RSS, descriptors or tasks keep growing
after the warm-up (the first 5 minutes, or the first third of a shorter run):
a series keeps growing when both its least-squares slope over the samples
after the warm-up would add more than the margin over the rest of the run,
and the median of the last third of those samples exceeds the median of the
first third by more than the margin. Margins: RSS 5 % (at least 4 MiB),
descriptors and tasks 5 % (at least 50): churn moves the last two by the tabs
that are between a close and their reconnect.

Writes ``bench/results/soak-<UTC stamp>.json`` (every sample) and prints a
table. Not in CI (it runs for half an hour); ``tests/test_bench_smoke.py``
runs it for seconds so that it cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bench.procs import BENCH_SECRET, hub_on_redis, metric_value, rss_bytes

SAMPLE_S = 10.0
CALIBRATE_S = 10.0
WARMUP_S = 300.0
RESULTS = Path(__file__).parent / "results"

#: What "keeps growing" allows (see the module docstring): relative, absolute.
MARGINS: dict[str, tuple[float, float]] = {
    "rss_MiB": (0.05, 4.0),
    "fds": (0.05, 50.0),
    "tasks": (0.05, 50.0),
}


# -- the client processes ----------------------------------------------------------


def _client_main(
    ctl: multiprocessing.connection.Connection,
    port: int,
    users: list[str],
    lifetime_s: float,
) -> None:
    """One client process: a tab per entry of ``users``, run with trio."""
    import trio

    from bench.wsclient import (
        OP_CLOSE,
        OP_PING,
        OP_PONG,
        OP_TEXT,
        ProtocolError,
        client_frame,
        handshake_request,
        parse_frames,
        parse_handshake_response,
    )
    from smapws._core.auth import mint

    stats = {
        "connects": 0,
        "resumes": 0,
        "refused": 0,
        "errors": 0,
        "received": 0,
        "resyncs": 0,
        "gaps": 0,
        "duplicates": 0,
        "server_closes": 0,
    }
    churn = {"on": False, "stop": False}

    def token(user: str) -> str:
        return mint(user, key=BENCH_SECRET, now=time.time(), ttl=24 * 3600)

    async def tab(user: str) -> None:
        since: str | None = None
        last: int | None = None  # the user's sequence number last seen
        while not churn["stop"]:
            path = "/ws" + (f"?since={since}" if since else "")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                stats["errors"] += 1
                await trio.sleep(1 + random.random())
                continue
            try:
                request, accept = handshake_request("127.0.0.1", port, path, token(user))
                with trio.fail_after(10):
                    await stream.send_all(request)
                    buf = b""
                    while b"\r\n\r\n" not in buf:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            raise ProtocolError("closed during the handshake")
                        buf += chunk
                end = buf.index(b"\r\n\r\n")
                if parse_handshake_response(buf[:end], accept) != 101:
                    stats["refused"] += 1
                    await trio.sleep(1 + random.random())
                    continue
                stats["connects"] += 1
                stats["resumes"] += since is not None
                buf = buf[end + 4 :]
                life = random.expovariate(1 / lifetime_s) if churn["on"] else float("inf")
                deadline = trio.current_time() + life
                closed_by_server = False
                while True:
                    if churn["on"] and deadline == float("inf"):
                        deadline = trio.current_time() + random.expovariate(1 / lifetime_s)
                    # Only the read may be cut short (by the lifetime, or each
                    # second to look at the churn switch): frames read are
                    # always handled in full, or they would count as gaps.
                    chunk = None
                    with trio.move_on_at(min(deadline, trio.current_time() + 1)):
                        chunk = await stream.receive_some(65536)
                    if chunk == b"":
                        closed_by_server = True
                        break
                    if chunk:
                        frames, buf = parse_frames(buf + chunk)
                        for _fin, op, payload in frames:
                            if op == OP_TEXT:
                                msg = json.loads(payload)
                                if msg.get("type") == "resync":
                                    stats["resyncs"] += 1
                                    last = None
                                    continue
                                mark = msg.get("payload", {}).get("soak")
                                if mark is None:
                                    continue
                                stats["received"] += 1
                                seq = int(mark)
                                if last is not None:
                                    if seq <= last:
                                        stats["duplicates"] += 1
                                        continue
                                    stats["gaps"] += seq - last - 1
                                last = seq
                                since = msg.get("id") or since
                            elif op == OP_PING:
                                await stream.send_all(client_frame(OP_PONG, payload))
                            elif op == OP_CLOSE:
                                closed_by_server = True
                        if closed_by_server:
                            break
                    if trio.current_time() >= deadline or churn["stop"]:
                        break
                if closed_by_server:
                    stats["server_closes"] += 1
                else:
                    with trio.move_on_after(2):
                        await stream.send_all(client_frame(OP_CLOSE, b"\x03\xe8"))
            except (OSError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError):
                stats["errors"] += 1
                await trio.sleep(random.random())
            finally:
                await stream.aclose()

    async def control() -> None:
        while True:
            cmd = await trio.to_thread.run_sync(ctl.recv)
            if cmd == "stats":
                ctl.send(dict(stats))
            elif cmd == "churn":
                churn["on"] = True
                ctl.send("ok")
            elif cmd == "quit":
                churn["stop"] = True
                ctl.send("bye")
                return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for user in users:
                nursery.start_soon(tab, user)
                await trio.sleep(0.002)  # 500 handshakes/s per process at most
            await control()
            nursery.cancel_scope.cancel()

    trio.run(main)


class Clients:
    def __init__(self, port: int, users: list[str], workers: int, lifetime_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._procs: list[Any] = []
        for i in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_client_main,
                args=(child, port, users[i::workers], lifetime_s),
                daemon=True,
            )
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)

    def _all(self, cmd: str) -> list[Any]:
        for pipe in self._pipes:
            pipe.send(cmd)
        return [pipe.recv() for pipe in self._pipes]

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self._all("stats"):
            for k, v in s.items():
                total[k] = total.get(k, 0) + v
        return total

    def start_churn(self) -> None:
        self._all("churn")

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._all("quit")
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


# -- the publisher -------------------------------------------------------------------


class Publisher:
    """Messages to random users: ``{"type": "notification", "payload":
    {"soak": <the user's sequence number>}}`` (each user's own sequence)."""

    def __init__(self, redis_port: int, users: list[str]) -> None:
        self._client = redis.Redis(port=redis_port)
        self._users = users
        self._seq = dict.fromkeys(users, 0)
        self.published = 0
        self._paced = 0

    def batch(self, n: int) -> None:
        pipe = self._client.pipeline(transaction=False)
        for _ in range(n):
            user = random.choice(self._users)
            self._seq[user] += 1
            body = {"type": "notification", "payload": {"soak": self._seq[user], "pad": "x" * 120}}
            pipe.publish(f"user_noti:{user}", json.dumps(body))
        pipe.execute()
        self.published += n

    def paced(self, rate: float, stop: threading.Event) -> None:
        """``rate`` messages a second, in batches every 50 ms, until ``stop``."""
        start = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate) - self._paced
            if due > 0:
                self.batch(due)
                self._paced += due
            stop.wait(0.05)


# -- the verdict ---------------------------------------------------------------------


def growing(name: str, times: list[float], values: list[float]) -> tuple[bool, dict[str, float]]:
    """Whether a series keeps growing (the module docstring's rule)."""
    if len(values) < 6:
        return False, {"samples": len(values)}
    n = len(values)
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    var_t = sum((t - mean_t) ** 2 for t in times)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True)) / var_t
    third = max(2, n // 3)
    first, last = statistics.median(values[:third]), statistics.median(values[-third:])
    rel, floor = MARGINS[name]
    margin = max(rel * first, floor)
    span = times[-1] - times[0]
    grows = slope * span > margin and last - first > margin
    return grows, {
        "slope_per_hour": round(slope * 3600, 2),
        "first_third_median": first,
        "last_third_median": last,
        "margin": round(margin, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--tabs", type=int, default=2000)
    parser.add_argument("--lifetime", type=float, default=60.0, help="mean tab lifetime, s")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--rate", type=float, default=0.0, help="published msg/s (0: measure)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    users = [f"soak-{i}" for i in range(max(1, args.tabs // 2))]
    tab_users = [u for u in users for _ in range(2)][: args.tabs]
    duration = args.minutes * 60
    warmup = min(WARMUP_S, duration / 3)
    sample_s = min(SAMPLE_S, max(1.0, duration / 12))
    result: dict[str, Any] = {
        "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tabs": args.tabs,
        "users": len(users),
        "lifetime_s": args.lifetime,
        "minutes": args.minutes,
        "load_average_start": os.getloadavg(),
    }
    with (
        tempfile.TemporaryDirectory(prefix="smapws-soak-") as d,
        hub_on_redis(Path(d), {"SMAPWS_MAX_ACCEPT_RATE": "0"}) as (redis_port, hub_port, hub),
    ):
        clients = Clients(hub_port, tab_users, args.workers, args.lifetime)
        try:
            t0 = time.monotonic()
            while metric_value(hub_port, "websocket_active_connections") < args.tabs:
                if time.monotonic() - t0 > 120:
                    raise SystemExit("the tabs did not all connect within 120 s")
                time.sleep(0.2)
            result["connect_s"] = round(time.monotonic() - t0, 1)
            publisher = Publisher(redis_port, users)
            rate = args.rate
            if rate <= 0:
                # Capacity: as fast as the hub reads, for CALIBRATE_S.
                got0 = clients.stats()["received"]
                read0 = metric_value(hub_port, "websocket_broker_messages_received_total")
                calibrate = min(CALIBRATE_S, max(2.0, duration / 10))
                start = time.monotonic()
                sent = 0
                while time.monotonic() - start < calibrate:
                    publisher.batch(200)
                    sent += 200
                    while (
                        metric_value(hub_port, "websocket_broker_messages_received_total")
                        < read0 + sent - 400
                    ):
                        time.sleep(0.005)
                time.sleep(1)
                took = time.monotonic() - start
                deliveries = (clients.stats()["received"] - got0) / took
                result["capacity_deliveries_per_s"] = round(deliveries)
                rate = deliveries / 2 / (args.tabs / len(users))
            result["rate_published_per_s"] = round(rate, 1)
            clients.start_churn()
            stop = threading.Event()
            pub = threading.Thread(target=publisher.paced, args=(rate, stop), daemon=True)
            pub.start()
            samples: list[dict[str, Any]] = []
            start = time.monotonic()
            next_sample = start
            print(f"soak: {rate:.0f} msg/s, {len(users)} users, {args.tabs} tabs, {duration:.0f} s")
            while True:
                now = time.monotonic()
                if now - start > duration:
                    break
                if now >= next_sample:
                    row = {
                        "t_s": round(now - start, 1),
                        "rss_MiB": round(rss_bytes(hub.pid) / (1 << 20), 1),
                        "fds": len(os.listdir(f"/proc/{hub.pid}/fd")),
                        "tasks": metric_value(hub_port, "websocket_tasks"),
                        "connections": metric_value(hub_port, "websocket_active_connections"),
                        "published": publisher.published,
                        **clients.stats(),
                    }
                    samples.append(row)
                    print(
                        f"  {row['t_s']:7.0f} s  rss {row['rss_MiB']:6.1f} MiB  fds {row['fds']:5d}"
                        f"  tasks {row['tasks']:6.0f}  conns {row['connections']:5.0f}"
                        f"  connects {row['connects']:6d}  received {row['received']:8d}"
                        f"  gaps {row['gaps']}",
                        flush=True,
                    )
                    next_sample += sample_s
                time.sleep(max(0.0, min(next_sample, start + duration) - time.monotonic()))
            stop.set()
            pub.join()
            time.sleep(2)  # the last messages in flight
            final = clients.stats()
        finally:
            clients.stop()
    after = [s for s in samples if s["t_s"] >= warmup]
    verdict: dict[str, Any] = {}
    failed = final["gaps"] > 0
    for name in MARGINS:
        grows, detail = growing(name, [s["t_s"] for s in after], [float(s[name]) for s in after])
        verdict[name] = {"keeps_growing": grows, **detail}
        failed |= grows
    first = samples[0]
    result.update(
        samples=samples,
        final=final,
        published=publisher.published,
        churn_per_s=round((final["connects"] - first["connects"]) / duration, 1),
        verdict=verdict,
        warmup_s=warmup,
        load_average_end=os.getloadavg(),
        passed=not failed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("soak-%Y%m%d-%H%M%S.json", time.gmtime())
    path.write_text(json.dumps(result, indent=1))
    at_warmup = after[0] if after else samples[-1]
    last = samples[-1]
    print(f"\nafter warm-up ({warmup:.0f} s) -> end ({last['t_s']:.0f} s):")
    for name in MARGINS:
        v = verdict[name]
        print(
            f"  {name:8s} {at_warmup[name]:>8} -> {last[name]:>8}"
            f"  slope/h {v.get('slope_per_hour')}  keeps growing: {v['keeps_growing']}"
        )
    print(
        f"  published {publisher.published}, received {final['received']}, connects "
        f"{final['connects']} ({result['churn_per_s']}/s, {final['resumes']} resumes), resyncs "
        f"{final['resyncs']}, gaps {final['gaps']}, duplicates {final['duplicates']}, "
        f"refused {final['refused']}, errors {final['errors']}"
    )
    print(f"{'PASS' if not failed else 'FAIL'}: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
