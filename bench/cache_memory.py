"""What the current-state cache and the replay window really cost per entry
and per user (issue 16), against what they account.

Fills a :class:`~smapws._core.snapshot.Snapshots` and a
:class:`~smapws._core.history.History` the way the router does, for
``--users`` users holding ``--per-user`` messages each (progress of distinct
projects, ~200 bytes published), and measures with tracemalloc what each
holds beyond the frames: per entry, and per user (the difference between one
user holding all entries and every entry its own user). These figures are
the ``ENTRY_OVERHEAD`` / ``USER_OVERHEAD`` constants the bounds count::

    .venv/bin/python -m bench.cache_memory [--entries 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc
from collections.abc import Callable

from smapws._core.envelope import encode_message, parse
from smapws._core.fleet import GENESIS, chain_id
from smapws._core.history import History, HistoryLimits
from smapws._core.snapshot import SnapshotLimits, Snapshots

#: (user, channel, published bytes) of each message.
Published = list[tuple[str, bytes, bytes]]


def progress(i: int) -> bytes:
    return encode_message(
        "project_progress",
        {"project_id": f"proj_{i:06d}", "status": "CRAWLING", "total": 1000, "done": i % 1000},
    )


def measure(
    entries: int, users: int, fill: Callable[[list[tuple[str, bytes, bytes]]], object]
) -> float:
    """Bytes allocated per entry (beyond the frames) when ``entries``
    messages are spread over ``users`` users."""
    published = [
        (f"user-{i % users:07d}", b"user_noti:u%d" % (i % users), progress(i))
        for i in range(entries)
    ]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = fill(published)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    del held
    return used / entries


def fill_snapshots(published: Published) -> Snapshots:
    big = 1 << 62
    s = Snapshots(SnapshotLimits(per_user=big, max_entries=big, per_user_bytes=big, max_bytes=big))
    for n, (user, channel, data) in enumerate(published):
        mid = chain_id(channel, data, GENESIS)
        env = parse(data, wall_time=1.7e9, received_at=n * 1e-6, message_id=mid)
        s.observe(user, env, n * 1e-6)
    return s


def fill_history(published: Published) -> History:
    big = 1 << 62
    h = History(HistoryLimits(per_user=big, max_bytes=big, per_user_bytes=big))
    for n, (user, channel, data) in enumerate(published):
        mid = chain_id(channel, data, GENESIS)
        env = parse(data, wall_time=1.7e9, received_at=n * 1e-6, message_id=mid)
        h.record(user, mid, GENESIS, env, n * 1e-6)
    return h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    args = parser.parse_args()
    n = args.entries
    frame = len(parse(progress(0), wall_time=1.7e9, received_at=0.0, message_id="0" * 16).frame)
    result: dict[str, object] = {"entries": n, "frame_bytes": frame}
    for name, fill in (("snapshot", fill_snapshots), ("history", fill_history)):
        one_user = measure(n, 1, fill)
        own_user = measure(n, n, fill)
        result[name] = {
            "measured_overhead_per_entry": round(one_user - frame),
            "measured_overhead_per_user": round(own_user - one_user),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
