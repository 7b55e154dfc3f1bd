"""The per-user replay window behind ``/ws?since=<id>``, in this hub.

**Ids** are chained (:mod:`smapws._core.fleet`): each commits to the id of
the message before it on its channel, so every hub computes the same ones.

**Window.** For each user the hub keeps the messages of the last ``ttl``
seconds, at most ``per_user`` of them, and at most ``max_bytes`` in all
(oldest first, across users). :meth:`History.after` returns what a tab that
last saw ``since`` has missed: every event (notification, alert, completion,
other types) in order, and of progress only each project's latest update,
where it stands in the order, and only when no completion of that project
followed it. A tab whose id this window does not hold is answered from the
fleet's log in Redis where there is one (:mod:`smapws._io.fleetlog`).

**Bytes** (issue 16). ``max_bytes`` and each user's share of it,
``per_user_bytes`` (the user's oldest forgotten first), count what the window
really costs: each entry's frame plus :data:`ENTRY_OVERHEAD`, and each user
with a window :data:`USER_OVERHEAD` (:meth:`History._charge`). For the
total bound, the windows of users *held* here (a tab open on this hub, or
closed less than ``ttl`` ago: :meth:`History.hold`) go last: a flood to ids
nobody uses, or to users gone, cannot evict the window a tab is about to
resume from.

Sans-IO: time is an argument; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from smapws._core.envelope import COMPLETED, PROGRESS, Envelope

#: Hex characters in an id: 64 bits. Ids only need to be unique within one
#: user's window (a few hundred messages); 2^-64 collisions are no concern.
ID_HEX_CHARS: Final = 16
_ID_CHARS: Final = frozenset("0123456789abcdef")

#: Bytes an entry costs beyond its frame (the entry object, the window's
#: bookkeeping, the envelope object and its strings): measured with
#: tracemalloc by ``bench/history_memory.py`` and ``bench/cache_memory.py``
#: on CPython 3.11 (635 and 628).
ENTRY_OVERHEAD: Final = 650

#: Bytes a user's window costs beyond its entries (the window object, its
#: deque and dict, the user's slot and id string): measured with tracemalloc
#: by ``bench/cache_memory.py`` on CPython 3.11.
USER_OVERHEAD: Final = 1100

#: Seconds by which a tab may claim to have seen ``since`` before this hub
#: received it (``since_age`` larger than the entry's age) and still be
#: taken at its word: delivery latency and the spread between hubs receiving
#: the same message. Beyond it, the entry is a different message that reuses
#: the id (see docs/design/recovery.rst) and the answer is a gap.
AGE_TOLERANCE: Final = 2.0

#: Largest ``since_age`` accepted (a week): larger values are certainly gaps
#: anyway, and the bound keeps the float sane.
MAX_SINCE_AGE: Final = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """The replay window's bounds. The defaults are the ``SMAPWS_HISTORY_*``
    settings' (:mod:`smapws._config` reads them from here)."""

    ttl: float = 300.0
    per_user: int = 100
    max_bytes: int = 32 * 1024 * 1024
    #: One user's share of ``max_bytes``: traffic to one user cannot take
    #: the window of the others (1 MiB: 100 messages of 10 KiB).
    per_user_bytes: int = 1024 * 1024

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.per_user > 0 and self.max_bytes > 0


@dataclass(frozen=True, slots=True)
class Resume:
    """What a tab asked for with ``?since=<id>[&since_age=<seconds>]``:
    everything after the message ``since``, which it received ``age``
    seconds ago (None: not said)."""

    since: str
    age: float | None = None
    #: What the fleet's log had after ``since`` (set by the hub before the
    #: connection registers, when this window does not hold ``since``).
    fleet: FleetReplay | None = None


@dataclass(frozen=True, slots=True)
class FleetReplay:
    """The log's chain after a resuming tab's ``since``: its messages,
    their (id, previous id) links, and this hub's :attr:`History.epoch`
    when it was read."""

    envelopes: tuple[Envelope, ...]
    links: tuple[tuple[str, str], ...]
    epoch: int


def parse_resume(query: Mapping[str, str]) -> Resume | None:
    """The :class:`Resume` a ``/ws`` query asks for; None when it has no
    (or an empty) ``since``. Raises :class:`ValueError` for a ``since`` that
    is not an id (16 lower-case hex characters) or a ``since_age`` that is
    not a number of seconds in 0..one week."""
    since = query.get("since")
    if not since:
        return None
    if len(since) != ID_HEX_CHARS or not _ID_CHARS.issuperset(since):
        raise ValueError("since: expected a message id")
    raw_age = query.get("since_age")
    if raw_age is None or raw_age == "":
        return Resume(since)
    try:
        age = float(raw_age)
    except ValueError as exc:
        raise ValueError("since_age: expected seconds") from exc
    if not math.isfinite(age) or not 0 <= age <= MAX_SINCE_AGE:
        raise ValueError("since_age: expected seconds")
    return Resume(since, age)


