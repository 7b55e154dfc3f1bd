"""The replay window (smapws._core.history.History) against a model of it.

The model below keeps the window's rules in the plainest form (one list of
every entry, oldest first, and linear scans): the per-user count and byte
bounds, the total byte bound that forgets the entries of users not held
first, ``ttl`` expiry, holds, and replays. A random sequence of operations
on a few users, with bounds small enough that each of them triggers, must
give the same answers from both, and leave the same windows behind, after
every operation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from smapws._core.envelope import COMPLETED, OTHER, PROGRESS, Envelope
from smapws._core.history import (
    AGE_TOLERANCE,
    ENTRY_OVERHEAD,
    USER_OVERHEAD,
    History,
    HistoryLimits,
    Resume,
)

USERS = ("a", "b", "c")
#: Few ids, so that they recur within a window (a log that expired).
MIDS = ("0" * 16, "1" * 16, "2" * 16, "3" * 16)
#: (type, kind, key) of the messages: events, and progress and completion of
#: two projects (for the replay's conflation).
KINDS = (
    ("notification", OTHER, None),
    ("project_progress", PROGRESS, "p1"),
    ("project_progress", PROGRESS, "p2"),
    ("project_completed", COMPLETED, "p1"),
    ("project_completed", COMPLETED, "p2"),
)

#: An envelope as the comparison sees it: its fields.
Fields = tuple[str, int, str | None, bytes, float]


def fields(env: Envelope) -> Fields:
    assert isinstance(env, Envelope)
    return (env.type, env.kind, env.key, env.frame, env.received_at)


@dataclass
class _Entry:
    seq: int
    user: str
    mid: str
    prev: str
    at: float
    env: Fields

    @property
    def size(self) -> int:
        return len(self.env[3]) + ENTRY_OVERHEAD


class Model:
    """The window's rules, with lists."""

    def __init__(self, limits: HistoryLimits) -> None:
        self.lim = limits
        self.entries: list[_Entry] = []  # every entry, oldest first
        #: The seqs of the entries of users not held, in the order the total
        #: bound forgets them: an entry joins the back when it is recorded for
        #: a user not held, or when its user's hold ends (in window order).
        self.cold: list[int] = []
        self.holds: dict[str, float] = {}  # user -> held until
        self.epoch = 0
        self.seq = 0

    def window(self, user: str) -> list[_Entry]:
        return [e for e in self.entries if e.user == user]

    def user_bytes(self, user: str) -> int:
        window = self.window(user)
        return USER_OVERHEAD + sum(e.size for e in window) if window else 0

    @property
    def bytes(self) -> int:
        return sum(self.user_bytes(u) for u in {e.user for e in self.entries})

    def users(self) -> int:
        return len({e.user for e in self.entries})

    def held(self) -> int:
        return len(self.holds)

    def __len__(self) -> int:
        return len(self.entries)

    def _remove(self, entry: _Entry) -> None:
        self.entries = [e for e in self.entries if e.seq != entry.seq]
        self.cold = [s for s in self.cold if s != entry.seq]

    def _expire(self, user: str, now: float) -> None:
        horizon = now - self.lim.ttl
        while self.window(user) and self.window(user)[0].at <= horizon:
            self._remove(self.window(user)[0])

    def record(self, user: str, mid: str, prev: str, env: Fields, now: float) -> None:
        lim = self.lim
        self.seq += 1
        self.entries.append(_Entry(self.seq, user, mid, prev, now, env))
        if user not in self.holds:
            self.cold.append(self.seq)
        while len(self.window(user)) > lim.per_user or (
            self.user_bytes(user) > lim.per_user_bytes and len(self.window(user)) > 1
        ):
            self._remove(self.window(user)[0])
        while self.bytes > lim.max_bytes and self.entries:
            victim = self.cold[0] if self.cold else self.entries[0].seq
            self._remove(next(e for e in self.entries if e.seq == victim))

    def chain(self, user: str, now: float) -> list[tuple[str, str, Fields]]:
        self._expire(user, now)
        return [(e.mid, e.prev, e.env) for e in self.window(user)]

    def after(self, user: str, since: str, age: float | None, now: float) -> list[Fields] | None:
        self._expire(user, now)
        window = self.window(user)
        found = [i for i, e in enumerate(window) if e.mid == since]
        if not found:
            return None
        i = found[-1]
        if age is not None and now - window[i].at < age - AGE_TOLERANCE:
            return None
        rest = [e.env for e in window[i + 1 :]]
        # A progress is kept only if no later progress or completion of its
        # project follows it.
        return [
            env
            for j, env in enumerate(rest)
            if env[1] != PROGRESS
            or not any(
                later[1] in (PROGRESS, COMPLETED) and later[2] == env[2] for later in rest[j + 1 :]
            )
        ]

    def clear(self) -> None:
        self.entries = []
        self.cold = []
        self.epoch += 1

    def forget_user(self, user: str) -> None:
        self.epoch += 1
        for e in self.window(user):
            self._remove(e)

    def sweep(self, now: float) -> int:
        for user in [u for u, until in self.holds.items() if until <= now]:
            del self.holds[user]
            self.cold += [e.seq for e in self.window(user) if e.seq not in self.cold]
        horizon = now - self.lim.ttl
        n = 0
        while self.entries and self.entries[0].at <= horizon:
            self._remove(self.entries[0])
            n += 1
        return n

    def hold(self, user: str) -> None:
        self.holds[user] = math.inf
        mine = {e.seq for e in self.window(user)}
        self.cold = [s for s in self.cold if s not in mine]

    def release(self, user: str, now: float) -> None:
        if user in self.holds:
            self.holds[user] = now + self.lim.ttl


