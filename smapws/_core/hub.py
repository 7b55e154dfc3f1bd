"""The user -> connections registry.

The hub knows which connections belong to which user and nothing about
sockets: connections are opaque hashable objects. It is the seed's ``Hub``
(``connections["user_123"] = [conn_tab1, conn_tab2, conn_tab3]``) including its
disconnect semantics: removing a connection reports whether the user still
has others (``OnUserDisconnected(user, hasOtherConnections)``), and a user
with none left is forgotten, so memory follows the live connections.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class Hub(Generic[C]):
    """Registry of live connections by user id. Not thread-safe; the trio
    shell uses it from one thread."""

    __slots__ = ("_count", "_users")

    def __init__(self) -> None:
        self._users: dict[str, set[C]] = {}
        self._count = 0

    def add(self, user_id: str, conn: C) -> int:
        """Register ``conn`` for ``user_id``; return how many connections the
        user now has. Adding the same connection twice is a no-op."""
        conns = self._users.get(user_id)
        if conns is None:
            conns = self._users[user_id] = set()
        if conn not in conns:
            conns.add(conn)
            self._count += 1
        return len(conns)

    def remove(self, user_id: str, conn: C) -> bool:
        """Unregister ``conn``; return ``has_other_connections`` for the user.

        Removing an unknown connection is a no-op that reports the user's
        current state. The last connection's removal forgets the user.
        """
        conns = self._users.get(user_id)
        if conns is None:
            return False
        if conn in conns:
            conns.remove(conn)
            self._count -= 1
        if not conns:
            del self._users[user_id]
            return False
        return True

    def connections(self, user_id: str) -> set[C]:
        """The user's live connections (empty when none). The returned set is
        the registry's own: iterate over a copy if you may add or remove while
        iterating."""
        return self._users.get(user_id) or set()

    def all_connections(self) -> Iterator[C]:
        """Every live connection, as a snapshot safe to use while removing."""
        return iter([c for conns in self._users.values() for c in conns])

    def users(self) -> list[str]:
        """The users with at least one live connection (a snapshot)."""
        return list(self._users)

    @property
    def active_connections(self) -> int:
        return self._count

    @property
    def active_users(self) -> int:
        return len(self._users)
