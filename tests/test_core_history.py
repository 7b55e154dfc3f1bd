"""The replay window (smapws._core.history), sans-IO."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smapws._core.envelope import parse
from smapws._core.fleet import Chains, chain_id
from smapws._core.history import (
    AGE_TOLERANCE,
    ENTRY_OVERHEAD,
    USER_OVERHEAD,
    History,
    HistoryLimits,
    Resume,
    conflate,
    parse_resume,
)


def raw(mtype: str, **payload: Any) -> bytes:
    return json.dumps({"type": mtype, "payload": payload}, separators=(",", ":")).encode()


class Hub:
    """What Router.route does with one History: the id, then the record."""

    def __init__(self, **limits: Any) -> None:
        self.history = History(HistoryLimits(**limits))
        self.chains = Chains(None, floor_wall=0.0)

    def route(self, user: str, data: bytes, now: float) -> tuple[str, dict[str, Any]]:
        channel = b"user_noti:" + user.encode()
        # As the hub's sweep does: a chain idle for the window is forgotten.
        self.chains.sweep(now, self.history.limits.ttl)
        prev = self.chains.prev(user, now)
        assert prev is not None
        mid = chain_id(channel, data, prev)
        self.chains.advance(user, mid, now)
        env = parse(data, wall_time=1_700_000_000.0, received_at=now, message_id=mid)
        self.history.record(user, mid, prev, env, now)
        return mid, json.loads(env.text)

    def after(self, user: str, since: str, now: float, age: float | None = None) -> Any:
        missed = self.history.after(user, Resume(since, age), now)
        return None if missed is None else [json.loads(e.text) for e in missed]


def test_ids_are_chained_on_channel_bytes_and_predecessor() -> None:
    data = b'{"type":"a","payload":{}}'
    first = chain_id(b"user_noti:u1", data, "-" * 16)
    ids = [first]
    for _ in range(4):  # identical copies: each follows the one before
        ids.append(chain_id(b"user_noti:u1", data, ids[-1]))
    assert len(set(ids)) == 5
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    assert chain_id(b"user_noti:u1", data, "-" * 16) == first
    assert chain_id(b"user_noti:u2", data, "-" * 16) != first
    assert chain_id(b"user_noti:u1", b'{"type":"a","payload":{} }', "-" * 16) != first


def test_two_hubs_agree_and_identical_publishes_get_different_ids() -> None:
    a, b = Hub(), Hub()
    note = raw("notification", title="hi")
    seq = [note, raw("project_progress", project_id="p1", done=1), note, note]
    ids_a = [a.route("u1", m, now=10.0 + i) for i, m in enumerate(seq)]
    # Hub b receives the same messages a few milliseconds later.
    ids_b = [b.route("u1", m, now=10.003 + i) for i, m in enumerate(seq)]
    assert [i for i, _ in ids_a] == [i for i, _ in ids_b]
    assert len({i for i, _ in ids_a}) == 4
    # The delivered object carries its id.
    assert all(obj["id"] == i for i, obj in ids_a)


def test_after_returns_events_in_order_and_progress_as_current_state() -> None:
    hub = Hub()
    since, _ = hub.route("u1", raw("notification", n=0), 1.0)
    hub.route("u1", raw("project_progress", project_id="p1", done=1), 2.0)
    hub.route("u1", raw("project_progress", project_id="p2", done=1), 3.0)
    hub.route("u1", raw("alert", n=1), 4.0)
    hub.route("u1", raw("project_progress", project_id="p1", done=2), 5.0)
    hub.route("u1", raw("project_progress", project_id="p2", done=2), 6.0)
    hub.route("u1", raw("project_completed", project_id="p2", status="DONE"), 7.0)
    hub.route("u2", raw("notification", other=True), 7.5)
    last, _ = hub.route("u1", raw("notification", n=2), 8.0)
    got = hub.after("u1", since, now=9.0)
    assert [(m["type"], m["payload"]) for m in got] == [
        ("alert", {"n": 1}),
        ("project_progress", {"project_id": "p1", "done": 2}),
        ("project_completed", {"project_id": "p2", "status": "DONE"}),
        ("notification", {"n": 2}),
    ]
    # Up to date: nothing missed. Another user's id: unknown for u1.
    assert hub.after("u1", last, now=9.0) == []
    other = hub.history.after("u2", Resume(since), 9.0)
    assert other is None


def test_unknown_expired_evicted_and_cleared_ids_are_gaps() -> None:
    hub = Hub(ttl=60.0, per_user=3)
    first, _ = hub.route("u1", raw("notification", n=0), 0.0)
    assert hub.after("u1", "0123456789abcdef", 1.0) is None
    assert hub.after("u1", first, 59.0) == []
    assert hub.after("u1", first, 60.0) is None  # older than the window
    ids = [hub.route("u1", raw("notification", n=i), 100.0 + i)[0] for i in range(4)]
    assert hub.after("u1", ids[0], 105.0) is None  # pushed out by per_user
    assert [m["payload"]["n"] for m in hub.after("u1", ids[1], 105.0)] == [2, 3]
    hub.history.clear()
    assert hub.after("u1", ids[3], 105.0) is None
    assert len(hub.history) == 0 and hub.history.bytes == 0


def test_forget_user_leaves_other_users_windows() -> None:
    # User mode: one user's subscription had a hole, the others' did not.
    hub = Hub(ttl=60.0, per_user=10)
    a = [hub.route("u1", raw("notification", n=i), float(i))[0] for i in range(3)]
    b = [hub.route("u2", raw("notification", n=i), float(i))[0] for i in range(3)]
    before = hub.history.bytes
    hub.history.forget_user("u1")
    hub.history.forget_user("nobody")
    assert hub.after("u1", a[0], 5.0) is None
    assert [m["payload"]["n"] for m in hub.after("u2", b[0], 5.0)] == [1, 2]
    assert len(hub.history) == 3 and hub.history.bytes == before // 2
    assert hub.history.users() == 1


def test_the_total_byte_bound_forgets_the_oldest_across_users() -> None:
    env = parse(raw("notification", n=0), wall_time=0, received_at=0, message_id="0" * 16)
    frame = len(env.frame)
    per_entry = frame + ENTRY_OVERHEAD + USER_OVERHEAD  # one message per user
    hub = Hub(max_bytes=3 * per_entry + 10)
    ids = [hub.route(f"u{i}", raw("notification", n=0), float(i))[0] for i in range(5)]
    assert len(hub.history) == 3 and hub.history.bytes <= 3 * per_entry + 10
    assert hub.after("u0", ids[0], 10.0) is None
    assert hub.after("u1", ids[1], 10.0) is None
    assert hub.after("u2", ids[2], 10.0) == []
    assert hub.history.users() == 3


def test_sweep_forgets_what_is_older_than_the_ttl() -> None:
    hub = Hub(ttl=10.0)
    for i in range(5):
        hub.route(f"u{i % 2}", raw("notification", n=i), float(i))
    assert hub.history.sweep(12.5) == 3
    assert len(hub.history) == 2 and hub.history.users() == 2


def test_a_reused_id_is_told_apart_by_the_age_of_since() -> None:
    # Without a fleet log, an identical message after the first has left the
    # window (and the hub forgot its chain) gets the same id again. A tab
    # that saw the first (long ago) must not be told it has seen the second:
    # its since_age says when it saw its message.
    hub = Hub(ttl=60.0)
    note = raw("notification", title="daily report")
    first, _ = hub.route("u1", note, 0.0)
    again, _ = hub.route("u1", note, 100.0)
    assert again == first
    hub.route("u1", raw("notification", title="after"), 101.0)
    # The tab got the first copy 102 s ago: a different message -> gap.
    assert hub.after("u1", first, 102.0, age=102.0) is None
    # A tab that got the second copy (2 s ago) resumes normally, also with a
    # little delay between the hub and the tab.
    assert hub.after("u1", first, 102.0, age=2.0 + AGE_TOLERANCE - 0.01) is not None
    assert len(hub.after("u1", first, 102.0, age=1.0)) == 1


def test_a_hub_that_joined_late_turns_a_confused_copy_into_a_gap() -> None:
    # Hub a saw an identical notification at t=0 and t=20; hub b joined at
    # t=10, so it numbers the second copy as a first one (same id as a's
    # first). A tab that saw only a's first copy, resuming on b, must get a
    # gap, not a replay from the second copy.
    a, b = Hub(), Hub()
    note = raw("notification", title="same")
    first_a, _ = a.route("u1", note, 0.0)
    a.route("u1", note, 20.0)
    second_b, _ = b.route("u1", note, 20.001)
    assert second_b == first_a
    b.route("u1", raw("notification", title="later"), 25.0)
    assert b.after("u1", first_a, now=30.0, age=30.0) is None


def test_conflate_keeps_events_and_the_last_progress_of_each_project() -> None:
    def env(mtype: str, project: str | None = None) -> Any:
        payload = {} if project is None else {"project_id": project}
        return parse(raw(mtype, **payload), wall_time=0, received_at=0)

    p1a, p2, n, p1b, c2, p2b = (
        env("project_progress", "1"),
        env("project_progress", "2"),
        env("notification"),
        env("project_progress", "1"),
        env("project_completed", "2"),
        env("project_progress", "2"),
    )
    assert conflate([p1a, p2, n, p1b, c2]) == [n, p1b, c2]
    # A new run of project 2 after its completion is current state again.
    assert conflate([p2, c2, p2b]) == [c2, p2b]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, None),
        ({"since": ""}, None),
        ({"since": "0123456789abcdef"}, Resume("0123456789abcdef")),
        ({"since": "0123456789abcdef", "since_age": "1.5"}, Resume("0123456789abcdef", 1.5)),
        ({"since": "0123456789abcdef", "since_age": ""}, Resume("0123456789abcdef")),
    ],
)
def test_parse_resume(query: dict[str, str], expected: Resume | None) -> None:
    assert parse_resume(query) == expected


@pytest.mark.parametrize(
    "query",
    [
        {"since": "0123456789ABCDEF"},
        {"since": "0123456789abcde"},
        {"since": "0123456789abcdef0"},
        {"since": "../../etc/passwd"},
        {"since": "0123456789abcdef", "since_age": "nan"},
        {"since": "0123456789abcdef", "since_age": "-1"},
        {"since": "0123456789abcdef", "since_age": "inf"},
        {"since": "0123456789abcdef", "since_age": "1e9"},
        {"since": "0123456789abcdef", "since_age": "soon"},
    ],
)
def test_parse_resume_refuses_what_is_not_an_id(query: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        parse_resume(query)


def test_the_id_is_spliced_in_or_replaces_a_publisher_id() -> None:
    plain = parse(
        raw("notification", id="payload-id"), wall_time=0, received_at=0, message_id="0" * 14 + "ff"
    )
    obj = json.loads(plain.text)
    assert obj["id"] == "00000000000000ff" and obj["payload"] == {"id": "payload-id"}
    own = b'{"id":7,"type":"x","payload":{}}'
    out = parse(own, wall_time=0, received_at=0, message_id="00000000000000ff")
    assert json.loads(out.text) == {
        "id": "00000000000000ff",
        "type": "x",
        "payload": {},
        "timestamp": "1970-01-01T00:00:00.000Z",
    }
    assert out.text.count(b'"id"') == 1


# A message is (user, kind, project, variant); few variants, so that
# identical messages are common.
messages = st.tuples(
    st.sampled_from(["u1", "u2"]),
    st.sampled_from(["project_progress", "project_completed", "notification"]),
    st.sampled_from(["p1", "p2"]),
    st.integers(0, 2),
    st.floats(0.0, 30.0),
)


@settings(max_examples=200, deadline=None)
@given(
    seq=st.lists(messages, max_size=60),
    per_user=st.integers(1, 12),
    ttl=st.sampled_from([5.0, 60.0, 1000.0]),
)
def test_any_sequence_ids_unique_and_after_is_the_conflated_rest(
    seq: list[tuple[str, str, str, int, float]], per_user: int, ttl: float
) -> None:
    hub = Hub(ttl=ttl, per_user=per_user)
    log: dict[str, list[tuple[str, float, dict[str, Any]]]] = {"u1": [], "u2": []}
    now = 0.0
    for user, mtype, project, variant, step in seq:
        now += step
        mid, obj = hub.route(user, raw(mtype, project_id=project, v=variant), now)
        log[user].append((mid, now, obj))
        # Within what the window holds, ids are unique.
        window = [m for m, t, _ in log[user][-per_user:] if t > now - ttl]
        assert len(window) == len(set(window))
        assert hub.history.bytes <= HistoryLimits().max_bytes
    for user, items in log.items():
        kept = [(m, t, o) for m, t, o in items[-per_user:] if t > now - ttl]
        for k, (mid, _, _) in enumerate(kept):
            got = hub.after(user, mid, now)
            rest = [o for _, _, o in kept[k + 1 :]]
            expected = _conflated_model(rest)
            assert got == expected
        for mid, _t, _ in items:
            if all(mid != m for m, _, _ in kept):
                assert hub.after(user, mid, now) is None


def _conflated_model(rest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Independent statement of the replay rule: drop a progress message when
    a later message of the same project follows it."""
    out = []
    for i, m in enumerate(rest):
        later = [
            n
            for n in rest[i + 1 :]
            if n["type"] in ("project_progress", "project_completed")
            and n["payload"]["project_id"] == m["payload"]["project_id"]
        ]
        if m["type"] == "project_progress" and later:
            continue
        out.append(m)
    return out