# -- the operations ----------------------------------------------------------

_users = st.sampled_from(USERS)
_mids = st.sampled_from(MIDS)
#: Steps of the clock: multiples of 0.5, so that entries land exactly on the
#: ttl horizon and on AGE_TOLERANCE.
_dt = st.sampled_from([0.0] * 6 + [0.5, 0.5, 1.0, 2.0, 3.0])
_OPS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "record": st.tuples(
        st.just("record"),
        _users,
        _mids,
        _mids,
        st.integers(0, len(KINDS) - 1),
        st.integers(0, 300),  # the frame's size
        _dt,
    ),
    "hold": st.tuples(st.just("hold"), _users, _dt),
    "release": st.tuples(st.just("release"), _users, _dt),
    "sweep": st.tuples(st.just("sweep"), _dt),
    "forget_user": st.tuples(st.just("forget_user"), _users, _dt),
    "clear": st.tuples(st.just("clear"), _dt),
    "after": st.tuples(
        st.just("after"),
        _users,
        _mids,
        st.sampled_from([None, None, 0.0, 1.0, 2.0, 2.5, 3.0, 4.0, 10.0]),
        _dt,
    ),
    "chain": st.tuples(st.just("chain"), _users, _dt),
}
#: Mostly records and replays, so that windows fill up between the clears.
_WEIGHTS = {"record": 20, "after": 6, "hold": 3, "release": 3, "sweep": 3, "chain": 1}
OPS = st.sampled_from([n for n in _OPS for _ in range(_WEIGHTS.get(n, 1))]).flatmap(
    _OPS.__getitem__
)

#: No bound (so that the others are seen at work alone).
_UNBOUNDED = 1 << 40
LIMITS = st.builds(
    HistoryLimits,
    ttl=st.sampled_from([2.0, 3.0, 10.0, 30.0]),
    per_user=st.one_of(st.integers(1, 6), st.just(100)),
    # From one entry of a user's to a few.
    per_user_bytes=st.one_of(
        st.integers(USER_OVERHEAD + ENTRY_OVERHEAD, USER_OVERHEAD + 5 * 950), st.just(_UNBOUNDED)
    ),
    # From one user's window of one entry to a few users' of a few.
    max_bytes=st.one_of(
        st.integers(USER_OVERHEAD + ENTRY_OVERHEAD, 3 * USER_OVERHEAD + 10 * 950),
        st.just(_UNBOUNDED),
    ),
)


