"""The current state a new tab needs: the latest progress of each running project.

A tab opened mid-run would otherwise show nothing until the next progress
update (the Collector throttles them to one per 5 s). The hub keeps, per user,
the latest ``project_progress`` envelope of each project, and for a short
while the ``project_completed`` that ended it; a new connection receives these
first, as the ordinary messages they were, with their original timestamps.

Bounds: at most ``per_user`` projects per user (the least recently updated is
forgotten first), at most ``max_entries`` in all (likewise, across users),
and each entry expires ``ttl`` seconds after its last update
(``completed_ttl`` for completions). Memory is therefore at most
``max_entries`` x (message size + ~300 bytes of bookkeeping).

In pattern mode every node keeps the snapshot of every user (all nodes see
all messages), so a tab gets the same state whichever node the load balancer
picks. In user mode a node sees only the messages of the users it is
subscribed to, and forgets a user's entries when it unsubscribes
(:meth:`Snapshots.forget_user`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from smapws._core.envelope import COMPLETED, PROGRESS, Envelope


@dataclass(frozen=True, slots=True)
class SnapshotLimits:
    ttl: float = 600.0
    completed_ttl: float = 30.0
    per_user: int = 32
    max_entries: int = 20_000


@dataclass(slots=True)
class _Entry:
    envelope: Envelope
    expires_at: float


class Snapshots:
    """Latest progress per (user, project). Sans-IO: time is an argument."""

    __slots__ = ("_limits", "_lru", "_users")

    def __init__(self, limits: SnapshotLimits) -> None:
        self._limits = limits
        self._users: dict[str, dict[str, _Entry]] = {}
        # Every (user, project), least recently updated first.
        self._lru: OrderedDict[tuple[str, str], None] = OrderedDict()

    def observe(self, user: str, envelope: Envelope, now: float) -> None:
        """Record ``envelope`` if it is progress or a completion."""
        kind = envelope.kind
        if kind != PROGRESS and kind != COMPLETED:
            return
        key = envelope.key
        assert key is not None
        lim = self._limits
        ttl = lim.ttl if kind == PROGRESS else lim.completed_ttl
        projects = self._users.get(user)
        if projects is None:
            projects = self._users[user] = {}
        projects.pop(key, None)  # re-insert: dict order is update order
        projects[key] = _Entry(envelope, now + ttl)
        ident = (user, key)
        self._lru[ident] = None
        self._lru.move_to_end(ident)
        while len(projects) > lim.per_user:
            self._forget(user, next(iter(projects)))
        while len(self._lru) > lim.max_entries:
            self._forget(*next(iter(self._lru)))

    def _forget(self, user: str, key: str) -> None:
        self._lru.pop((user, key), None)
        projects = self._users.get(user)
        if projects is not None:
            projects.pop(key, None)
            if not projects:
                del self._users[user]

    def forget_user(self, user: str) -> int:
        """Forget everything held for ``user`` (its messages stopped reaching
        this hub: what is held would go stale). Returns how many entries."""
        projects = self._users.pop(user, None)
        if not projects:
            return 0
        for key in projects:
            self._lru.pop((user, key), None)
        return len(projects)

    def for_user(self, user: str, now: float) -> list[Envelope]:
        """The user's current state, oldest update first; expired entries are
        left out (and forgotten)."""
        projects = self._users.get(user)
        if not projects:
            return []
        out: list[Envelope] = []
        expired: list[str] = []
        for key, entry in projects.items():
            if entry.expires_at <= now:
                expired.append(key)
            else:
                out.append(entry.envelope)
        for key in expired:
            self._forget(user, key)
        return out

    def sweep(self, now: float) -> int:
        """Forget every expired entry; return how many. O(entries)."""
        dead = [
            (user, key)
            for user, projects in self._users.items()
            for key, entry in projects.items()
            if entry.expires_at <= now
        ]
        for user, key in dead:
            self._forget(user, key)
        return len(dead)

    def __len__(self) -> int:
        return len(self._lru)
