"""The user -> connections registry and the bounded outbox (sans-IO)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smapws._core.envelope import Envelope, parse
from smapws._core.hub import Hub
from smapws._core.outbox import Outbox, OutboxLimits


def test_multi_tab_and_disconnect_semantics() -> None:
    hub: Hub[str] = Hub()
    assert hub.add("user_123", "tab1") == 1
    assert hub.add("user_123", "tab2") == 2
    assert hub.add("user_123", "tab3") == 3
    assert hub.add("user_123", "tab3") == 3  # idempotent
    assert hub.add("user_9", "other") == 1
    assert hub.connections("user_123") == {"tab1", "tab2", "tab3"}
    assert (hub.active_connections, hub.active_users) == (4, 2)
    # Closing Tab 2: the user still has others.
    assert hub.remove("user_123", "tab2") is True
    assert hub.connections("user_123") == {"tab1", "tab3"}
    assert hub.remove("user_123", "tab1") is True
    # The last tab: has_other_connections is False and the user is forgotten.
    assert hub.remove("user_123", "tab3") is False
    assert hub.connections("user_123") == set()
    assert (hub.active_connections, hub.active_users) == (1, 1)
    assert hub.remove("nobody", "x") is False


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 5)), max_size=60))
def test_counts_always_match_the_registry(ops: list[tuple[bool, int, int]]) -> None:
    hub: Hub[int] = Hub()
    model: dict[str, set[int]] = {}
    for add, user, conn in ops:
        u = f"u{user}"
        if add:
            hub.add(u, conn)
            model.setdefault(u, set()).add(conn)
        else:
            had_others = hub.remove(u, conn)
            model.get(u, set()).discard(conn)
            if not model.get(u):
                model.pop(u, None)
            assert had_others == bool(model.get(u))
    assert hub.active_connections == sum(len(c) for c in model.values())
    assert hub.active_users == len(model)
    assert sorted(hub.all_connections()) == sorted(c for cs in model.values() for c in cs)


def _env(n: int, size: int = 10) -> Envelope:
    raw = b'{"type":"t","payload":{"n":%d,"pad":"%s"}}' % (n, b"x" * size)
    return parse(raw, wall_time=0, received_at=0)


def test_outbox_bounds_by_count() -> None:
    box = Outbox(OutboxLimits(max_messages=2, max_bytes=10_000))
    assert box.push(_env(1))
    assert box.push(_env(2))
    assert not box.push(_env(3))
    taken = box.take_all()
    assert [e.payload["n"] for e in taken] == [1, 2]
    assert len(box) == 0 and box.queued_bytes == 0
    assert box.push(_env(4))


def test_outbox_bounds_by_bytes() -> None:
    one = _env(1, 100)
    box = Outbox(OutboxLimits(max_messages=100, max_bytes=len(one.frame) * 2))
    assert box.push(one)
    assert box.push(_env(2, 100))
    assert not box.push(_env(3, 100))
    assert box.queued_bytes == len(one.frame) * 2
