"""The current state a new tab needs: the latest progress of each running project.

A tab opened mid-run would otherwise show nothing until the next progress
update (the Collector throttles them to one per 5 s). The hub keeps, per user,
the latest ``project_progress`` envelope of each project, and for a short
while the ``project_completed`` that ended it; a new connection receives these
first, as the ordinary messages they were, with their original timestamps.

Bounds: at most ``per_user`` projects and ``per_user_bytes`` bytes per user
(the user's least recently updated project is forgotten first), at most
``max_entries`` and ``max_bytes`` in all (the least recently updated across
users is forgotten first), and each entry expires ``ttl`` seconds after its
last update (``completed_ttl`` for completions). Bytes are what an entry
really costs: its frame plus :data:`ENTRY_OVERHEAD`, and each user with any
entry :data:`USER_OVERHEAD` more, so the bound holds for memory. A
project whose one message is over ``per_user_bytes`` is not kept at all (a
new tab could not be sent it within its send queue anyway). For the total
bounds, the entries of users *held* here (a tab open on this hub, or closed
less than ``ttl`` ago: a reload) go last (:meth:`Snapshots.hold`), so a flood
to ids nobody uses evicts itself first, not the state of users being served.

In pattern mode every node keeps the snapshot of every user (all nodes see
all messages), so a tab gets the same state whichever node the load balancer
picks. In user mode a node sees only the messages of the users it is
subscribed to, and forgets a user's entries when it unsubscribes
(:meth:`Snapshots.forget_user`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from smapws._core.envelope import COMPLETED, PROGRESS, Envelope

#: Bytes an entry costs beyond its frame (the entry, its envelope object and
#: strings, its slots in the user's dict and in the LRUs with its key tuple):
#: measured with tracemalloc by ``bench/cache_memory.py`` on CPython 3.11
#: (650).
ENTRY_OVERHEAD: Final = 680

#: Bytes a user with any entry costs beyond them (the user's dict, its slot
#: in the users' dict, the user id string): same measure.
USER_OVERHEAD: Final = 300


@dataclass(frozen=True, slots=True)
class SnapshotLimits:
    """The current state's bounds. The defaults are the ``SMAPWS_SNAPSHOT_*``
    settings' (:mod:`smapws._config` reads them from here)."""

    ttl: float = 600.0
    completed_ttl: float = 30.0
    per_user: int = 32
    max_entries: int = 20_000
    #: 512 KiB per user fits a new tab's send queue (1 MiB) with room for
    #: live traffic; 32 MiB in all is ~1/8 of a 256 MiB pod (README,
    #: "Memory budget").
    per_user_bytes: int = 512 * 1024
    max_bytes: int = 32 * 1024 * 1024


@dataclass(slots=True)
class _Entry:
    envelope: Envelope
    expires_at: float
    size: int


class Snapshots:
    """Latest progress per (user, project). Sans-IO: time is an argument."""

    __slots__ = ("_bytes", "_cold", "_held", "_limits", "_lru", "_user_bytes", "_users")

    def __init__(self, limits: SnapshotLimits) -> None:
        self._limits = limits
        self._users: dict[str, dict[str, _Entry]] = {}
        #: Bytes accounted per user (entries + USER_OVERHEAD), and in all.
        self._user_bytes: dict[str, int] = {}
        self._bytes = 0
        #: The entries of users not held, least recently updated first: what
        #: the total bounds forget first.
        self._cold: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: Held users -> until when (inf while a tab is open).
        self._held: dict[str, float] = {}
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
        size = len(envelope.frame) + ENTRY_OVERHEAD
        self._forget(user, key)  # re-insert: dict order is update order
        if size + USER_OVERHEAD > lim.per_user_bytes:
            return  # the older state of that project went stale: forgotten
        projects = self._users.get(user)
        if projects is None:
            projects = self._users[user] = {}
            self._charge(user, USER_OVERHEAD)
        projects[key] = _Entry(envelope, now + ttl, size)
        self._charge(user, size)
        self._lru[(user, key)] = None
        if user not in self._held:
            self._cold[(user, key)] = None
        while len(projects) > lim.per_user or self._user_bytes[user] > lim.per_user_bytes:
            self._forget(user, next(iter(projects)))
        while len(self._lru) > lim.max_entries or self._bytes > lim.max_bytes:
            self._forget(*next(iter(self._cold or self._lru)))

    def _charge(self, user: str, size: int) -> None:
        """Account ``size`` more (or, negative, fewer) bytes to ``user``."""
        self._user_bytes[user] = self._user_bytes.get(user, 0) + size
        self._bytes += size

    def _forget(self, user: str, key: str) -> None:
        projects = self._users.get(user)
        if projects is None:
            return
        entry = projects.pop(key, None)
        if entry is None:
            return
        self._lru.pop((user, key), None)
        self._cold.pop((user, key), None)
        self._charge(user, -entry.size)
        if not projects:
            del self._users[user]
            self._bytes -= self._user_bytes.pop(user)  # its USER_OVERHEAD

    def forget_user(self, user: str) -> int:
        """Forget everything held for ``user`` (its messages stopped reaching
        this hub: what is held would go stale). Returns how many entries."""
        projects = self._users.pop(user, None)
        if not projects:
            return 0
        for key in projects:
            self._lru.pop((user, key), None)
            self._cold.pop((user, key), None)
        self._bytes -= self._user_bytes.pop(user)
        return len(projects)

    def hold(self, user: str) -> None:
        """``user`` has a tab open here: its entries go last for the total
        bounds until :meth:`release` and ``ttl`` more."""
        self._held[user] = math.inf
        for key in self._users.get(user, ()):
            self._cold.pop((user, key), None)

    def release(self, user: str, now: float) -> None:
        """``user``'s last tab here closed: held for ``ttl`` more (a reload
        comes back within it)."""
        if user in self._held:
            self._held[user] = now + self._limits.ttl

    def held(self) -> int:
        """How many users are held."""
        return len(self._held)

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
        """Forget every expired entry and end the holds that expired; return
        how many entries were forgotten. O(entries)."""
        ended = [user for user, until in self._held.items() if until <= now]
        for user in ended:
            del self._held[user]
            for key in self._users.get(user, ()):
                self._cold[(user, key)] = None
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

    @property
    def bytes(self) -> int:
        """Bytes accounted: frames, :data:`ENTRY_OVERHEAD` each and
        :data:`USER_OVERHEAD` per user held."""
        return self._bytes

    def user_bytes(self, user: str) -> int:
        """Bytes accounted to ``user`` (0 when nothing is held)."""
        return self._user_bytes.get(user, 0)
