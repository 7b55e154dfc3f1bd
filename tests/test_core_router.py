"""The hub's routing decisions (sans-IO): who gets what, without trio."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from smapws._core.envelope import InvalidMessage, encode_message
from smapws._core.fleet import (
    GENESIS,
    Chains,
    Header,
    LogEntry,
    chain_id,
    decode_entry,
    encode_entry,
)
from smapws._core.history import History, HistoryLimits, Resume
from smapws._core.router import (
    CHAINS_FLOOR,
    DROP_RESYNC_INTERVAL,
    Router,
    RouterLimits,
)
from smapws._core.snapshot import SnapshotLimits, Snapshots

WALL = 1_795_000_000.0
PREFIX = b"user_noti:"
LIMITS = RouterLimits(resume_max_bytes=4096, send_queue_bytes=64 * 1024, send_queue_messages=64)


def router(*, fleet_log: bool = False, snapshots: bool = True, **limits: Any) -> Router[str]:
    return Router(
        PREFIX,
        Chains(150.0 if fleet_log else None, floor_wall=WALL - 10),
        dataclasses.replace(LIMITS, **limits),
        history=History(HistoryLimits()),
        snapshots=Snapshots(SnapshotLimits()) if snapshots else None,
        fleet_log=fleet_log,
    )


def note(n: object, **extra: object) -> bytes:
    return encode_message("notification", {"n": n, **extra})


def progress(project: str, done: int) -> bytes:
    return encode_message("project_progress", {"project_id": project, "done": done})


def channel(user: str) -> bytes:
    return PREFIX + user.encode()


def obj(text: bytes) -> Any:
    return json.loads(text)


def test_a_message_goes_to_every_tab_of_its_user_framed_once_with_its_chained_id() -> None:
    r = router()
    for tab in ("tab1", "tab2"):
        r.register("u1", tab, None, 0.0)
    r.register("u2", "other", None, 0.0)
    first = r.route(channel("u1"), note(1), wall=WALL, now=1.0)
    second = r.route(channel("u1"), note(1), wall=WALL, now=2.0)
    assert sorted(first.conns) == ["tab1", "tab2"]
    assert first.mid == chain_id(channel("u1"), note(1), GENESIS) and first.prev == GENESIS
    assert (second.prev, second.mid) == (first.mid, chain_id(channel("u1"), note(1), first.mid))
    assert obj(first.envelope.text)["id"] == first.mid
    assert obj(first.envelope.text)["timestamp"] == "2026-11-18T11:06:40.000Z"
    assert first.append is None  # no fleet log
    # The window replays it to a tab that saw only the first.
    welcome = r.register("u1", "tab3", Resume(first.mid), 3.0)
    # (The window keeps the message's fields, not its envelope object: the
    # same frame, in an envelope of its own.)
    assert welcome.outcome == "replayed"
    assert [e.frame for e in welcome.replayed] == [second.envelope.frame]


def test_nobody_holds_the_user_the_message_is_kept_all_the_same() -> None:
    r = router()
    routed = r.route(channel("gone"), progress("p1", 5), wall=WALL, now=1.0)
    assert routed.conns == ()
    welcome = r.register("gone", "late", None, 2.0)
    assert welcome.outcome is None and welcome.state == [routed.envelope]


@pytest.mark.parametrize(
    ("chan", "data", "reason"),
    [
        (b"other:u1", note(1), "bad_channel"),
        (channel("u1"), b"not json", "not_json"),
        (channel("u1"), b'{"type":"x"}', "bad_payload"),
    ],
)
def test_an_invalid_message_raises_and_changes_nothing(
    chan: bytes, data: bytes, reason: str
) -> None:
    r = router(fleet_log=True)
    r.consulted("u1", [])
    with pytest.raises(InvalidMessage) as info:
        r.route(chan, data, wall=WALL, now=1.0)
    assert info.value.reason == reason
    assert len(r.chains) == 0 and r.history is not None and len(r.history) == 0
    # What the log said is still there for the user's next, valid message.
    routed = r.route(channel("u1"), note(1), wall=WALL, now=1.0)
    assert routed.prev == GENESIS and routed.append is not None


def test_with_a_fleet_log_an_unknown_users_first_message_is_placed_by_the_log() -> None:
    r = router(fleet_log=True)
    r.route(channel("known"), note(0), wall=WALL, now=1.0)
    batch = [channel("known"), channel("u1"), b"bad", channel("u1"), channel("u2")]
    assert r.to_consult(batch, 1.0) == {"u1": channel("u1"), "u2": channel("u2")}
    # u1: another hub already appended this very message (after the floor).
    theirs = chain_id(channel("u1"), note(1), "a" * 16)
    r.consulted("u1", [Header(theirs, "a" * 16, int(WALL * 1000))])
    placed = r.route(channel("u1"), note(1), wall=WALL, now=1.0)
    assert (placed.mid, placed.prev, placed.append) == (theirs, "a" * 16, None)
    # u2: the log ends with another message: this one follows it, and is appended.
    r.consulted("u2", [Header("b" * 16, GENESIS, int(WALL * 1000))])
    after = r.route(channel("u2"), note(2), wall=WALL + 0.5, now=1.0)
    assert after.prev == "b" * 16
    assert after.append == encode_entry(after.mid, "b" * 16, int((WALL + 0.5) * 1000), note(2))
    assert decode_entry(after.append).raw == note(2)
    r.batch_done()
    assert r.to_consult(batch, 1.0) == {}  # both chains known now


def test_a_user_asked_about_is_held_and_nobody_else_waits() -> None:
    """Review of the consult (issue 15's xfail): the router waited for the
    log's answer with every other user's messages behind it. Now only the
    users asked about wait, and their later messages queue behind them."""
    r = router(fleet_log=True)
    r.route(channel("known"), note(0), wall=WALL, now=1.0)
    first = [(channel("u1"), note(1)), (channel("known"), note(2)), (b"bad", note(3))]
    now, wanted = r.hold(first, 1.0, ask=True)
    assert wanted == {"u1": channel("u1")}
    assert now == first[1:]  # known's goes on; the bad one is route()'s to refuse
    # The next batch: u1's message joins the first (not asked again), u2 is new.
    second = [(channel("u1"), note(4)), (channel("u2"), note(5)), (channel("known"), note(6))]
    now, wanted = r.hold(second, 1.0, ask=True)
    assert wanted == {"u2": channel("u2")} and now == second[2:]
    assert (r.holding.messages, r.holding.waiting) == (3, 2)
    assert r.take(64) == []  # no answer yet
    # u2's answer comes first: its message goes first, placed by the log.
    r.holding.answer({"u2": [Header("b" * 16, GENESIS, int(WALL * 1000))]})
    assert r.take(64) == [(channel("u2"), note(5))]
    assert r.route(channel("u2"), note(5), wall=WALL, now=1.0).prev == "b" * 16
    r.batch_done()
    # u1's answer: its messages in the order they came, a chunk at a time,
    # and a message meanwhile still joins them (it must not overtake).
    r.holding.answer({"u1": [Header("a" * 16, GENESIS, int(WALL * 1000))]})
    assert r.take(1) == [(channel("u1"), note(1))]
    assert r.route(channel("u1"), note(1), wall=WALL, now=1.0).prev == "a" * 16
    now, wanted = r.hold([(channel("u1"), note(7))], 1.0, ask=True)
    assert (now, wanted) == ([], {})
    assert r.take(64) == [(channel("u1"), note(4)), (channel("u1"), note(7))]
    assert r.holding.messages == r.holding.bytes == 0 and "u1" not in r.holding
    now, _ = r.hold([(channel("u1"), note(8))], 1.0, ask=True)
    assert now == [(channel("u1"), note(8))]  # held no more


def test_a_hold_given_up_routes_on_the_hubs_own_chain_and_is_bounded() -> None:
    r = router(fleet_log=True, hold_messages=2, hold_bytes=1 << 20)
    batch = [(channel("u1"), note(n)) for n in range(3)]
    _, wanted = r.hold(batch, 1.0, ask=True)
    assert wanted == {"u1": channel("u1")} and r.holding.over
    r.holding.give_up()
    r.holding.answer({"u1": [Header("a" * 16, GENESIS, int(WALL * 1000))]})  # too late
    assert r.take(64) == batch
    assert r.route(*batch[0], wall=WALL, now=1.0).prev == GENESIS
    # Not asking (the log failed lately): nobody is held.
    assert r.hold([(channel("u3"), note(9))], 1.0, ask=False) == ([(channel("u3"), note(9))], {})


def test_the_logs_answer_outlasts_an_invalid_first_message_taken_alone() -> None:
    """Review of the hold: the answer went with the chunk of the user's
    first held message only, so when that message was invalid and the
    chunk ended with it (more than a chunk was ready), the user's next
    message went on this hub's own chain, with another id than on the hubs
    that placed it by the log (which :meth:`route` keeps the answer for)."""
    r = router(fleet_log=True)
    batch = [(channel("u1"), b"not json"), (channel("u1"), note(1))]
    r.hold(batch, 1.0, ask=True)
    r.holding.answer({"u1": [Header("a" * 16, GENESIS, int(WALL * 1000))]})
    assert r.take(1) == batch[:1]
    with pytest.raises(InvalidMessage):
        r.route(*batch[0], wall=WALL, now=1.0)
    r.batch_done()
    assert r.take(64) == batch[1:]
    assert r.route(*batch[1], wall=WALL, now=1.0).prev == "a" * 16
    r.batch_done()
    assert "u1" not in r.holding and not r.holding._answers


def test_a_user_whose_held_messages_keep_coming_does_not_keep_the_others_waiting() -> None:
    """Review of the hold: take() routed the first ready user until their
    messages ran out, and a user whose messages kept coming meanwhile (they
    join the held ones) kept every user ready after them held."""
    r = router(fleet_log=True)
    hot = [(channel("hot"), note(n)) for n in range(3)]
    r.hold([*hot, (channel("cold"), note(9))], 1.0, ask=True)
    r.holding.answer({"hot": [], "cold": []})
    assert r.take(2) == hot[:2]
    r.batch_done()
    r.hold([(channel("hot"), note(3))], 1.0, ask=True)  # joins hot's
    assert r.take(2) == [(channel("cold"), note(9)), hot[2]]
    r.batch_done()
    assert r.take(2) == [(channel("hot"), note(3))]
    assert not r.holding.messages and "hot" not in r.holding


def test_without_an_answer_from_the_log_a_user_carries_on_its_own_chain() -> None:
    r = router(fleet_log=True)
    first = r.route(channel("u1"), note(1), wall=WALL, now=1.0)
    # Stale after half the window: the log is to be asked again...
    assert r.to_consult([channel("u1")], 200.0) == {"u1": channel("u1")}
    # ...and when it does not answer, the last id known is used.
    later = r.route(channel("u1"), note(2), wall=WALL, now=200.0)
    assert later.prev == first.mid and later.append is not None


def test_a_resync_names_the_tabs_owed_one_and_the_window_forgets_the_hole() -> None:
    r = router()
    r.register("u1", "a", None, 0.0)
    r.register("u2", "b", None, 0.0)
    m1 = r.route(channel("u1"), note(1), wall=WALL, now=1.0)
    m2 = r.route(channel("u2"), note(2), wall=WALL, now=1.0)
    assert tuple(r.resync(channel("u2"), WALL)) == ("b",)
    assert r.register("u2", "b2", Resume(m2.mid), 2.0).gap  # u2's hole only
    assert r.register("u1", "a2", Resume(m1.mid), 2.0).outcome == "replayed"
    assert r.route(channel("u2"), note(3), wall=WALL, now=3.0).prev == GENESIS
    assert sorted(r.resync(None, WALL)) == ["a", "a2", "b", "b2"]
    gap = r.register("u1", "a3", Resume(m1.mid), 4.0)
    assert (gap.outcome, gap.gap, gap.replayed) == ("gap", True, [])
    with pytest.raises(InvalidMessage):
        r.resync(b"elsewhere:u1", WALL)


def test_drops_before_the_router_are_owed_one_resync_per_interval() -> None:
    r = router()
    assert not r.drop_resync_due(0.0)
    r.dropped()
    r.dropped()
    assert r.drop_resync_due(5.0)
    assert not r.drop_resync_due(5.0)  # both drops covered
    r.dropped()
    assert not r.drop_resync_due(5.0 + DROP_RESYNC_INTERVAL / 2)
    assert r.drop_resync_due(5.0 + DROP_RESYNC_INTERVAL)


def test_a_new_tab_gets_the_state_that_fits_half_its_queue_newest_kept() -> None:
    r = router(send_queue_bytes=4 * 1024)
    pad = "x" * 800
    routed = []
    for i, project in enumerate("abcd"):
        data = encode_message("project_progress", {"project_id": project, "pad": pad})
        routed.append(r.route(channel("u1"), data, wall=WALL, now=1.0 + i).envelope)
    assert 2 * len(routed[0].frame) < 2048 < 3 * len(routed[0].frame)
    state = r.register("u1", "tab", None, 10.0).state
    assert state == routed[-2:]  # what fits half of 4 KiB, the newest


def test_a_replay_past_the_resume_bound_is_a_gap_and_the_state() -> None:
    r = router(resume_max_bytes=2000)
    since = r.route(channel("u1"), note(0), wall=WALL, now=1.0).mid
    for i in range(1, 4):
        r.route(channel("u1"), note(i, pad="x" * 900), wall=WALL, now=1.0 + i)
    r.route(channel("u1"), progress("p1", 9), wall=WALL, now=5.0)
    welcome = r.register("u1", "tab", Resume(since), 6.0)
    assert (welcome.outcome, welcome.gap, welcome.replayed) == ("too_large", True, [])
    assert [obj(e.text)["payload"]["done"] for e in welcome.state] == [9]


def test_unregister_tells_whether_the_user_has_other_tabs() -> None:
    r = router()
    r.register("u1", "a", None, 0.0)
    r.register("u1", "b", None, 0.0)
    assert r.unregister("u1", "a", 1.0) is True
    assert r.unregister("u1", "b", 1.0) is False
    assert r.route(channel("u1"), note(1), wall=WALL, now=2.0).conns == ()


def test_the_chain_table_is_trimmed_to_what_is_held() -> None:
    r = router(snapshots=False)
    r.history = None  # nothing kept for users nobody holds
    r.register("held", "tab", None, 0.0)
    held = r.route(channel("held"), note(0), wall=WALL, now=0.0).mid
    for i in range(10 * CHAINS_FLOOR):
        r.route(channel(f"flood{i}"), note(i), wall=WALL, now=1.0)
    assert len(r.chains) <= 2 * CHAINS_FLOOR
    assert r.route(channel("held"), note(1), wall=WALL, now=2.0).prev == held


def test_a_resume_the_window_cannot_answer_is_joined_to_the_fleets_log() -> None:
    r = router(fleet_log=True)
    assert not r.needs_fleet("u1", None, 0.0)
    since = "c" * 16
    resume = Resume(since, age=1.0)
    assert r.needs_fleet("u1", resume, 0.0)
    raw = note(7)
    mid = chain_id(channel("u1"), raw, since)
    wall_ms = int(WALL * 1000)
    entries = [LogEntry(since, GENESIS, wall_ms, note(6)), LogEntry(mid, since, wall_ms, raw)]
    assert r.history is not None
    joined = r.with_fleet(resume, entries, r.history.epoch, WALL + 1.5, 0.0)
    assert joined is not None and joined.fleet is not None
    assert [obj(e.text)["id"] for e in joined.fleet.envelopes] == [mid]
    welcome = r.register("u1", "tab", joined, 1.0)
    assert welcome.outcome == "fleet" and [e.text for e in welcome.replayed] == [
        e.text for e in joined.fleet.envelopes
    ]
    # An id the tab saw long before the log's entry of that id: another message.
    assert r.with_fleet(Resume(since, age=60.0), entries, 0, WALL + 1.5, 0.0) is None
    assert r.with_fleet(Resume("d" * 16), entries, 0, WALL, 0.0) is None
    bad = [entries[0], LogEntry(mid, since, wall_ms, b"not json")]
    with pytest.raises(InvalidMessage):
        r.with_fleet(resume, bad, 0, WALL, 0.0)


def test_the_users_of_channels_are_remembered_within_a_bound_and_bad_ones_never() -> None:
    """``user_of`` saves the second check of each message's channel (a fleet
    log reads it in to_consult, then in route): the same answers as
    user_from_channel, a bad channel refused every time, the memory bounded."""
    from smapws._core.router import CHANNEL_USERS

    r = router(fleet_log=True)
    for _ in range(2):
        assert r.user_of(channel("u1")) == "u1"
        with pytest.raises(InvalidMessage):
            r.user_of(b"user_noti:bad\x01id")
        with pytest.raises(InvalidMessage):
            r.user_of(b"other:u1")
    assert r.to_consult([channel("u2"), b"other:u1", channel("u2")], now=1.0) == {
        "u2": channel("u2")
    }
    for n in range(3 * CHANNEL_USERS):
        assert r.user_of(channel(f"user-{n}")) == f"user-{n}"
    assert len(r._channel_users) <= CHANNEL_USERS
    # What route decides is unchanged: a bad channel is still refused.
    with pytest.raises(InvalidMessage):
        r.route(b"user_noti:", note(1), wall=WALL, now=1.0)


def test_what_a_fleet_replay_sent_ahead_of_this_hub_is_not_sent_live_again() -> None:
    """The log may hold messages this hub routes only later (another hub
    appended them first). A tab replayed from it gets each once: this hub
    skips that tab for those ids when they come live, until the first live
    message the replay did not hold; its other tabs get them as usual."""
    r = router(fleet_log=True)
    since, wall_ms = "c" * 16, int(WALL * 1000)
    entries, chain, prev = [LogEntry(since, GENESIS, wall_ms, note(6))], [], since
    for raw in (note(7), note(8)):
        mid = chain_id(channel("u1"), raw, prev)
        chain.append((raw, mid))
        entries.append(LogEntry(mid, prev, wall_ms, raw))
        prev = mid
    r.chains.advance("u1", since, 0.5)  # this hub routed n6 (since), not n7, n8
    joined = r.with_fleet(Resume(since), entries, 0, WALL + 1.0, 0.0)
    assert joined is not None
    # A tab that leaves takes its lead with it.
    r.register("u1", "gone", joined, 1.0)
    assert "gone" in r._ahead
    r.unregister("u1", "gone", 1.0)
    assert "gone" not in r._ahead
    r.register("u1", "other", None, 1.0)
    welcome = r.register("u1", "tab", joined, 1.0)
    assert [obj(e.text)["id"] for e in welcome.replayed] == [mid for _, mid in chain]
    for raw, mid in chain:  # now they come live: the replayed tab is skipped
        routed = r.route(channel("u1"), raw, wall=WALL, now=2.0)
        assert routed.mid == mid and routed.conns == ("other",)
    after = r.route(channel("u1"), note(9), wall=WALL, now=3.0)
    assert sorted(after.conns) == ["other", "tab"]
    assert sorted(r.route(channel("u1"), note(8), wall=WALL, now=3.0).conns) == ["other", "tab"]
    # A lead the hub never routes ends at the first message it does route.
    r.register("u2", "t2", None, 1.0)
    log2 = [
        LogEntry("e" * 16, GENESIS, wall_ms, note(1)),
        LogEntry("f" * 16, "e" * 16, wall_ms, note(2)),
    ]
    joined2 = r.with_fleet(Resume("e" * 16), log2, 0, WALL + 1.0, 0.0)
    assert joined2 is not None
    r.register("u2", "t3", joined2, 1.0)
    assert sorted(r.route(channel("u2"), note(3), wall=WALL, now=2.0).conns) == ["t2", "t3"]
    assert sorted(r.route(channel("u2"), note(4), wall=WALL, now=2.0).conns) == ["t2", "t3"]
