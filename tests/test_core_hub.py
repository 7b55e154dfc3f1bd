"""The user -> connections registry (sans-IO)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smapws._core.hub import Hub


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