#: One message of a window: an exact tuple of atomic values, ``(seq, id,
#: previous id, at, size, type, kind, key, frame, received_at)`` (the last
#: five are its :class:`Envelope`'s fields, rebuilt for a replay). Not an
#: object of a class, nor holding the envelope: a window holds tens of
#: thousands of messages for seconds each, and as objects they were two per
#: message that the cyclic collector tracked into its oldest generation, whose
#: full collections then scanned them all (13 ms each at 24,000
#: deliveries/s). The collector stops tracking a tuple of atomic values at its
#: first collection. ``seq`` numbers every entry of this hub, in order: the
#: key of the two orders below.
_Entry = tuple[int, str, str, float, int, str, int, str | None, bytes, float]
_SEQ: Final = 0
_MID: Final = 1
_PREV: Final = 2
_AT: Final = 3
_SIZE: Final = 4


def _envelope(entry: _Entry) -> Envelope:
    return Envelope(entry[5], entry[6], entry[7], entry[8], entry[9])


class _UserWindow:
    # The user, not the window, is what the orders below name: an entry or
    # an order holding its window would be a reference cycle, which a window
    # dropped whole (clear(), after a Redis outage: up to max_bytes of
    # frames) would leave to the cyclic garbage collector, rarely run in the
    # hub (tests/test_gc_cycles.py).
    __slots__ = ("bytes", "entries", "user")

    def __init__(self, user: str) -> None:
        self.user = user
        #: Bytes accounted to this window, its USER_OVERHEAD included.
        self.bytes = 0
        self.entries: deque[_Entry] = deque()


