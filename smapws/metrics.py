"""Prometheus metrics of one hub, and of a group of worker processes.

Each hub owns its :class:`Metrics` on its own registry, so several hubs can
live in one process (the tests do this) without clashing. Labels are small
fixed sets (reasons, close codes); there is never a per-user label.

A group of workers (``SMAPWS_WORKERS`` > 1) reports as one: the supervisor
takes a :func:`snapshot` of every worker's registry when ``/metrics`` is
asked for, adds them up with :func:`merge` (plus the counts of workers that
died, :func:`cumulative`) and renders the sum (:func:`render`).
prometheus-client's own multiprocess mode is not used: it reads only its
memory-mapped files, so the hot path's :class:`FastCounter` and
:class:`FastHistogram`, the gauges read at scrape time (``set_function``)
and the ``process_*`` collector would be missing, and it makes every
counter increment a locked write to a mapped file.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Final

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# The *_created series double the exposition for no operational value.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Delivery latency buckets (seconds): the seed investigates above 100 ms, our
#: target is single-digit milliseconds, so resolve 0.25 ms .. 1 s finely.
LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class FastCounter:
    """A counter for the per-message hot path: a plain integer add, read by
    Prometheus at scrape time (prometheus-client's counters take a lock on
    every increment, which was 6% of the hub's CPU at 20,000 deliveries/s).
    Used from the trio thread only."""

    __slots__ = ("before_collect", "documentation", "name", "value")

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0
        #: Called first by :meth:`collect` (to add what is still tallied elsewhere).
        self.before_collect: Callable[[], None] | None = None

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def collect(self) -> list[Metric]:
        if self.before_collect is not None:
            self.before_collect()
        family = CounterMetricFamily(self.name, self.documentation)
        family.add_metric([], self.value)
        return [family]


class FastHistogram:
    """A histogram for the per-message hot path (see :class:`FastCounter`):
    ``observe`` is one C bisect and two adds."""

    __slots__ = ("_bounds", "_counts", "_sum", "before_collect", "documentation", "name")

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self.before_collect: Callable[[], None] | None = None

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def observe_many(self, value: float, count: int) -> None:
        """``count`` observations of ``value``."""
        self._counts[bisect_left(self._bounds, value)] += count
        self._sum += value * count

    def collect(self) -> list[Metric]:
        if self.before_collect is not None:
            self.before_collect()
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip([*self._bounds, math.inf], self._counts, strict=True):
            running += count
            cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], cumulative, sum_value=self._sum)
        return [family]


#: Most consecutive direct writes of one message that share one clock reading
#: (see :class:`DirectWrites`). A user's tabs are a handful; a resync to
#: every open connection re-reads the clock this often, so the latency it
#: records is never more than this many writes (~0.5 ms) old.
SHARED_READING_MAX = 64


class DirectWrites:
    """``messages_sent`` and ``delivery_latency`` for the router's direct
    writes (a connection whose task is not writing gets the message written
    into its socket by :meth:`~smapws._io.connection.Connection.offer`
    itself).

    The router writes one message to each tab of its user in one pass, within
    microseconds of each other. Counting each write and reading the clock for
    each cost more than the rest of the bookkeeping of a delivery, so
    consecutive writes of the same message share the clock reading of the
    first (at most :data:`SHARED_READING_MAX` of them), and are added to the
    counter and the histogram together: when another message is written, or
    when the metrics are read. The metrics keep their meaning: one count and
    one latency observation per message written to a socket.
    """

    __slots__ = ("_clock", "_count", "_histogram", "_key", "_latency", "_sent")

    def __init__(
        self, sent: FastCounter, latency: FastHistogram, clock: Callable[[], float]
    ) -> None:
        self._sent = sent
        self._histogram = latency
        self._clock = clock
        self._key: object = None
        self._count = 0
        self._latency = 0.0
        sent.before_collect = latency.before_collect = self.flush

    def add(self, message: object, received_at: float) -> None:
        """One write of ``message`` (compared by identity), received by the
        hub at ``received_at`` on the clock."""
        if message is self._key and self._count < SHARED_READING_MAX:
            self._count += 1
            return
        if self._count:
            self.flush()
        self._key = message
        self._count = 1
        self._latency = self._clock() - received_at

    def flush(self) -> None:
        """Add what is tallied to the metrics."""
        n = self._count
        if n:
            self._count = 0
            self._sent.value += n
            self._histogram.observe_many(self._latency, n)


class Metrics:
    """The metric objects. Names of the seed's four series are kept as the
    seed's runbook queries them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        # process_* series (CPU, resident memory, open files): the seed scales
        # on memory, and the open-file limit bounds the connection count.
        ProcessCollector(registry=r)
        self.active_connections = Gauge(
            "websocket_active_connections", "Open WebSocket connections.", registry=r
        )
        self.active_users = Gauge(
            "websocket_active_users", "Users with at least one open connection.", registry=r
        )
        self.connections_total = Counter(
            "websocket_connections",
            "WebSocket connections accepted (upgrade completed).",
            registry=r,
        )
        self.connections_rejected = Counter(
            "websocket_connections_rejected",
            "Connection attempts refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.connections_closed = Counter(
            "websocket_connections_closed",
            "WebSocket connections ended, by cause.",
            ["cause"],
            registry=r,
        )
        self.messages_sent = FastCounter(
            "websocket_messages_sent",
            "Messages written to a WebSocket (one per connection reached).",
        )
        r.register(self.messages_sent)
        self.messages_failed = Counter(
            "websocket_messages_failed",
            "Messages meant for a connection that could not be written "
            "(queue full, or the connection closed before they were sent).",
            registry=r,
        )
        self.broker_received = FastCounter(
            "websocket_broker_messages_received",
            "Messages received from the broker.",
        )
        r.register(self.broker_received)
        self.broker_invalid = Counter(
            "websocket_broker_messages_invalid",
            "Broker messages dropped as invalid, by reason.",
            ["reason"],
            registry=r,
        )
        self.broker_disconnects = Counter(
            "websocket_broker_disconnects",
            "Broker subscriptions lost after they were up, by cause.",
            ["cause"],
            registry=r,
        )
        self.broker_dropped = Counter(
            "websocket_broker_messages_dropped",
            "Valid broker messages dropped because the router's queue was full.",
            registry=r,
        )
        # Per message in pattern mode, where a hub of a fleet holds few of
        # the users it receives: a plain add, as broker_received.
        self.messages_unrouted = FastCounter(
            "websocket_messages_unrouted",
            "Valid messages for a user with no connection on this node.",
        )
        r.register(self.messages_unrouted)
        self.delivery_latency = FastHistogram(
            "websocket_delivery_latency_seconds",
            "Time from broker receipt to the socket write that carried the message.",
            LATENCY_BUCKETS,
        )
        r.register(self.delivery_latency)
        self.direct_writes = DirectWrites(
            self.messages_sent, self.delivery_latency, trio.current_time
        )
        self.slow_consumer_closes = Counter(
            "websocket_slow_consumer_closes",
            "Connections closed with 1013 because their send queue was full.",
            registry=r,
        )
        self.progress_conflated = Counter(
            "websocket_progress_conflated",
            "Queued progress messages replaced by newer progress or a completion "
            "of the same project (slow connections only).",
            registry=r,
        )
        self.queue_high_water = Counter(
            "websocket_queue_high_water",
            "Times a connection's send queue reached its high-water mark.",
            registry=r,
        )
        self.snapshot_sent = Counter(
            "websocket_snapshot_messages_sent",
            "Current-state messages queued for new connections.",
            registry=r,
        )
        self.snapshot_entries = Gauge(
            "websocket_snapshot_entries",
            "Projects held in the current-state cache for new tabs.",
            registry=r,
        )
        self.snapshot_bytes = Gauge(
            "websocket_snapshot_bytes",
            "Bytes the current-state cache accounts (frames and bookkeeping).",
            registry=r,
        )
        self.query_token_used = Counter(
            "websocket_deprecated_query_token",
            "Connections that authenticated with the deprecated ?token= parameter.",
            registry=r,
        )
        self.client_messages = Counter(
            "websocket_client_messages",
            "Frames received from clients (read and ignored).",
            registry=r,
        )
        self.subscriber_up = Gauge(
            "websocket_subscriber_up",
            "1 when the broker subscription is connected, else 0.",
            registry=r,
        )
        self.subscriber_reconnects = Counter(
            "websocket_subscriber_reconnects",
            "Broker subscription (re)connect attempts after the first.",
            registry=r,
        )
        self.subscribed_channels = Gauge(  # read from the broker at scrape time
            "websocket_subscribed_channels",
            "Channels this hub is subscribed to (SMAPWS_SUBSCRIBE_MODE=user: one per "
            "user served, or lingering after their last tab; 0 in pattern mode).",
            registry=r,
        )
        self.subscription_commands = Counter(
            "websocket_subscription_commands",
            "(S)SUBSCRIBE / (S)UNSUBSCRIBE commands sent in user mode, by command "
            "(each carries up to 512 channels).",
            ["command"],
            registry=r,
        )
        self.resync_messages = Counter(
            "websocket_resync_messages",
            "resync messages queued after a subscriber outage (one per open "
            "connection per outage): the clients were told to refetch state.",
            registry=r,
        )
        self.history_entries = Gauge(
            "websocket_history_entries",
            "Messages held in the replay window for ?since= recovery.",
            registry=r,
        )
        self.history_bytes = Gauge(
            "websocket_history_bytes",
            "Bytes accounted to the replay window (frames plus bookkeeping).",
            registry=r,
        )
        self.resumes = Counter(
            "websocket_resumes",
            "Connections that asked for ?since=: replayed (this hub's window had the id), "
            "fleet (the fleet's log in Redis had it) or gap (a resync with reason "
            "history_gap was sent instead).",
            ["result"],
            registry=r,
        )
        self.fleet_appends = Counter(
            "websocket_fleet_log_appends",
            "Messages this hub appended to the fleet's replay log in Redis, by result: "
            "written, duplicate (another hub had written it), off_chain (written after "
            "another entry than its predecessor), failed, dropped (append queue full).",
            ["result"],
            registry=r,
        )
        self.fleet_errors = Counter(
            "websocket_fleet_log_errors",
            "Failed operations on the fleet's replay log (append, consult, read).",
            ["op"],
            registry=r,
        )
        self.replayed_messages = Counter(
            "websocket_replayed_messages",
            "Messages queued from the replay window for resuming connections.",
            registry=r,
        )
        self.publish_requests = Counter(
            "websocket_publish_requests",
            "POST /api/publish requests, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.draining = Gauge(
            "websocket_draining", "1 while the hub drains for shutdown.", registry=r
        )
        self.internal_errors = Counter(
            "websocket_internal_errors",
            "Unexpected exceptions caught at a barrier, by where: route (one "
            "message dropped), connection (one connection closed), heartbeat, "
            "broker (the subscription restarted). Each is a bug to report.",
            ["where"],
            registry=r,
        )
        for where in ("route", "connection", "heartbeat", "offer", "drain", "broker"):
            self.internal_errors.labels(where)
        self.accept_errors = Counter(
            "websocket_accept_errors",
            "accept() failures for lack of resources (EMFILE, ENFILE, ENOMEM, "
            "ENOBUFS), by errno name; the listener pauses 100 ms after each.",
            ["errno"],
            registry=r,
        )
        self.pending_heads = Gauge(  # read from the front door at scrape time
            "websocket_pending_requests",
            "Accepted sockets still sending their request head.",
            registry=r,
        )
        self.send_queue_bytes = Gauge(  # read from the hub's budget at scrape time
            "websocket_send_queue_bytes",
            "Bytes queued for all connections together (frames shared by several "
            "connections counted once per connection), against "
            "SMAPWS_SEND_QUEUE_TOTAL_BYTES.",
            registry=r,
        )
        self.tasks = Gauge(  # counted at scrape time (smapws._io.tasktree)
            "websocket_tasks",
            "trio tasks in this hub process (a worker's own; the group's sum in a "
            "group): one per open connection and per request being served, plus a "
            "fixed few. Growth at a steady connection count is a leak.",
            registry=r,
        )
        self.lingering = Gauge(  # read from the front door at scrape time
            "websocket_lingering_sockets",
            "Answered sockets in their lingering close (counted against "
            "SMAPWS_MAX_PENDING_REQUESTS).",
            registry=r,
        )

    def bind_gauges(self, connections: Callable[[], float], users: Callable[[], float]) -> None:
        """Read the connection gauges from the hub at scrape time, so they can
        never drift from the registry's truth."""
        self.active_connections.set_function(connections)
        self.active_users.set_function(users)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


# -- a group of processes ------------------------------------------------------------------

#: One sample: (name, labels as sorted pairs, value).
Sample = tuple[str, tuple[tuple[str, str], ...], float]
#: One metric family: (name, type, help, samples). Plain tuples, because
#: snapshots cross a process boundary.
Family = tuple[str, str, str, tuple[Sample, ...]]

#: Families whose group value is the smallest of the processes' values:
#: the group's start, the per-process descriptor limit, and "subscribed"
#: (1 only when every worker is).
MERGE_MIN: Final = frozenset(
    {"process_start_time_seconds", "process_max_fds", "websocket_subscriber_up"}
)
#: Families whose group value is the largest: draining if any worker drains.
MERGE_MAX: Final = frozenset({"websocket_draining"})
#: Family types whose values only grow: what a dead worker leaves behind.
CUMULATIVE_TYPES: Final = frozenset({"counter", "histogram"})


def snapshot(registry: Collector) -> list[Family]:
    """Every sample of ``registry``, as plain tuples."""
    return [
        (
            m.name,
            m.type,
            m.documentation,
            tuple((s.name, tuple(sorted(s.labels.items())), float(s.value)) for s in m.samples),
        )
        for m in registry.collect()
    ]


def cumulative(families: Iterable[Family]) -> list[Family]:
    """The counters and histograms of a snapshot (gauges die with their
    process; counts must not, or the group's counters would go down)."""
    return [f for f in families if f[1] in CUMULATIVE_TYPES]


def merge(snapshots: Iterable[Iterable[Family]]) -> list[Family]:
    """One snapshot for a group: each sample (name and labels) summed over
    the snapshots, but for :data:`MERGE_MIN` and :data:`MERGE_MAX`. Families
    and samples keep the order in which they first appear."""
    meta: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in snapshots:
        for name, kind, doc, samples in families:
            meta.setdefault(name, (kind, doc))
            into = values.setdefault(name, {})
            for sample_name, labels, value in samples:
                key = (sample_name, labels)
                old = into.get(key)
                if old is None:
                    into[key] = value
                elif name in MERGE_MIN:
                    into[key] = min(old, value)
                elif name in MERGE_MAX:
                    into[key] = max(old, value)
                else:
                    into[key] = old + value
    return [
        (name, kind, doc, tuple((n, labels, v) for (n, labels), v in values[name].items()))
        for name, (kind, doc) in meta.items()
    ]


class _Families:
    """A collector that yields a snapshot back as metric families."""

    def __init__(self, families: Iterable[Family]) -> None:
        self._families = list(families)

    def collect(self) -> list[Metric]:
        out = []
        for name, kind, doc, samples in self._families:
            metric = Metric(name, doc, kind)
            for sample_name, labels, value in samples:
                metric.add_sample(sample_name, dict(labels), value)
            out.append(metric)
        return out


def render(families: Iterable[Family]) -> bytes:
    """The Prometheus text exposition of a snapshot."""
    return generate_latest(_Families(families))
