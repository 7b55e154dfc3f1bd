"""Chained ids and the fleet log's rules (smapws._core.fleet), sans-IO.

A model of the log (what the append script does, in Python) and of hubs that
subscribe at different moments shows that every hub gives every message the
same id, whichever joined when, including identical copies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smapws._core.fleet import (
    CLUSTER_SLOTS,
    GENESIS,
    HEADER_LEN,
    SUBSCRIBE_MARGIN,
    Chains,
    Header,
    LogEntry,
    chain_after,
    chain_id,
    decode_entry,
    decode_header,
    encode_entry,
    key_slot,
    log_key,
    resolve,
    slot_tag,
    splice,
)

CH = b"user_noti:u1"


def raw(n: int) -> bytes:
    return json.dumps({"type": "notification", "payload": {"n": n}}).encode()


class Log:
    """What smapws/_io/fleetlog.py's APPEND script does to one list."""

    def __init__(self, maxlen: int = 100) -> None:
        self.entries: list[bytes] = []
        self.maxlen = maxlen

    def append(self, mid: str, prev: str, entry: bytes) -> int:
        if self.entries:
            tid = self.entries[-1][:16].decode()
            if tid == mid:
                return 0
            if tid != prev:
                if any(e[:16].decode() == mid for e in self.entries[-self.maxlen : -1]):
                    return 0
                status = 2
            else:
                status = 1
        else:
            status = 1 if prev == GENESIS else 2
        self.entries.append(entry)
        del self.entries[: -self.maxlen]
        return status

    def headers(self, n: int = 32) -> list[Header]:
        return [decode_header(e[:HEADER_LEN]) for e in self.entries[-n:]]

    def read(self) -> list[LogEntry]:
        return [decode_entry(e) for e in self.entries]


class ModelHub:
    """A hub as Router.route runs one: its chain, the log when it does not
    know it, an append per message."""

    def __init__(self, log: Log, joined_wall: float) -> None:
        self.log = log
        self.chains = Chains(150.0, floor_wall=joined_wall)
        self.ids: dict[int, str] = {}

    def receive(self, k: int, data: bytes, wall: float, now: float) -> tuple[str, str, bytes]:
        prev = self.chains.prev("u1", now)
        if prev is None:
            recent = self.log.headers()
            mid, prev = resolve(CH, data, recent, self.chains.floor_ms("u1"))
        else:
            mid = chain_id(CH, data, prev)
        self.chains.advance("u1", mid, now)
        self.ids[k] = mid
        return mid, prev, encode_entry(mid, prev, int(wall * 1000), data)


def test_entries_round_trip_and_foreign_data_is_refused() -> None:
    e = encode_entry("a" * 16, GENESIS, 1_700_000_000_123, b'{"x":1}')
    assert decode_entry(e) == LogEntry("a" * 16, GENESIS, 1_700_000_000_123, b'{"x":1}')
    for bad in (b"", b"short", b"a" * 32 + b"notdigits1234" + b"{}"):
        with pytest.raises(ValueError):
            decode_entry(bad)


def test_ids_and_entries_are_what_every_version_of_the_hub_computes() -> None:
    # Hubs of two versions share a fleet during a rolling update: an id is
    # the module docstring's formula, an entry its layout, whatever the
    # implementation (each wall time, before or after another, its own).
    from hashlib import blake2b

    data = b'{"type":"x","payload":{}}'
    # (What hubs computed when this test pinned it.)
    assert chain_id(CH, data, GENESIS) == "00123e31eccc84da"
    mid = chain_id(CH, data, GENESIS)
    formula = blake2b(mid.encode() + b"\0" + CH + b"\0" + data, digest_size=8).hexdigest()
    assert chain_id(CH, data, mid) == formula
    for wall_ms in (1_700_000_000_123, 1_700_000_000_123, 5, 1_700_000_000_124):
        entry = encode_entry(mid, GENESIS, wall_ms, data)
        assert entry == mid.encode() + GENESIS.encode() + b"%013d" % wall_ms + data


def test_the_log_key_is_in_the_channels_cluster_slot() -> None:
    from redis.crc import key_slot

    assert key_slot(log_key(CH)) == key_slot(CH)


