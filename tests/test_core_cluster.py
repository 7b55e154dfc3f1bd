"""The cluster slot map (smapws._core.cluster), sans-IO."""

from __future__ import annotations

import pytest

from smapws._core.cluster import SLOTS, SlotMap, TopologyError

ASKED = ("10.0.0.9", 7000)

#: A CLUSTER SLOTS reply as redis-py returns it (RESP2, raw bytes).
REPLY = [
    [10923, 16383, [b"10.0.0.3", 7002, b"id3", {}], [b"10.0.0.6", 7005, b"id6", {}]],
    [0, 5460, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.4", 7003, b"id4"]],
    [5461, 10922, [b"", 7001, b"id2"]],  # a node that does not know its address
]


def test_owner_of_every_slot_and_the_nodes() -> None:
    slots = SlotMap.parse(REPLY, ASKED)
    assert slots.owner(0) == ("10.0.0.1", 7000)
    assert slots.owner(5460) == ("10.0.0.1", 7000)
    assert slots.owner(5461) == ("10.0.0.9", 7001)
    assert slots.owner(SLOTS - 1) == ("10.0.0.3", 7002)
    assert slots.covered == SLOTS
    assert slots.masters == (("10.0.0.1", 7000), ("10.0.0.9", 7001), ("10.0.0.3", 7002))
    assert set(slots.nodes) == {
        ("10.0.0.1", 7000), ("10.0.0.9", 7001), ("10.0.0.3", 7002),
        ("10.0.0.4", 7003), ("10.0.0.6", 7005),
    }  # fmt: skip


def test_uncovered_slots_have_no_owner() -> None:
    slots = SlotMap.parse([[100, 200, ["h", "7000", "id"]]], ASKED)
    assert slots.owner(99) is None and slots.owner(201) is None
    assert slots.owner(150) == ("h", 7000)
    assert slots.covered == 101
    empty = SlotMap.parse([], ASKED)
    assert empty.covered == 0 and empty.masters == () and empty.owner(0) is None


@pytest.mark.parametrize(
    "reply",
    [
        b"not an array",
        [[0, 10]],
        [[0, SLOTS, [b"h", 1]]],
        [[10, 5, [b"h", 1]]],
        [[0, 10, [b"h", 1]], [5, 20, [b"h", 2]]],
        [[0, 10, [b"h", 0]]],
        [[0, 10, [b"h", b"port"]]],
        [[0, 10, b"h:1"]],
        [[0, 10, [None, 1]]],
        [[True, 10, [b"h", 1]]],
    ],
)
def test_a_reply_that_cannot_be_read_is_refused(reply: object) -> None:
    with pytest.raises(TopologyError):
        SlotMap.parse(reply, ASKED)