def test_the_window_adds_no_objects_for_the_collector_to_scan_per_message() -> None:
    """A window holds tens of thousands of messages for seconds each: as
    objects the collector tracked (an entry and an envelope per message) they
    reached its oldest generation, whose full collections then scanned them
    all (13 ms pauses at 24,000 deliveries/s). Its entries are tuples of
    atomic values, which the collector stops tracking at once."""
    import gc

    history = History(HistoryLimits())
    history.hold("u3")  # held users' entries are kept in another order
    gc.collect()
    before = len(gc.get_objects())
    for n in range(10_000):
        user = f"u{n % 10}"
        mid = f"{n:016x}"
        env = parse(raw("notification", n=n), wall_time=1.7e9, received_at=0.0, message_id=mid)
        history.record(user, mid, "-" * 16, env, now=n * 1e-3)
    del env
    gc.collect()
    assert len(history) == 1000  # 100 per user: all kept
    # Per user: its window object and deque (and the dicts' growth): not per message.
    assert len(gc.get_objects()) - before < 100
    # ... and what they hold is intact.
    missed = history.after("u3", Resume(f"{9_893:016x}"), now=10.0)
    assert missed is not None
    assert [json.loads(e.text)["payload"]["n"] for e in missed] == list(range(9903, 10_000, 10))