def test_a_hub_that_joins_late_agrees_on_every_id() -> None:
    log = Log()
    a = ModelHub(log, joined_wall=0.0)
    # Identical copies: 0, 0, 1, 0 (same bytes at indexes 0, 1 and 3).
    stream = [raw(0), raw(0), raw(1), raw(0), raw(2)]
    walls = [10.0, 20.0, 30.0, 40.0, 50.0]
    for k in range(2):
        mid, prev, entry = a.receive(k, stream[k], walls[k], walls[k])
        log.append(mid, prev, entry)
    b = ModelHub(log, joined_wall=25.0)  # between the copies
    for k in range(2, 5):
        for hub in (a, b) if k % 2 else (b, a):  # either may append first
            mid, prev, entry = hub.receive(k, stream[k], walls[k], walls[k])
            log.append(mid, prev, entry)
    assert [a.ids[k] for k in range(2, 5)] == [b.ids[k] for k in range(2, 5)]
    assert len(set(a.ids.values())) == 5  # identical copies told apart
    assert len(log.entries) == 5  # each written once


@settings(max_examples=300, deadline=None)
@given(
    contents=st.lists(st.integers(0, 2), min_size=1, max_size=25),
    joins=st.lists(st.integers(0, 25), min_size=1, max_size=4),
    order=st.randoms(use_true_random=False),
)
def test_hubs_joining_anywhere_agree_with_the_first(
    contents: list[int], joins: list[int], order: Any
) -> None:
    # Messages 2 s apart (more than SUBSCRIBE_MARGIN); each hub joins before
    # message `join`; the hubs that received a message append it in a random
    # order. Every hub's id of every message it received is the first hub's.
    gap = 2 * SUBSCRIBE_MARGIN
    log = Log()
    first = ModelHub(log, joined_wall=0.0)
    late = [(j, ModelHub(log, joined_wall=gap * (j + 1) - 0.25)) for j in joins]
    for k, c in enumerate(contents):
        wall = gap * (k + 1)
        receivers = [first] + [h for j, h in late if k >= j]
        order.shuffle(receivers)
        for hub in receivers:
            mid, prev, entry = hub.receive(k, raw(c), wall, wall)
            log.append(mid, prev, entry)
    for _, hub in late:
        for k, mid in hub.ids.items():
            assert mid == first.ids[k]
    assert len(log.entries) == len(contents)
    # And the log reads back as one chain.
    found = chain_after(log.read(), first.ids[0])
    assert found is not None
    assert [e.mid for e in found[1]] == [first.ids[k] for k in range(1, len(contents))]


def test_chain_after_replays_one_unbroken_chain_only() -> None:
    ids = ["a" * 16, "b" * 16, "c" * 16, "d" * 16]
    entries = [
        LogEntry(ids[0], GENESIS, 1, b"0"),
        LogEntry(ids[1], ids[0], 2, b"1"),
        LogEntry(ids[2], ids[1], 3, b"2"),
    ]
    found = chain_after(entries, ids[0])
    assert found is not None and [e.raw for e in found[1]] == [b"1", b"2"]
    assert found[0].wall_ms == 1
    assert chain_after(entries, ids[2]) == (entries[2], [])
    assert chain_after(entries, ids[3]) is None  # not in the log
    # A missing link (an append that never landed) is a gap, not a replay.
    assert chain_after([entries[0], entries[2]], ids[0]) is None
    # A fork (a hub that missed a message chained on an older one) too.
    fork = [*entries[:2], LogEntry(ids[3], ids[0], 3, b"x"), entries[2]]
    assert chain_after(fork, ids[0]) is None


def test_splice_joins_the_log_and_what_the_hub_routed_since() -> None:
    a, b, c, d = ("a" * 16, "b" * 16, "c" * 16, "d" * 16)
    fleet = [(b, a), (c, b)]
    assert splice(fleet, a, []) == []
    assert splice(fleet, a, [(c, b), (d, c)]) == [1]  # c was in both
    assert splice(fleet, a, [(d, c)]) == [0]
    assert splice([], a, [(b, a)]) == [0]
    assert splice(fleet, a, [(d, b)]) is None  # does not follow c


