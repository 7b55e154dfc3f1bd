"""Profile one hub under the W1 load with py-spy: where its CPU goes per delivery.

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.profile                      # smapws, 24,000/s, 10 s
    .venv/bin/python -m bench.profile --hub baseline --rate 12000 --seconds 5
    .venv/bin/python -m bench.profile --storm           # handshakes instead

Starts Redis, the hub (pinned to CPU 0 like in ``bench.run``), opens the
connections (2,000 users x 2 tabs), publishes at ``--rate`` deliveries/s and runs
``py-spy record`` on the hub meanwhile (with ``--storm``: closes and reopens
every connection, over and over, instead of publishing). Writes ``<out>/profile-<hub>.txt`` (the
collapsed stacks py-spy records) and prints the functions with the largest share
of samples, inclusive and self, plus the hub's CPU per delivery over the window.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import peers, procs
from bench.loadgen import LoadGen, user_id
from bench.publisher import Publisher
from bench.run import HOST, _choose_cpus, _clean_env, _raise_fd_limit


def summarize(collapsed: Path, top: int) -> str:
    """The ``top`` frames by inclusive and by self share of the samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    lines = [f"{total} samples"]
    for title, counter in (("inclusive", inclusive), ("self", own)):
        lines.append(f"-- {title}")
        for frame, n in counter.most_common(top):
            lines.append(f"{100 * n / max(1, total):5.1f}%  {frame[:150]}")
    return "\n".join(lines)


def _user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--hub", default="smapws", choices=peers.HUBS)
    parser.add_argument("--rate", type=int, default=24000, help="deliveries/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--tabs", type=int, default=2)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--storm", action="store_true", help="profile handshakes")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cpus = _choose_cpus(True)
    _raise_fd_limit(args.users * args.tabs + 1000)
    argv_hub, extra = peers.prepare(args.hub)
    with (
        tempfile.TemporaryDirectory(prefix="smapws-profile-") as tmp,
        procs.pinned_self(cpus[1] if cpus else None),
    ):
        logdir = Path(tmp)
        redis_port, port = procs.free_port(), procs.free_port()
        redis = procs.start_redis(redis_port, logdir / "redis.log")
        secret = os.urandom(24).hex()
        hub = procs.spawn(
            argv_hub,
            logdir / "hub.log",
            env=_clean_env(port, redis_port, secret, extra),
            cpus=cpus[0] if cpus else None,
            cwd=Path(__file__).resolve().parent.parent,
        )
        loadgen = LoadGen(2)
        publisher = Publisher(HOST, redis_port)
        try:
            procs.wait_ready(hub, HOST, port, logdir / "hub.log")
            users = [user_id(i % args.users) for i in range(args.users * args.tabs)]
            speak = peers.protocol(args.hub)
            storm = loadgen.connect(HOST, port, users, secret, protocol=speak, deadline_s=120)
            print(f"{storm.ok} connections open", flush=True)
            publisher.rate(1, args.users, args.rate / args.tabs, 2.0)  # warm up
            out = args.out / f"profile-{args.hub}.txt"
            spy = subprocess.Popen(
                [pyspy, "record", "-p", str(hub.pid), "-d", str(int(args.seconds)),
                 "-r", "200", "-f", "raw", "-o", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            meter = procs.CpuMeter([hub.pid])
            split0 = _user_system(hub.pid)
            t0 = time.monotonic()
            if args.storm:
                handshakes = 0
                while time.monotonic() - t0 < args.seconds:
                    loadgen.close_all()
                    handshakes += loadgen.connect(
                        HOST, port, users, secret, protocol=speak, deadline_s=120
                    ).ok
                cpu = meter.mark()
                what = f"{cpu * 1e6 / max(1, handshakes):.0f} us per handshake (and close)"
            else:
                pub = publisher.rate(2, args.users, args.rate / args.tabs, args.seconds)
                time.sleep(0.5)
                cpu = meter.mark()
                deliveries = pub["published"] * args.tabs
                what = f"{cpu * 1e6 / max(1, deliveries):.1f} us per delivery"
            wall = time.monotonic() - t0
            user, system = (b - a for a, b in zip(split0, _user_system(hub.pid), strict=True))
            spy.wait(args.seconds + 30)
            print(
                f"hub CPU split: {100 * user / max(1e-9, user + system):.0f} % user, "
                f"{100 * system / max(1e-9, user + system):.0f} % system (kernel)"
            )
            print(
                f"hub CPU {100 * cpu / wall:.0f} % over {wall:.1f} s, {what} "
                "(profiler attached: figures run high)"
            )
            print(summarize(out, args.top))
            print(f"stacks: {out}")
        finally:
            publisher.shutdown()
            loadgen.shutdown()
            procs.stop(hub)
            procs.stop(redis)
    return 0


if __name__ == "__main__":
    sys.exit(main())
