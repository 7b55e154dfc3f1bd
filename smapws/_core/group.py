"""A group of worker processes behind one port (``SMAPWS_WORKERS`` > 1), sans-IO.

What the supervisor knows of its workers and tells each of them back:

- :class:`WorkerReport`: one worker's state as it last reported it (its
  broker subscription, draining, its counts);
- :class:`GroupView`: every slot's latest report (``None`` while no worker
  runs there), the restarts, whether the group drains. Any worker answers
  ``/ready`` and ``/health`` for the whole group from the view the
  supervisor last sent it (:func:`group_health`);
- :class:`RestartBackoff`: how long a slot waits before replacing a worker
  that died.

Nothing here reads a clock, a socket or the environment; times are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

#: First delay before a dead worker is replaced; it doubles for each worker
#: of the slot that died young, up to :data:`RESTART_MAX`.
RESTART_BASE: Final = 0.5
#: The longest wait before a replacement: a worker that keeps dying at
#: start-up (an import error after a botched upgrade, a bad host) costs
#: one start every 30 s, not a busy loop.
RESTART_MAX: Final = 30.0
#: A worker that ran this long resets its slot's backoff: its death is news,
#: not the continuation of a crash loop.
RESTART_STABLE_AFTER: Final = 10.0


class RestartBackoff:
    """Delays between the workers of one slot.

    ``delay(lived_s)`` is asked after each death, with how long that worker
    ran. Guarantees: a worker that ran :data:`RESTART_STABLE_AFTER` or more
    is replaced after ``base``; otherwise each death doubles the delay, up to
    ``cap``, so the k-th quick death in a row waits ``min(cap, base * 2**k)``."""

    def __init__(
        self,
        base: float = RESTART_BASE,
        cap: float = RESTART_MAX,
        stable_after: float = RESTART_STABLE_AFTER,
    ) -> None:
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        self.failures = 0

    def delay(self, lived_s: float) -> float:
        if lived_s >= self.stable_after:
            self.failures = 0
        delay = min(self.cap, self.base * 2.0 ** min(self.failures, 30))
        self.failures += 1
        return delay


@dataclass(frozen=True)
class WorkerReport:
    """One worker's state, as it reports it to the supervisor (at once when
    ``broker`` or ``draining`` changes, with fresh counts every heartbeat)."""

    index: int
    pid: int
    backend: str
    #: The worker's subscription: ``connected``, ``connecting`` or ``down``.
    broker: str
    draining: bool
    connections: int
    users: int
    pending_upgrades: int = 0
    #: Set by the supervisor, never by the worker: it has sent nothing for
    #: longer than its deadline (its loop is stuck, or it was stopped).
    unresponsive: bool = False

    @property
    def ready(self) -> bool:
        """What this worker's own ``/ready`` would say alone."""
        return self.broker == "connected" and not self.draining and not self.unresponsive

    @property
    def status(self) -> str:
        if self.unresponsive:
            return "unresponsive"
        if self.draining:
            return "draining"
        return "ready" if self.ready else "not_ready"


@dataclass(frozen=True)
class GroupView:
    """The whole group, as the supervisor sees it.

    ``workers[i]`` is slot ``i``'s latest report, ``None`` while no worker of
    that slot runs (not started yet, or dead and waiting to be replaced)."""

    workers: tuple[WorkerReport | None, ...]
    restarts: int = 0
    draining: bool = False
    #: ``SMAPWS_MAX_CONNECTIONS``: the group's cap (each worker holds a share).
    max_connections: int = 0

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def running(self) -> int:
        """Slots with a worker that has reported."""
        return sum(w is not None for w in self.workers)

    @property
    def ready_count(self) -> int:
        return sum(w is not None and w.ready for w in self.workers)

    @property
    def ready(self) -> bool:
        """Every slot has a worker, each is subscribed, and nobody drains:
        what ``/ready`` answers (200) on any worker, and when the supervisor
        sends READY=1."""
        return not self.draining and self.ready_count == self.size

    def totals(self) -> tuple[int, int, int]:
        """(connections, users, pending upgrades) summed over the workers.
        Users are counted once per worker they have a connection on."""
        live = [w for w in self.workers if w is not None]
        return (
            sum(w.connections for w in live),
            sum(w.users for w in live),
            sum(w.pending_upgrades for w in live),
        )

    def with_report(self, report: WorkerReport) -> GroupView:
        """This view with ``report`` as its worker's latest (it replaces the
        slot's entry); for the answering worker's fresh values."""
        workers = list(self.workers)
        workers[report.index] = report
        return GroupView(tuple(workers), self.restarts, self.draining, self.max_connections)


def group_health(view: GroupView, own: dict[str, Any], me: WorkerReport) -> dict[str, Any]:
    """The ``/health`` document a worker answers for its group.

    ``own`` is the worker's document as a lone hub writes it, ``me`` its
    report of now. The group's fields replace the lone hub's where a reader
    compares successive answers (any worker may answer the next one):
    ``status`` (``ok`` only when :attr:`GroupView.ready`), ``draining`` and
    the ``websocket`` totals (this worker's live counts, the others' as last
    reported). ``uptime_s`` and ``subscriber`` stay the answering worker's;
    ``workers`` lists every slot."""
    view = view.with_report(me)
    connections, users, pending = view.totals()
    doc = dict(own)
    doc["status"] = "ok" if view.ready else "degraded"
    doc["draining"] = bool(own.get("draining")) or view.draining
    doc["websocket"] = {
        "active_connections": connections,
        "active_users": users,
        "max_connections": view.max_connections,
        "pending_upgrades": pending,
    }
    doc["workers"] = {
        "count": view.size,
        "ready": view.ready_count,
        "running": view.running,
        "restarts": view.restarts,
        "this": me.index,
        "list": [
            {"worker": i, "status": "down"}
            if w is None
            else {
                "worker": i,
                "pid": w.pid,
                "status": w.status,
                "subscriber": w.broker,
                "active_connections": w.connections,
                "active_users": w.users,
            }
            for i, w in enumerate(view.workers)
        ],
    }
    return doc


def share(total: int, workers: int) -> int:
    """Each worker's part of a group-wide cap (``SMAPWS_MAX_CONNECTIONS``):
    ``ceil(total / workers)``, so the shares add up to at least ``total``."""
    return -(-total // workers)
