"""Memory of the replay window per user at the defaults (issue 9's figure).

Fills a :class:`smapws._core.history.History` with the default limits the way
the router does (parse, id, record) for ``--users`` users with a full window
each (``SMAPWS_HISTORY_PER_USER`` = 100 messages of the seed's shapes: progress
of three projects, completions, notifications, alerts; ~150-250 bytes
published), and measures with tracemalloc what the window holds: bytes per
user, per message, and against the window's own accounting
(``websocket_history_bytes``, which the ``SMAPWS_HISTORY_MAX_BYTES`` bound
applies to)::

    .venv/bin/python -m bench.history_memory [--users 1000]
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc

from smapws._core.envelope import encode_message, parse
from smapws._core.fleet import Chains, chain_id
from smapws._core.history import ENTRY_OVERHEAD, History, HistoryLimits


def seed_message(i: int) -> bytes:
    kind = i % 10
    if kind < 6:
        return encode_message(
            "project_progress",
            {
                "project_id": f"proj_{i % 3:04d}",
                "status": "CRAWLING",
                "total": 1000,
                "done": i * 7 % 1000,
                "errors": i % 5,
                "progress_percent": round(i * 7 % 1000 / 10, 2),
            },
        )
    if kind < 7:
        return encode_message(
            "project_completed",
            {
                "project_id": f"proj_{i % 3:04d}",
                "status": "DONE",
                "total": 1000,
                "done": 1000,
                "errors": 3,
                "progress_percent": 100.0,
            },
        )
    if kind < 9:
        return encode_message(
            "notification",
            {"title": "New Comment", "message": f"Someone commented on post {i}", "level": "info"},
        )
    quota = {"title": "Quota", "message": f"{i % 100}% of the quota used", "severity": "warning"}
    return encode_message("alert", quota)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    args = parser.parse_args()
    limits = HistoryLimits()  # the defaults: 300 s, 100 per user, 32 MiB
    per_user = limits.per_user
    # Build the published bytes first: they are the broker's, not the window's.
    published = [
        (f"u{u}", b"user_noti:u%d" % u, seed_message(u * per_user + i))
        for i in range(per_user)
        for u in range(args.users)
    ]
    size = sum(len(d) for _, _, d in published) / len(published)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    history = History(HistoryLimits(ttl=limits.ttl, per_user=per_user, max_bytes=1 << 62))
    chains = Chains(None, floor_wall=0.0)
    for n, (user, channel, data) in enumerate(published):
        now = n * 1e-6  # all within the TTL
        prev = chains.last(user)
        mid = chain_id(channel, data, prev)
        chains.advance(user, mid, now)
        env = parse(data, wall_time=1.7e9, received_at=now, message_id=mid)
        history.record(user, mid, prev, env, now)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    entries = len(history)
    frames = history.bytes - entries * ENTRY_OVERHEAD
    result = {
        "users": args.users,
        "messages_per_user": per_user,
        "published_bytes_avg": round(size, 1),
        "frame_bytes_avg": round(frames / entries, 1),
        "measured_bytes_per_user": round(used / args.users),
        "measured_bytes_per_message": round(used / entries),
        "measured_overhead_per_message": round((used - frames) / entries),
        "accounted_bytes_per_user": round(history.bytes / args.users),
        "users_with_a_full_window_in_the_default_bound": limits.max_bytes
        // (history.bytes // args.users),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
