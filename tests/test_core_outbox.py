"""The delivery policy of a connection's send queue (sans-IO, no trio)."""

from __future__ import annotations

import json
from itertools import count

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smapws._core.envelope import Envelope, parse
from smapws._core.outbox import (
    CONFLATED,
    HIGH_WATER,
    OVERFLOW,
    QUEUED,
    Outbox,
    OutboxLimits,
    QueueBudget,
)
from smapws._core.snapshot import SnapshotLimits, Snapshots

_seq = count()


def msg(mtype: str, project: str | None = None, pad: int = 0) -> Envelope:
    payload: dict[str, object] = {"seq": next(_seq)}
    if project is not None:
        payload["project_id"] = project
    if pad:
        payload["pad"] = "x" * pad
    raw = json.dumps({"type": mtype, "payload": payload}).encode()
    return parse(raw, wall_time=0, received_at=0)


def progress(project: str, pad: int = 0) -> Envelope:
    return msg("project_progress", project, pad)


def completed(project: str) -> Envelope:
    return msg("project_completed", project)


def note(pad: int = 0) -> Envelope:
    return msg("notification", pad=pad)


def test_kinds_and_keys() -> None:
    assert (progress("p1").kind, progress("p1").key) == (1, "p1")
    assert (completed("p1").kind, completed("p1").key) == (2, "p1")
    assert (note().kind, note().key) == (0, None)
    # Progress without a project id cannot be conflated: treated as lossless.
    assert msg("project_progress").kind == 0


def test_a_connection_that_keeps_up_gets_every_progress() -> None:
    box = Outbox(OutboxLimits(high_water=2, max_messages=10))
    sent = [progress("p1") for _ in range(5)]
    got = []
    for e in sent:
        assert box.push(e) == QUEUED
        got += box.take_all()
    assert got == sent


def test_above_high_water_progress_replaces_the_queued_one_in_publish_order() -> None:
    box = Outbox(OutboxLimits(high_water=3, max_messages=10))
    a1, b1, n1 = progress("a"), progress("b"), note()
    for e in (a1, b1):
        assert box.push(e) == QUEUED
    assert box.push(n1) == QUEUED | HIGH_WATER
    a2 = progress("a")
    assert box.push(a2) == QUEUED | CONFLATED
    b2 = progress("b")
    assert box.push(b2) == QUEUED | CONFLATED
    c1 = progress("c")  # no queued progress of c: appended
    assert box.push(c1) == QUEUED
    assert box.take_all() == [n1, a2, b2, c1]


def test_completion_removes_queued_progress_and_is_kept() -> None:
    box = Outbox(OutboxLimits(high_water=10, max_messages=10))
    a1, b1, a2 = progress("a"), progress("b"), progress("a")
    for e in (a1, b1, a2):
        box.push(e)
    done = completed("a")
    assert box.push(done) == QUEUED | CONFLATED  # even below the high-water mark
    assert box.take_all() == [b1, done]


def test_lossless_overflow_by_count_and_bytes() -> None:
    box = Outbox(OutboxLimits(high_water=2, max_messages=3))
    for _ in range(3):
        assert box.push(note()) & QUEUED
    assert box.push(note()) == OVERFLOW
    assert box.push(completed("a")) == OVERFLOW
    assert len(box) == 3
    first = note(pad=100)
    box = Outbox(OutboxLimits(high_water=1, max_messages=100, max_bytes=len(first.frame) * 2))
    assert box.push(first) & QUEUED
    assert box.push(note(pad=100)) & QUEUED
    assert box.push(note(pad=100)) == OVERFLOW
    assert box.queued_bytes <= len(first.frame) * 2


def test_progress_of_too_many_projects_overflows() -> None:
    box = Outbox(OutboxLimits(high_water=1, max_messages=3))
    for p in "abc":
        assert box.push(progress(p)) & QUEUED
    assert box.push(progress("a")) & CONFLATED  # replacing keeps the count
    assert box.push(progress("d")) == OVERFLOW


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        OutboxLimits(high_water=10, max_messages=5)


# -- the property: what any client ends up with ------------------------------------------

_events = st.lists(
    st.one_of(
        st.tuples(st.just("progress"), st.sampled_from("abcd")),
        st.tuples(st.just("completed"), st.sampled_from("abcd")),
        st.tuples(st.just("note"), st.just("")),
        st.tuples(st.just("take"), st.just("")),  # the writer catches up
    ),
    max_size=120,
)


@settings(max_examples=300)
@given(
    events=_events,
    high_water=st.integers(1, 6),
    extra=st.integers(0, 6),
    pad=st.integers(0, 60),
)
def test_any_sequence_and_any_stall_pattern(
    events: list[tuple[str, str]], high_water: int, extra: int, pad: int
) -> None:
    max_messages = high_water + extra
    probe = note(pad=pad)
    max_bytes = len(probe.frame) * (max_messages + 2)
    limits = OutboxLimits(high_water=high_water, max_messages=max_messages, max_bytes=max_bytes)
    box = Outbox(limits)
    pushed: list[Envelope] = []
    delivered: list[Envelope] = []
    for kind, project in events:
        if kind == "take":
            delivered += box.take_all()
            continue
        e = (
            progress(project, pad)
            if kind == "progress"
            else completed(project)
            if kind == "completed"
            else note(pad)
        )
        if box.push(e) & OVERFLOW:
            break  # the connection closes: what is queued is flushed, then 1013
        pushed.append(e)
        # The queue never exceeds its bounds.
        queued = list(box)
        assert len([q for q in queued if q.kind != 1]) <= max_messages
        assert len([q for q in queued if q.kind == 1]) <= max_messages
        assert sum(len(q.frame) for q in queued) == box.queued_bytes <= max_bytes
    delivered += box.take_all()

    # Delivered: a subsequence of what was pushed, in publish order, no duplicates.
    position = {id(e): i for i, e in enumerate(pushed)}
    order = [position[id(e)] for e in delivered]
    assert order == sorted(set(order))
    # Every completion, notification and alert, in order.
    assert [e for e in pushed if e.kind != 1] == [e for e in delivered if e.kind != 1]
    # The latest message of every project reaches the client.
    for project in "abcd":
        mine = [e for e in pushed if e.key == project]
        if mine:
            assert mine[-1] in delivered
    # A progress is left out only when a later message of its project was delivered.
    delivered_ids = {id(e) for e in delivered}
    for i, e in enumerate(pushed):
        if id(e) not in delivered_ids:
            assert e.kind == 1
            later = [x for x in pushed[i + 1 :] if x.key == e.key]
            assert any(id(x) in delivered_ids for x in later)