class History:
    """The replay window of every user. Sans-IO: ``now`` is an argument, on
    one monotonic clock (the hub passes ``trio.current_time()``)."""

    __slots__ = ("_bytes", "_cold", "_epoch", "_held", "_limits", "_order", "_seq", "_users")

    def __init__(self, limits: HistoryLimits) -> None:
        self._limits = limits
        self._users: dict[str, _UserWindow] = {}
        #: Every entry's seq -> its user, oldest first (for the total bound
        #: and expiry).
        self._order: OrderedDict[int, str] = OrderedDict()
        self._seq = 0
        self._bytes = 0
        #: How many times a window was cleared for a hole (:attr:`epoch`).
        self._epoch = 0
        #: The entries of users not held (seq -> user), in the order the
        #: total bound forgets them (each user's in window order)
        #: (:meth:`hold`).
        self._cold: OrderedDict[int, str] = OrderedDict()
        #: Held users -> until when (inf while a tab is open).
        self._held: dict[str, float] = {}

    @property
    def limits(self) -> HistoryLimits:
        return self._limits

    @property
    def epoch(self) -> int:
        """Changes whenever a window is cleared because the subscription had
        a hole (:meth:`clear`, :meth:`forget_user`): a replay prepared
        before that may not be joined to the window after it."""
        return self._epoch

    def record(self, user: str, mid: str, prev: str, envelope: Envelope, now: float) -> None:
        """Append a message (as delivered, id included; ``prev``: the id it
        follows) to ``user``'s window and enforce the bounds, oldest first."""
        lim = self._limits
        window = self._users.get(user)
        if window is None:
            window = self._users[user] = _UserWindow(user)
            self._charge(window, USER_OVERHEAD)
        seq = self._seq = self._seq + 1
        size = len(envelope.frame) + ENTRY_OVERHEAD
        e = envelope
        window.entries.append(
            (seq, mid, prev, now, size, e.type, e.kind, e.key, e.frame, e.received_at)
        )
        user = window.user  # one string per user, not per message
        self._order[seq] = user
        if user not in self._held:
            self._cold[seq] = user
        self._charge(window, size)
        while len(window.entries) > lim.per_user or (
            window.bytes > lim.per_user_bytes and len(window.entries) > 1
        ):
            self._forget(window)
        while self._bytes > lim.max_bytes and self._order:
            order = self._cold or self._order
            oldest = next(iter(order))
            window = self._users[order[oldest]]
            assert window.entries[0][_SEQ] == oldest
            self._forget(window)

    def chain(self, user: str, now: float) -> list[tuple[str, str, Envelope]]:
        """``(id, previous id, envelope)`` of every message in ``user``'s
        window, oldest first (what :func:`smapws._core.fleet.splice` joins
        to the fleet's log)."""
        window = self._users.get(user)
        if window is None:
            return []
        self._expire_user(window, now)
        return [(e[_MID], e[_PREV], _envelope(e)) for e in window.entries]

    def after(self, user: str, resume: Resume, now: float) -> list[Envelope] | None:
        """What a tab of ``user`` that last saw ``resume.since`` has missed,
        in order (see the module docstring), possibly nothing. None when the
        window cannot tell: the id is unknown here or has left the window, or
        the tab saw its ``since`` well before this hub received the message of
        that id (another message that reuses the id)."""
        window = self._users.get(user)
        if window is None:
            return None
        self._expire_user(window, now)
        entries = list(window.entries)
        since = resume.since
        found = [i for i, e in enumerate(entries) if e[_MID] == since]
        if not found:
            return None
        i = found[-1]  # the newest, should an id recur (a log that expired)
        if resume.age is not None and now - entries[i][_AT] < resume.age - AGE_TOLERANCE:
            return None
        return conflate([_envelope(entry) for entry in entries[i + 1 :]])

    def clear(self) -> None:
        """Forget everything: the subscription was down, so the window has a
        hole that no replay may paper over."""
        self._users.clear()
        self._order.clear()
        self._cold.clear()
        self._bytes = 0
        self._epoch += 1

    def forget_user(self, user: str) -> None:
        """Forget ``user``'s window: that user's subscription was down (user
        mode), so their window has a hole; other users' windows stand."""
        self._epoch += 1
        window = self._users.get(user)
        while window is not None and window.entries:
            self._forget(window)

    def sweep(self, now: float) -> int:
        """Forget every entry older than ``ttl`` and end the holds that
        expired; return how many entries were forgotten."""
        self._expire_holds(now)
        horizon = now - self._limits.ttl
        order = self._order
        n = 0
        while order:
            window = self._users[order[next(iter(order))]]
            if window.entries[0][_AT] > horizon:
                break
            self._forget(window)
            n += 1
        return n

    def _expire_user(self, window: _UserWindow, now: float) -> None:
        horizon = now - self._limits.ttl
        entries = window.entries
        while entries and entries[0][_AT] <= horizon:
            self._forget(window)

    def _forget(self, window: _UserWindow) -> None:
        """Remove the oldest entry of ``window`` (every order's oldest entry
        is the oldest of its window: each holds its windows' entries in
        window order)."""
        entry = window.entries.popleft()
        seq = entry[_SEQ]
        del self._order[seq]
        self._cold.pop(seq, None)
        self._charge(window, -entry[_SIZE])
        if not window.entries:
            del self._users[window.user]
            self._charge(window, -USER_OVERHEAD)

    # -- byte accounting (issue 16): one place, apart from the ids ---------

    def _charge(self, window: _UserWindow, size: int) -> None:
        """Account ``size`` more (negative: fewer) bytes to ``window``'s user
        and to the whole window."""
        window.bytes += size
        self._bytes += size

    def hold(self, user: str) -> None:
        """``user`` has a tab open here: its window goes last for the total
        bound (after every window of a user not held) until :meth:`release`
        and ``ttl`` more."""
        held = self._held
        if user in held:  # none of its entries is cold (record, _expire_holds)
            held[user] = math.inf
            return
        held[user] = math.inf
        window = self._users.get(user)
        if window is not None:
            for entry in window.entries:
                self._cold.pop(entry[_SEQ], None)

    def release(self, user: str, now: float) -> None:
        """``user``'s last tab here closed: its window stays held for ``ttl``
        (the time it may take to resume), then is forgotten like any."""
        if user in self._held:
            self._held[user] = now + self._limits.ttl

    def _expire_holds(self, now: float) -> None:
        ended = [user for user, until in self._held.items() if until <= now]
        for user in ended:
            del self._held[user]
            window = self._users.get(user)
            if window is not None:
                for entry in window.entries:
                    self._cold[entry[_SEQ]] = user

    def held(self) -> int:
        """How many users are held (:meth:`hold`)."""
        return len(self._held)

    def user_bytes(self, user: str) -> int:
        """Bytes accounted to ``user``'s window (0: none)."""
        window = self._users.get(user)
        return 0 if window is None else window.bytes

    def __len__(self) -> int:
        return len(self._order)

    @property
    def bytes(self) -> int:
        """Bytes accounted: frames plus :data:`ENTRY_OVERHEAD` each, plus
        :data:`USER_OVERHEAD` per user with a window."""
        return self._bytes

    def users(self) -> int:
        return len(self._users)


def conflate(missed: list[Envelope]) -> list[Envelope]:
    """``missed`` with each project's progress reduced to its current state:
    a ``project_progress`` is kept only when it is the last message of its
    project in ``missed`` (a later progress replaces it, a later completion
    makes it stale). Everything else is kept; order is kept."""
    last: dict[str | None, int] = {}
    for i, env in enumerate(missed):
        if env.kind == PROGRESS or env.kind == COMPLETED:
            last[env.key] = i
    return [env for i, env in enumerate(missed) if env.kind != PROGRESS or last[env.key] == i]
