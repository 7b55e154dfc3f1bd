"""Issue 16, point 1: the current-state cache and the replay window are
bounded in bytes that count what they really cost, with per-user shares, so
that traffic to one user or to unused ids cannot evict everyone else's
recovery. Sans-IO; real memory is measured with tracemalloc."""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

from smapws._core.envelope import Envelope, parse
from smapws._core.fleet import GENESIS, Chains, chain_id
from smapws._core.history import History, HistoryLimits, Resume
from smapws._core.snapshot import SnapshotLimits, Snapshots

#: A legal project_progress near SMAPWS_MAX_MESSAGE_BYTES (the issue's flood).
PAD = 60_000


def progress(project: str, pad: int = 0, n: int = 0) -> bytes:
    payload = {"project_id": project, "done": n, "pad": "x" * pad}
    return json.dumps({"type": "project_progress", "payload": payload}).encode()


def note(n: int) -> bytes:
    return json.dumps({"type": "notification", "payload": {"n": n}}).encode()


def envelope(data: bytes, now: float = 0.0, mid: str | None = None) -> Envelope:
    return parse(data, wall_time=1.7e9, received_at=now, max_bytes=1 << 20, message_id=mid)


def allocated(fill: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes ``fill()``'s result keeps allocated (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = fill()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(s.size_diff for s in after.compare_to(before, "filename")), kept


class Window:
    """What the router does with one History."""

    def __init__(self, **limits: Any) -> None:
        self.history = History(HistoryLimits(**limits))
        self.chains = Chains(None, floor_wall=0.0)

    def route(self, user: str, data: bytes, now: float) -> str:
        channel = b"user_noti:" + user.encode()
        prev = self.chains.last(user)
        mid = chain_id(channel, data, prev)
        self.chains.advance(user, mid, now)
        self.history.record(user, mid, prev, envelope(data, now, mid), now)
        return mid

    def after(self, user: str, since: str, now: float) -> list[int] | None:
        missed = self.history.after(user, Resume(since), now)
        return None if missed is None else [json.loads(e.text)["payload"]["n"] for e in missed]


# -- the current-state cache ------------------------------------------------


def test_snapshot_flood_of_60kb_progress_to_distinct_users_stays_in_its_byte_bound() -> None:
    bound = 4 * 1024 * 1024
    limits = SnapshotLimits(max_bytes=bound)
    data = [envelope(progress("p", PAD, i)) for i in range(300)]  # 18 MB published

    def fill() -> Snapshots:
        snaps = Snapshots(limits)
        for i, env in enumerate(data):
            snaps.observe(f"user-{i}", env, now=float(i))
        return snaps

    used, snaps = allocated(fill)
    assert snaps.bytes <= bound
    # What the cache holds really costs no more than it accounts (the frames
    # are shared with `data`, so count them in).
    held = sum(len(e.frame) for i in range(300) for e in snaps.for_user(f"user-{i}", 300.0))
    assert used + held <= snaps.bytes
    assert snaps.for_user("user-299", 300.0)  # the newest survives


def test_one_users_state_is_capped_and_cannot_evict_others() -> None:
    snaps = Snapshots(SnapshotLimits(per_user_bytes=512 * 1024, max_bytes=2 * 1024 * 1024))
    bystander = envelope(progress("mine", 10))
    snaps.observe("bystander", bystander, now=0.0)
    for i in range(100):  # 6 MB of one user's progress, 100 projects
        snaps.observe("mallory", envelope(progress(f"p{i}", PAD)), now=1.0 + i)
    assert snaps.user_bytes("mallory") <= 512 * 1024
    # Capped, not refused: mallory keeps her newest projects, up to her share.
    kept = [json.loads(e.text)["payload"]["project_id"] for e in snaps.for_user("mallory", 200.0)]
    assert kept and kept == [f"p{i}" for i in range(100 - len(kept), 100)], kept
    assert snaps.user_bytes("mallory") > 512 * 1024 - 2 * PAD
    assert snaps.for_user("bystander", 200.0) == [bystander]


def test_a_flood_to_unused_ids_cannot_evict_a_held_users_state() -> None:
    snaps = Snapshots(SnapshotLimits(ttl=600.0, max_bytes=2 * 1024 * 1024))
    mine = envelope(progress("mine", 10))
    snaps.hold("alice")  # her tab is open here
    snaps.observe("alice", mine, now=0.0)
    snaps.release("alice", 1.0)  # ... and reloads
    for i in range(300):  # 18 MB to 300 ids nobody uses
        snaps.observe(f"nobody-{i}", envelope(progress("p", PAD, i)), now=2.0 + i)
    assert snaps.bytes <= 2 * 1024 * 1024
    assert snaps.for_user("alice", 400.0) == [mine]
    # Once her hold has ended (600 s after the reload), she is one of the others.
    snaps.observe("alice", mine, now=500.0)
    snaps.sweep(601.0)
    assert snaps.held() == 0
    for i in range(300, 340):
        snaps.observe(f"nobody-{i}", envelope(progress("p", PAD, i)), now=601.0 + i)
    assert snaps.for_user("alice", 700.0) == []


def test_a_single_message_over_the_user_share_is_not_kept() -> None:
    snaps = Snapshots(SnapshotLimits(per_user_bytes=32 * 1024))
    snaps.observe("u", envelope(progress("p", 10, 1)), now=0.0)
    snaps.observe("u", envelope(progress("p", PAD, 2)), now=1.0)
    assert snaps.for_user("u", 2.0) == [] and snaps.bytes == 0 and len(snaps) == 0


# -- the replay window --------------------------------------------------------


def test_the_windows_byte_count_includes_per_user_bookkeeping() -> None:
    """The issue: 120,000 users holding one message each cost 88 MB for a
    32 MiB bound. What is held must cost no more than what is counted."""
    data = [(f"user-{i:06d}", note(i)) for i in range(20_000)]
    # Ids first; each envelope is the window's (parsed as the router does).
    mids = [chain_id(b"user_noti:" + u.encode(), d, GENESIS) for u, d in data]

    def fill() -> History:
        h = History(HistoryLimits(max_bytes=1 << 40))
        for i, (user, d) in enumerate(data):
            now = float(i) * 1e-3
            h.record(user, mids[i], GENESIS, envelope(d, now, mids[i]), now)
        return h

    used, history = allocated(fill)
    assert used <= history.bytes, (used, history.bytes)


def test_one_users_flood_cannot_take_the_others_windows() -> None:
    w = Window(max_bytes=4 * 1024 * 1024, per_user_bytes=1024 * 1024)
    first = w.route("bystander", note(0), 0.0)
    w.route("bystander", note(1), 0.5)
    for i in range(100):  # 6 MB to one user
        w.route("mallory", progress(f"p{i}", PAD), 1.0 + i * 0.01)
    assert w.history.user_bytes("mallory") <= 1024 * 1024
    # Capped, not refused: her window holds her newest messages, up to her share.
    kept = [
        json.loads(e.text)["payload"]["project_id"] for _, _, e in w.history.chain("mallory", 3.0)
    ]
    assert kept and kept == [f"p{i}" for i in range(100 - len(kept), 100)], kept
    assert w.history.user_bytes("mallory") > 1024 * 1024 - 2 * PAD
    assert w.after("bystander", first, 3.0) == [1]


def test_a_flood_to_unused_ids_cannot_evict_a_held_users_window() -> None:
    """The issue: 60,000 tiny messages to ids nobody uses evicted a real
    user's window, so its tab resuming from 3 s earlier got history_gap."""
    w = Window(max_bytes=2 * 1024 * 1024)
    w.history.hold("alice")  # her tab is open here
    first = w.route("alice", note(0), 0.0)
    w.history.release("alice", 0.5)  # ... and drops
    for i in range(10_000):  # ~17 MB accounted to 10,000 unused ids
        w.route(f"nobody-{i}", note(i), 1.0 + i * 1e-4)
    w.route("alice", note(1), 2.5)
    assert w.history.bytes <= 2 * 1024 * 1024
    assert w.after("alice", first, 3.0) == [1]  # resumes, no gap
    # Unused ids evicted each other, oldest first.
    assert w.history.users() < 10_000


def test_a_hold_ends_ttl_after_the_last_tab_closed() -> None:
    w = Window(ttl=10.0, max_bytes=64 * 1024)
    w.history.hold("alice")
    first = w.route("alice", note(0), 5.0)
    w.route("alice", note(1), 5.1)
    w.history.release("alice", 1.0)
    w.history.sweep(10.5)
    assert w.history.held() == 1  # held until 11
    w.history.sweep(11.0)  # her messages are younger than the ttl: kept
    assert w.history.held() == 0 and w.after("alice", first, 11.0) == [1]
    for i in range(200):  # the total bound is passed: her window is the oldest cold one
        w.route(f"nobody-{i}", note(i), 11.0 + i * 1e-3)
    assert w.after("alice", first, 11.5) is None