# -- current state for new tabs ----------------------------------------------------------


def test_snapshot_keeps_the_latest_progress_per_project() -> None:
    snaps = Snapshots(SnapshotLimits(ttl=100, completed_ttl=10, per_user=2, max_entries=3))
    a1, b1, a2 = progress("a"), progress("b"), progress("a")
    for t, e in enumerate((a1, b1, a2)):
        snaps.observe("u1", e, now=t)
    snaps.observe("u1", note(), now=3)  # not state
    assert snaps.for_user("u1", now=5) == [b1, a2]  # oldest update first
    assert snaps.for_user("u2", now=5) == []
    # Per-user bound: the least recently updated project goes.
    c1 = progress("c")
    snaps.observe("u1", c1, now=6)
    assert snaps.for_user("u1", now=7) == [a2, c1]
    # Total bound, across users.
    x1, y1 = progress("x"), progress("y")
    snaps.observe("u2", x1, now=8)
    snaps.observe("u2", y1, now=9)
    assert len(snaps) == 3
    assert snaps.for_user("u1", now=10) == [c1]


def test_snapshot_completion_lingers_then_expires() -> None:
    snaps = Snapshots(SnapshotLimits(ttl=100, completed_ttl=10))
    snaps.observe("u1", progress("a"), now=0)
    done = completed("a")
    snaps.observe("u1", done, now=50)
    assert snaps.for_user("u1", now=59) == [done]
    assert snaps.for_user("u1", now=60) == []
    assert len(snaps) == 0
    b = progress("b")
    snaps.observe("u1", b, now=0)
    assert snaps.sweep(now=99) == 0
    assert snaps.sweep(now=100) == 1
    assert len(snaps) == 0


# -- the hub's budget for all queues together (SMAPWS_SEND_QUEUE_TOTAL_BYTES) --------


def budgeted(total: int, n: int) -> tuple[QueueBudget, list[Outbox]]:
    budget = QueueBudget(total)
    limits = OutboxLimits(high_water=100, max_messages=1000, max_bytes=1 << 20, budget=budget)
    return budget, [Outbox(limits) for _ in range(n)]


def test_the_budget_counts_every_queue_and_is_given_back() -> None:
    budget, (a, b) = budgeted(1 << 20, 2)
    m1, m2 = note(pad=100), note(pad=300)
    assert a.push(m1) == QUEUED and b.push(m2) == QUEUED
    assert budget.used == len(m1.frame) + len(m2.frame) and budget.queues == 2
    a.take_all()
    assert budget.used == len(m2.frame) and budget.queues == 1
    b.take_all()
    assert budget.used == 0 and budget.queues == 0


def test_conflation_gives_back_what_it_drops() -> None:
    budget = QueueBudget(1 << 20)
    box = Outbox(OutboxLimits(high_water=1, max_messages=10, budget=budget))
    box.push(progress("p", pad=500))
    box.push(progress("p", pad=500))  # above high water: replaces the first
    assert len(box) == 1 and budget.used == box.queued_bytes
    box.push(completed("p"))  # drops the queued progress
    assert budget.used == box.queued_bytes == len(box.take_all()[0].frame) and budget.used == 0


def test_past_the_budget_the_slow_queues_are_refused_and_a_fast_one_is_not() -> None:
    size = len(note(pad=1000).frame)
    budget, boxes = budgeted(20 * size, 5)
    slow, fast = boxes[:4], boxes[4]
    refused = 0
    for _ in range(10):  # ten messages to every slow tab: 40 in all, twice the budget
        for box in slow:
            refused += box.push(note(pad=1000)) == OVERFLOW
        assert fast.push(note(pad=1000)) == QUEUED  # a tab that keeps up
        fast.take_all()
    assert refused > 0
    # Each slow queue was refused at its share (the budget over 4 or 5 queues).
    assert all(box.queued_bytes <= 20 * size // 4 for box in slow)
    assert budget.used <= 2 * budget.total
    for box in slow:  # a refused connection is closed: its queue is given back
        box.take_all()
    assert budget.used == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(["note", "progress", "completed", "take"])),
        max_size=200,
    )
)
def test_the_budget_always_equals_what_the_queues_hold(ops: list[tuple[int, str]]) -> None:
    budget, boxes = budgeted(4000, 6)
    for i, op in ops:
        box = boxes[i]
        if op == "take":
            box.take_all()
        elif op == "note":
            box.push(note(pad=200))
        elif op == "progress":
            box.push(progress(f"p{i % 2}", pad=200))
        else:
            box.push(completed(f"p{i % 2}"))
        assert budget.used == sum(b.queued_bytes for b in boxes)
        assert budget.queues == sum(1 for b in boxes if len(b))
        assert budget.used < 2 * budget.total + 1000