def run(ops: list[tuple[Any, ...]], limits: HistoryLimits, subject: Any) -> None:
    """Apply ``ops`` to ``subject`` (a History, or anything with its
    methods) and to the model, comparing everything observable after each."""
    model = Model(limits)
    now = 0.0
    n = 0
    for op in ops:
        name, *args, dt = op
        now += dt
        if name == "record":
            user, mid, prev, kind, size = args
            n += 1
            mtype, k, key = KINDS[kind]
            env = Envelope(mtype, k, key, b"%d:" % n + b"x" * size, now)
            subject.record(user, mid, prev, env, now)
            model.record(user, mid, prev, fields(env), now)
        elif name == "hold":
            subject.hold(args[0])
            model.hold(args[0])
        elif name == "release":
            subject.release(args[0], now)
            model.release(args[0], now)
        elif name == "sweep":
            assert subject.sweep(now) == model.sweep(now), op
        elif name == "forget_user":
            subject.forget_user(args[0])
            model.forget_user(args[0])
        elif name == "clear":
            subject.clear()
            model.clear()
        elif name == "after":
            user, since, age = args
            got = subject.after(user, Resume(since, age), now)
            want = model.after(user, since, age, now)
            assert (None if got is None else [fields(e) for e in got]) == want, op
        else:
            assert name == "chain"
            got = subject.chain(args[0], now)
            want = model.chain(args[0], now)
            assert [(m, p, fields(e)) for m, p, e in got] == want, op
        assert len(subject) == len(model), op
        assert subject.bytes == model.bytes, op
        assert subject.users() == model.users(), op
        assert subject.held() == model.held(), op
        assert subject.epoch == model.epoch, op
        for user in USERS:
            assert subject.user_bytes(user) == model.user_bytes(user), (op, user)
            # What each window holds: at -inf, nothing is old enough to expire.
            kept = [(m, p, fields(e)) for m, p, e in subject.chain(user, -math.inf)]
            assert kept == [(e.mid, e.prev, e.env) for e in model.window(user)], (op, user)


@settings(max_examples=300, deadline=None)
@given(limits=LIMITS, ops=st.lists(OPS, min_size=20, max_size=100))
def test_the_window_keeps_forgets_and_replays_as_its_model(
    limits: HistoryLimits, ops: list[tuple[Any, ...]]
) -> None:
    run(ops, limits, History(limits))


@settings(max_examples=100, deadline=None)
@given(
    ttl=st.sampled_from([3.0, 30.0]),
    ops=st.lists(OPS.filter(lambda op: op[0] not in ("clear", "forget_user")), max_size=100),
)
def test_long_windows_replay_as_the_model_does(ttl: float, ops: list[tuple[Any, ...]]) -> None:
    """No bound but ttl: long windows, so replays with recurring ids and
    conflated progress."""
    limits = HistoryLimits(ttl=ttl, per_user=1000, max_bytes=_UNBOUNDED, per_user_bytes=_UNBOUNDED)
    run(ops, limits, History(limits))


def test_a_hold_that_ends_puts_its_window_behind_the_other_cold_ones() -> None:
    """The order the total bound forgets in is not the entries' age alone:
    a user's window whose hold ended (its entries recorded while held) goes
    behind the entries of users not held, older ones included."""
    limits = HistoryLimits(ttl=10.0, per_user=10, max_bytes=2 * USER_OVERHEAD + 3 * ENTRY_OVERHEAD)
    ops: list[tuple[Any, ...]] = [
        ("hold", "a", 0.0),
        ("release", "a", 0.0),  # held until 10
        ("record", "a", MIDS[0], MIDS[3], 0, 0, 1.0),  # a1 at 1
        ("record", "b", MIDS[1], MIDS[3], 0, 0, 1.0),  # b1 at 2
        ("sweep", 8.0),  # at 10: a's hold ends, nothing expires
        ("record", "b", MIDS[2], MIDS[1], 0, 0, 0.0),  # b2: over the bound
    ]
    history = History(limits)
    run(ops, limits, history)
    # b1 went (the cold order: b1, a1, b2), not a1, the oldest.
    assert [m for m, _, _ in history.chain("a", 10.0)] == [MIDS[0]]
    assert [m for m, _, _ in history.chain("b", 10.0)] == [MIDS[2]]
    # ... and a1 is next, before b2: the hold that ended made it cold.
    run([*ops, ("record", "b", MIDS[3], MIDS[2], 0, 0, 0.0)], limits, history := History(limits))
    assert history.chain("a", 10.0) == []
    assert [m for m, _, _ in history.chain("b", 10.0)] == [MIDS[2], MIDS[3]]