def test_chains_go_stale_and_reset() -> None:
    chains = Chains(150.0, floor_wall=100.0)
    assert chains.prev("u", 0.0) is None
    chains.advance("u", "a" * 16, 0.0)
    assert chains.prev("u", 150.0) == "a" * 16
    assert chains.prev("u", 150.1) is None  # ask the log again
    assert chains.last("u") == "a" * 16
    assert chains.floor_ms("u") == int((100.0 - SUBSCRIBE_MARGIN) * 1000)
    chains.reset("u", 200.0)
    assert chains.prev("u", 1.0) is None
    assert chains.floor_ms("u") == int((200.0 - SUBSCRIBE_MARGIN) * 1000)
    chains.advance("v", "b" * 16, 0.0)
    chains.sweep(1000.0, 300.0)
    assert len(chains) == 0
    alone = Chains(None, floor_wall=0.0)  # no fleet log: never stale
    assert alone.prev("u", 0.0) == GENESIS
    alone.advance("u", "a" * 16, 0.0)
    assert alone.prev("u", 1e9) == "a" * 16


def test_splice_takes_what_the_hub_routed_before_it_read_the_log() -> None:
    # The hub's window holds b (routed, its append not yet in the log) and
    # what came before the tab's since: b is replayed, the older is not.
    z, a, b, c = ("0" * 16, "a" * 16, "b" * 16, "c" * 16)
    assert splice([], a, [(a, z), (b, a)]) == [1]
    assert splice([], a, [(b, a), (c, b)]) == [0, 1]
    assert splice([(b, a)], a, [(z, GENESIS), (b, a), (c, b)]) == [2]
    assert splice([], a, [(z, GENESIS)]) is None  # neither behind nor after a


@pytest.mark.parametrize("user", ["a}b", "{x}", "x{y}z", "}{", "{}", "plain"])
def test_a_users_log_is_in_the_slot_of_its_channel(user: str) -> None:
    # redis-py's own slot function, the one its cluster client routes by.
    from redis.crc import key_slot as redis_key_slot

    channel = b"user_noti:" + user.encode()
    assert redis_key_slot(log_key(channel)) == redis_key_slot(channel)
    assert key_slot(channel) == redis_key_slot(channel)


def test_log_keys_with_braces_stay_distinct_per_user() -> None:
    users = [b"a}b", b"a}c", b"{x}", b"{x}y", b"x{y}z"]
    keys = {log_key(b"user_noti:" + u) for u in users}
    assert len(keys) == len(users)
    # The common case keeps the key that earlier hubs use (rolling updates).
    assert log_key(b"user_noti:42") == b"{user_noti:42}:smapws:log"


@settings(max_examples=200, deadline=None)
@given(slot=st.integers(0, CLUSTER_SLOTS - 1))
def test_every_slot_has_a_short_tag(slot: int) -> None:
    tag = slot_tag(slot)
    assert len(tag) <= 4 and b"{" not in tag and b"}" not in tag
    assert key_slot(b"{" + tag + b"}:anything") == slot


@settings(max_examples=500, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=120),
        st.builds(
            lambda h, t: h + t,
            st.sampled_from([b"a" * 16 + b"-" * 16 + b"1700000000000", b"0" * 45, b"\xff" * 45]),
            st.binary(max_size=40),
        ),
    )
)
def test_any_bytes_in_the_log_decode_or_raise_value_error(data: bytes) -> None:
    # What Redis holds under a log's key may be anyone's: the hub reads it
    # only through decode_entry, which refuses with ValueError and nothing else.
    try:
        entry = decode_entry(data)
    except ValueError:
        return
    assert len(entry.mid) == 16 and len(entry.prev) == 16 and entry.wall_ms >= 0
    assert encode_entry(*entry) == data


def test_trim_forgets_the_oldest_links_nobody_holds() -> None:
    chains = Chains(None, floor_wall=0.0)
    for i in range(10):
        chains.advance(f"u{i}", "a" * 16, float(i))
    held = {"u0", "u1", "u5"}
    assert chains.trim(lambda u: u in held, 4) == 6
    assert len(chains) == 4
    # The held ones stay however old; of the rest, the newest.
    assert {u for u in (f"u{i}" for i in range(10)) if chains.last(u) != GENESIS} == held | {"u9"}
    assert chains.trim(lambda u: True, 1) == 0  # nothing it may forget
    assert chains.trim(lambda u: False, 10) == 0  # under the limit
