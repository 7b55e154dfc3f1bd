"""Workers: one port, N hub processes (``SMAPWS_WORKERS`` > 1).

::

    supervisor (smapws serve: the main process, systemd's MainPID)
    ├── signal watcher    SIGTERM/SIGINT -> every worker drains; again -> they stop now
    ├── systemd notify    READY=1 when every worker is ready; WATCHDOG=1 while all live
    ├── view pusher       the group's state -> every worker (at once on a readiness
    │                     change, counts at most every heartbeat)
    ├── stop deadline     once draining: SIGKILL whatever is left after the stop budget
    ├── metrics answers   one task per /metrics request a worker passes on
    └── slot 0 .. N-1     spawn a worker, read its messages, wait for its exit,
        │                 replace it after a backoff (never while draining)
        └── worker        python -c ...: serve() on the inherited listening sockets,
                          plus a reporter (its state at once when it changes, counts
                          every heartbeat) and a control task (view, drain, stop,
                          metrics) on its socket to the supervisor

**The port.** The supervisor binds every listening socket once (as a lone hub
would: a port in use is one line and exit 1) and each worker inherits the same
sockets: one accept queue that every worker takes from. Connections waiting
there are served by whichever worker accepts first, so none are stranded
with a worker that died, and a second ``smapws serve`` on the same port still
fails with "Address already in use" (``SO_REUSEPORT`` would let it join the
group silently, and would leave a dead worker's queued connections to be
reset).

**The control channel.** One ``AF_UNIX`` stream socket pair per worker,
carrying length-prefixed pickles (:class:`Channel`): both ends are this
package, in processes the supervisor started. The supervisor never accepts
or reads a client connection; a worker never talks to systemd.

**What any worker answers for the group.** ``/ready`` and ``/health`` from
the :class:`~smapws._core.group.GroupView` the supervisor last pushed (plus
its own live state); ``/metrics`` by asking the supervisor, which collects
every worker's registry at that moment and sums them
(:mod:`smapws.metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import pickle
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Final

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from trio_util import AsyncBool, AsyncValue

from smapws import _log
from smapws._config import Config
from smapws._core.group import GroupView, RestartBackoff, WorkerReport, share
from smapws._errors import SmapwsError
from smapws._io import sdnotify, signals
from smapws._io.app import App, Membership
from smapws._io.server import (
    STOP_MARGIN_S,
    Server,
    bound_port,
    close_listeners,
    log_listening,
    open_all_listeners,
    serve,
    stop_budget,
)
from smapws._log import fields, logger
from smapws._runtime import tune_gc
from smapws.metrics import Family, cumulative, merge, render, snapshot

#: How often a worker reports its counts when nothing else changed, and the
#: most often the supervisor pushes count-only changes of the group back
#: (a readiness change goes at once). Shorter under a short systemd
#: watchdog (see :func:`heartbeat_period`).
HEARTBEAT_S: Final = 1.0
#: A worker that has sent nothing for this many heartbeats counts as not
#: alive (its loop is stuck): the supervisor skips WATCHDOG=1.
STALE_HEARTBEATS: Final = 4
#: How long a worker that stopped reporting (past :data:`STALE_HEARTBEATS`
#: heartbeats, when it is marked ``unresponsive``: the group is not ready)
#: may stay so before it is killed and replaced: long enough for a pause of
#: the whole machine (a VM migrated, a debugger's breakpoint) to pass.
UNRESPONSIVE_KILL_S: Final = 10.0
#: How long a /metrics request waits for the workers' samples; a worker that
#: has not answered by then is counted with the samples of its last answer.
COLLECT_TIMEOUT: Final = 1.0
#: How long a worker waits for the supervisor's answer to /metrics (503
#: then): the collection, plus the round trip.
METRICS_TIMEOUT: Final = COLLECT_TIMEOUT + 2.0
#: How often a worker sends its registry's samples unasked: what the
#: supervisor keeps of a worker that dies (counts since are lost).
SAMPLES_EVERY_S: Final = 5.0
#: Bound of one control message (a metrics snapshot is ~10 KiB).
MAX_FRAME: Final = 16 * 1024 * 1024
#: Messages queued for one worker; only a worker whose loop is stuck fills it
#: (what does not fit is dropped: the stop deadline deals with that worker).
OUTBOX: Final = 256
#: Environment variables meant for the supervisor alone: systemd's notify
#: socket and watchdog (a worker must never speak for the unit).
SUPERVISOR_ONLY_ENV: Final = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)
#: The worker's program: the function below, in a fresh interpreter.
WORKER_CODE: Final = (
    "import sys; from smapws._io.supervisor import worker_main; "
    "sys.exit(worker_main(int(sys.argv[1])))"
)


def ping_period(watchdog_s: float | None) -> float | None:
    """Seconds between two WATCHDOG=1 of the supervisor: half of what a lone
    hub uses (``$WATCHDOG_USEC / 4``), so that a ping skipped because a
    worker died leaves systemd's deadline still a quarter of
    ``WatchdogSec=`` away; only a worker dead or stuck across three pings
    in a row gets the unit killed."""
    return None if watchdog_s is None else watchdog_s / 2


def heartbeat_period(ping_s: float | None) -> float:
    """Seconds between a worker's reports: :data:`HEARTBEAT_S`, or half the
    supervisor's ping period if that is shorter, so that a worker is known
    alive (or stuck: :data:`STALE_HEARTBEATS` missed) at every ping."""
    return HEARTBEAT_S if ping_s is None else min(HEARTBEAT_S, ping_s / 2)


# -- the control channel ---------------------------------------------------------------------


class ChannelError(SmapwsError):
    """A control message that is not one (too large, or not unpicklable)."""


class Channel:
    """Length-prefixed pickled messages over a stream socket, between the
    supervisor and one of its workers. ``send`` may be called from several
    tasks; ``receive`` from one."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: object) -> None:
        """Raises ``trio.BrokenResourceError`` when the other end is gone."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        async with self._send_lock:
            await self._stream.send_all(len(data).to_bytes(4, "big") + data)

    async def receive(self) -> object | None:
        """The next message, or ``None`` once the other end has closed (or
        the link broke). Raises :class:`ChannelError` for a bad frame."""
        try:
            while len(self._buf) < 4:
                if not await self._fill():
                    return None
            size = int.from_bytes(self._buf[:4], "big")
            if size > MAX_FRAME:
                raise ChannelError(f"control message of {size} bytes")
            while len(self._buf) < 4 + size:
                if not await self._fill():
                    return None
        except trio.BrokenResourceError:
            return None
        data = bytes(self._buf[4 : 4 + size])
        del self._buf[: 4 + size]
        try:
            message: object = pickle.loads(data)
        except Exception as exc:
            # Not chained: the first message carries the Config (JWT_SECRET, the
            # API key) and an unpickling error may quote the payload's bytes.
            raise ChannelError(f"unreadable control message: {type(exc).__name__}") from None
        return message

    async def _fill(self) -> bool:
        chunk = await self._stream.receive_some(65536)
        self._buf += chunk
        return bool(chunk)

    async def aclose(self) -> None:
        await self._stream.aclose()


# Messages. Supervisor -> worker:


@dataclass(frozen=True)
class Hello:
    """The first message: everything a worker needs to start."""

    index: int
    config: Config
    public_fds: tuple[int, ...]
    internal_fds: tuple[int, ...]
    heartbeat_s: float
    view: GroupView


@dataclass(frozen=True)
class View:
    view: GroupView


@dataclass(frozen=True)
class Drain:
    """Start draining (the group is shutting down)."""


@dataclass(frozen=True)
class Stop:
    """Stop now (a second signal during the drain)."""


@dataclass(frozen=True)
class Collect:
    """Send a :class:`Samples` of your registry."""

    ref: int


@dataclass(frozen=True)
class MetricsText:
    """The group's ``/metrics`` text a worker asked for."""

    ref: int
    text: bytes


# Worker -> supervisor:


@dataclass(frozen=True)
class Report:
    report: WorkerReport


@dataclass(frozen=True)
class Samples:
    ref: int
    families: list[Family]


@dataclass(frozen=True)
class MetricsRequest:
    """A client asked this worker for ``/metrics``."""

    ref: int


# -- the supervisor --------------------------------------------------------------------------


class _Slot:
    """One of the N places a worker runs in, and what is known of its
    current worker."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: trio.Process | None = None
        self.report: WorkerReport | None = None
        self.last_seen = -float("inf")
        self.outbox: trio.MemorySendChannel[object] | None = None
        #: The registry samples of the current worker's last answer.
        self.samples: list[Family] = []
        self.backoff = RestartBackoff()
        #: A worker of this slot exited since the last watchdog tick.
        self.died_since_tick = False

    def post(self, message: object) -> None:
        """Queue ``message`` for the current worker (dropped if there is none
        or its queue is full: a worker that does not read is stuck)."""
        if self.outbox is not None:
            with contextlib.suppress(
                trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                self.outbox.send_nowait(message)


#: How one worker process is run, start to exit; returns its exit status.
#: (The tests replace it to drive the restart policy on a MockClock.)
RunWorker = Callable[["Supervisor", _Slot], Awaitable[int]]


class Supervisor:
    """N workers on listening sockets this process bound; see the module
    docstring. Start it with ``nursery.start(supervisor.run)``; ``run``
    returns once every worker has exited after a drain."""

    def __init__(
        self,
        config: Config,
        public: list[trio.SocketListener],
        internal: list[trio.SocketListener],
        *,
        notifier: sdnotify.Notifier | None = None,
        watchdog_s: float | None = None,
        run_worker: RunWorker | None = None,
    ) -> None:
        self.config = config
        self.public = public
        self.internal = internal
        self.port = bound_port(public) if public else 0
        self.internal_port = bound_port(internal) if internal else None
        self.notifier = notifier or sdnotify.Notifier(None)
        #: ``watchdog_s`` is a lone hub's ping period (half of WatchdogSec=).
        self.ping_s = ping_period(watchdog_s)
        self.heartbeat_s = heartbeat_period(self.ping_s)
        self._run_worker = run_worker or Supervisor._spawn
        self.slots = [_Slot(i) for i in range(config.workers)]
        self.restarts = 0
        #: Set by the signal watcher (or :meth:`drain`), and never unset.
        self.draining = AsyncBool(False)
        self.stopping = AsyncBool(False)
        #: The group as it stands; the notifier and the pusher wait on it.
        self.view: AsyncValue[GroupView] = AsyncValue(self._make_view())
        #: Whether workers had to be killed at the stop deadline.
        self.killed = False
        #: What workers that died had counted (counters and histograms).
        self.retired: list[Family] = []
        self._collects: dict[int, tuple[set[int], trio.Event]] = {}
        self._refs = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        Gauge(
            "websocket_workers",
            "Worker processes running (SMAPWS_WORKERS > 1).",
            registry=self.registry,
        ).set_function(lambda: sum(s.proc is not None for s in self.slots))
        self.restart_counter = Counter(
            "websocket_worker_restarts",
            "Workers that exited outside a drain and were replaced.",
            registry=self.registry,
        )

    # -- state ---------------------------------------------------------------

    def _make_view(self) -> GroupView:
        return GroupView(
            tuple(s.report for s in self.slots),
            self.restarts,
            bool(self.draining.value),
            self.config.max_connections,
        )

    def _changed(self) -> None:
        self.view.value = self._make_view()

    def alive(self, now: float) -> bool:
        """Every worker that should run does, and has reported within
        :data:`STALE_HEARTBEATS` heartbeats (while draining, only those
        still running count)."""
        limit = STALE_HEARTBEATS * self.heartbeat_s
        draining = self.draining.value
        return all(
            s.proc is not None and now - s.last_seen <= limit
            for s in self.slots
            if not (draining and s.proc is None)
        )

    def _watchdog_ok(self) -> bool:
        """Called once per WATCHDOG tick: every worker alive now, and none
        died since the last tick (a worker that keeps dying at start-up must
        not look alive by being caught between two deaths)."""
        died = any(s.died_since_tick for s in self.slots) and not self.draining.value
        for s in self.slots:
            s.died_since_tick = False
        return self.alive(trio.current_time()) and not died

    # -- running ------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as root:
            self._nursery = root
            root.start_soon(self._push_views)
            root.start_soon(self._stop_deadline)
            root.start_soon(self._watch_workers)
            if self.notifier.enabled:
                root.start_soon(
                    partial(
                        sdnotify.supervise,
                        self.notifier,
                        changes=self.view,
                        is_ready=lambda: self.view.value.ready,
                        describe=lambda: sdnotify.group_status(self.view.value, self.port),
                        watchdog_s=self.ping_s,
                        watchdog_ok=self._watchdog_ok,
                    )
                )
            task_status.started(self)
            async with trio.open_nursery() as slots:
                for slot in self.slots:
                    slots.start_soon(self._keep, slot)
            root.cancel_scope.cancel()

    def on_stop_signal(self, name: str, received: int) -> None:
        """SIGTERM/SIGINT (:func:`smapws._io.signals.watch`): drain; a
        second one: stop now."""
        if received > 1:
            logger.warning(
                "signal received again, stopping the workers now", extra=fields(signal=name)
            )
            self.stop()
        else:
            logger.info("signal received", extra=fields(signal=name))
            self.drain()

    def drain(self) -> None:
        """Every worker drains (as a lone hub on SIGTERM); ``run`` returns
        when all have exited. No worker is replaced from now on. Idempotent."""
        if self.draining.value:
            return
        self.draining.value = True
        connections, _, _ = self.view.value.totals()
        running = sum(s.proc is not None for s in self.slots)
        logger.info(
            "draining",
            extra=fields(
                workers=running, connections=connections, timeout_s=self.config.drain_timeout
            ),
        )
        self.notifier.stopping(
            f"draining {connections} connections in {running} workers",
            extend_timeout_s=stop_budget(self.config),
        )
        for slot in self.slots:
            slot.post(Drain())
        self._changed()

    def stop(self) -> None:
        """Every worker stops at once (open connections are dropped)."""
        self.drain()
        self.stopping.value = True
        for slot in self.slots:
            slot.post(Stop())

    async def _stop_deadline(self) -> None:
        """Once draining: whatever still runs after the stop budget (a lone
        hub's: the workers drain side by side), or :data:`STOP_MARGIN_S`
        after :meth:`stop`, is killed."""
        await self.draining.wait_value(True)
        with trio.move_on_after(stop_budget(self.config)):
            await self.stopping.wait_value(True)
            await trio.sleep(STOP_MARGIN_S)
        left = [s for s in self.slots if s.proc is not None and s.proc.returncode is None]
        if left:
            self.killed = True
            logger.error(
                "workers did not stop in time, killing them",
                extra=fields(workers=",".join(str(s.index) for s in left)),
            )
            for s in left:
                assert s.proc is not None
                s.proc.kill()

    async def _watch_workers(self) -> None:
        """Every heartbeat: a worker that has sent nothing for
        :data:`STALE_HEARTBEATS` heartbeats is marked ``unresponsive`` (the
        group's ``/ready`` is 503 and ``/health`` names it); one still silent
        :data:`UNRESPONSIVE_KILL_S` later is killed (``_keep`` replaces it).
        While draining, the stop deadline deals with such workers."""
        while True:
            await trio.sleep(self.heartbeat_s)
            if self.draining.value:
                continue
            now = trio.current_time()
            limit = STALE_HEARTBEATS * self.heartbeat_s
            for slot in self.slots:
                silent = now - slot.last_seen
                if slot.proc is None or silent <= limit:
                    continue
                report = slot.report
                if report is not None and not report.unresponsive:
                    slot.report = dataclasses.replace(report, unresponsive=True)
                    self._changed()
                    logger.error(
                        "worker not answering, not ready",
                        extra=fields(
                            worker=slot.index,
                            pid=report.pid,
                            silent_s=round(silent, 1),
                            kill_in_s=UNRESPONSIVE_KILL_S,
                        ),
                    )
                if silent > limit + UNRESPONSIVE_KILL_S and slot.proc.returncode is None:
                    logger.error(
                        "worker not answering, killing it",
                        extra=fields(worker=slot.index, silent_s=round(silent, 1)),
                    )
                    slot.proc.kill()

    async def _keep(self, slot: _Slot) -> None:
        """Keep a worker running in ``slot`` until the group drains."""
        while not self.draining.value:
            started = trio.current_time()
            status = await self._run_worker(self, slot)
            lived = trio.current_time() - started
            if self.draining.value:
                logger.info(
                    "worker exited",
                    extra=fields(worker=slot.index, exit=describe_exit(status)),
                )
                return
            delay = slot.backoff.delay(lived)
            self.restarts += 1
            self.restart_counter.inc()
            self._changed()
            logger.error(
                "worker exited, replacing it",
                extra=fields(
                    worker=slot.index,
                    exit=describe_exit(status),
                    lived_s=round(lived, 3),
                    restart_in_s=delay,
                ),
            )
            with trio.move_on_after(delay):
                await self.draining.wait_value(True)

    async def _spawn(self, slot: _Slot) -> int:
        """Run one worker process in ``slot`` until it exits."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        public = tuple(listener.socket.fileno() for listener in self.public)
        internal = tuple(listener.socket.fileno() for listener in self.internal)
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", WORKER_CODE, str(theirs.fileno())],
                pass_fds=(theirs.fileno(), *public, *internal),
                env=worker_environment(os.environ),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        send, receive = trio.open_memory_channel[object](OUTBOX)
        slot.proc, slot.outbox = proc, send
        slot.last_seen = trio.current_time()
        logger.info("worker started", extra=fields(worker=slot.index, pid=proc.pid))
        config = dataclasses.replace(
            self.config, max_connections=share(self.config.max_connections, len(self.slots))
        )
        slot.post(Hello(slot.index, config, public, internal, self.heartbeat_s, self.view.value))
        if self.draining.value:
            slot.post(Drain())
        if self.stopping.value:
            slot.post(Stop())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write, channel, receive)
                nursery.start_soon(self._read, slot, channel)
                await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            slot.proc = slot.outbox = slot.report = None
            slot.died_since_tick = True
            if slot.samples:
                self.retired = merge([self.retired, cumulative(slot.samples)])
                slot.samples = []
            self._changed()
            with trio.CancelScope(shield=True):
                await channel.aclose()
                if proc.returncode is None:  # cancelled: never leave a worker behind
                    proc.kill()
                    await proc.wait()
        assert proc.returncode is not None
        return proc.returncode

    async def _read(self, slot: _Slot, channel: Channel) -> None:
        while True:
            try:
                message = await channel.receive()
            except ChannelError as exc:
                logger.error("bad control message", extra=fields(worker=slot.index, error=str(exc)))
                if slot.proc is not None:
                    slot.proc.kill()
                return
            if message is None:
                return
            slot.last_seen = trio.current_time()
            if isinstance(message, Report):
                slot.report = message.report
                self._changed()
            elif isinstance(message, Samples):
                slot.samples = message.families
                pending = self._collects.get(message.ref)
                if pending is not None:
                    waiting, done = pending
                    waiting.discard(slot.index)
                    if not waiting:
                        done.set()
            elif isinstance(message, MetricsRequest):
                assert self._nursery is not None
                self._nursery.start_soon(self._answer_metrics, slot, message.ref)

    async def _answer_metrics(self, slot: _Slot, ref: int) -> None:
        text = await self.metrics()
        slot.post(MetricsText(ref, text))

    async def metrics(self) -> bytes:
        """The group's Prometheus text: every running worker's registry as
        of now (or of its last answer, if it does not answer within
        :data:`COLLECT_TIMEOUT`), what dead workers had counted, and the
        supervisor's own series, summed (:func:`smapws.metrics.merge`)."""
        ref = next(self._refs)
        live = [s for s in self.slots if s.outbox is not None]
        waiting, done = {s.index for s in live}, trio.Event()
        self._collects[ref] = (waiting, done)
        try:
            for s in live:
                s.post(Collect(ref))
            if waiting:
                with trio.move_on_after(COLLECT_TIMEOUT):
                    await done.wait()
        finally:
            del self._collects[ref]
        parts = [snapshot(self.registry), self.retired, *(s.samples for s in self.slots)]
        return render(merge(parts))

    async def _push_views(self) -> None:
        """Send the group's view to every worker: at once when readiness or
        draining changed anywhere, count-only changes at most every
        heartbeat."""
        pushed: GroupView | None = None
        while True:
            view = self.view.value
            if view != pushed:
                for slot in self.slots:
                    slot.post(View(view))
                pushed = view
            with trio.move_on_after(self.heartbeat_s):
                await self.view.wait_value(lambda v, p=pushed: _readiness(v) != _readiness(p))
            if self.view.value == pushed:
                await self.view.wait_value(lambda v, p=pushed: v != p)


def _readiness(view: GroupView | None) -> object:
    """The part of a view that must reach the workers at once."""
    if view is None:
        return None
    return (view.ready, view.draining, tuple(w and (w.status, w.pid) for w in view.workers))


async def _write(channel: Channel, outbox: trio.MemoryReceiveChannel[object]) -> None:
    async for message in outbox:
        try:
            await channel.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def describe_exit(status: int) -> str:
    """``0``, ``1``, or ``SIGKILL`` for a worker killed by a signal."""
    if status < 0:
        try:
            return signal.Signals(-status).name
        except ValueError:
            return f"signal {-status}"
    return str(status)


def worker_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The supervisor's environment minus what is meant for it alone."""
    return {k: v for k, v in env.items() if k not in SUPERVISOR_ONLY_ENV}


async def run_group(config: Config) -> int:
    """``smapws serve`` with ``SMAPWS_WORKERS`` > 1, in the main process:
    bind, supervise the workers until they have drained; the exit status
    (0 drained, 1 if workers had to be killed at the stop deadline). Raises
    :class:`~smapws._io.server.ListenError` if it cannot listen."""
    public, internal = await open_all_listeners(config)
    try:
        notifier = sdnotify.Notifier.from_environ(os.environ)
        watchdog_s = sdnotify.watchdog_period(os.environ, os.getpid())
        supervisor = Supervisor(
            config,
            public,
            internal,
            notifier=notifier,
            watchdog_s=watchdog_s if notifier.enabled else None,
        )
        log_listening(
            config,
            supervisor.port,
            supervisor.internal_port,
            workers=config.workers,
            broker=config.broker,
        )
        async with trio.open_nursery() as nursery:
            # Signals are caught before the first worker starts.
            await nursery.start(signals.watch, supervisor.on_stop_signal)
            await supervisor.run()
            # run() returned: every worker has exited after the drain.
            nursery.cancel_scope.cancel()
    finally:
        close_listeners(public + internal)
    return 1 if supervisor.killed else 0


# -- the worker -------------------------------------------------------------------------------


def worker_main(fd: int) -> int:
    """A worker process: serve on the sockets the supervisor passed, talk
    to it on the socket ``fd``. Exit status 0 after a drain."""
    sock = socket.socket(fileno=fd)
    trio.run(_worker, sock)
    # A signal sent to the whole process group (Ctrl-C, KillMode=control-group)
    # may arrive after the drain: it must not turn exit 0 into "killed".
    for late in signals.LATE_SIGNALS:
        signal.signal(late, signal.SIG_IGN)
    return 0


async def _worker(sock: socket.socket) -> None:
    channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    hello = await channel.receive()
    if not isinstance(hello, Hello):
        raise ChannelError(f"expected Hello first, got {type(hello).__name__}")
    config = hello.config
    _log.configure(config.log_level, config.log_format, context={"worker": hello.index})
    tune_gc()
    listeners = (_listeners(hello.public_fds), _listeners(hello.internal_fds))
    asked: dict[int, tuple[trio.Event, list[bytes]]] = {}

    # Everything this worker sends goes through one bounded queue and one
    # writer: a supervisor that stops reading (frozen) fills the socket, and
    # then the queue, and what does not fit is dropped at once, so no task of
    # the worker (a /metrics request, the reporter) waits on it without end.
    outbox, unsent = trio.open_memory_channel[object](OUTBOX)

    member = Membership(hello.index, hello.view, partial(_ask_metrics, outbox, asked))

    async with trio.open_nursery() as nursery:

        async def hub(task_status: trio.TaskStatus[Server]) -> None:
            await serve(
                config,
                handle_signals=True,
                notify_systemd=False,
                listeners=listeners,
                member=member,
                task_status=task_status,
            )
            nursery.cancel_scope.cancel()  # drained: the control tasks end too

        nursery.start_soon(_write, channel, unsent)
        server: Server = await nursery.start(hub)
        nursery.start_soon(_report, outbox, server.app, hello.heartbeat_s)
        nursery.start_soon(_obey, channel, outbox, server, asked)


def _listeners(fds: tuple[int, ...]) -> list[trio.SocketListener]:
    return [
        trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd))) for fd in fds
    ]


def _post(outbox: trio.MemorySendChannel[object], message: object) -> bool:
    """Queue ``message`` for the supervisor; False (dropped) when the queue
    is full (the supervisor does not read) or closed."""
    try:
        outbox.send_nowait(message)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def _report(outbox: trio.MemorySendChannel[object], app: App, heartbeat_s: float) -> None:
    """Report this worker's state at once when it changes, and every
    heartbeat anyway (its counts, and the proof that its loop runs); its
    registry's samples every :data:`SAMPLES_EVERY_S`, so that a worker
    killed between two scrapes loses at most that much of its counts. A
    report that does not fit the queue is dropped (the next one says it)."""
    next_samples = trio.current_time() + SAMPLES_EVERY_S
    while True:
        _post(outbox, Report(app.report()))
        if trio.current_time() >= next_samples:
            next_samples = trio.current_time() + SAMPLES_EVERY_S
            _post(outbox, Samples(0, snapshot(app.metrics.registry)))
        seen = app.state.value
        with trio.move_on_after(heartbeat_s):
            await app.state.wait_value(lambda v, seen=seen: v != seen)


async def _obey(
    channel: Channel,
    outbox: trio.MemorySendChannel[object],
    server: Server,
    asked: dict[int, tuple[trio.Event, list[bytes]]],
) -> None:
    app = server.app
    while (message := await channel.receive()) is not None:
        if isinstance(message, View):
            app.update_group(message.view)
        elif isinstance(message, Drain):
            server.drain()
        elif isinstance(message, Stop):
            server.stop()
        elif isinstance(message, Collect):
            _post(outbox, Samples(message.ref, snapshot(app.metrics.registry)))
        elif isinstance(message, MetricsText):
            waiter = asked.get(message.ref)
            if waiter is not None:
                waiter[1].append(message.text)
                waiter[0].set()
    logger.warning("supervisor gone, draining")
    server.drain()


async def _ask_metrics(
    outbox: trio.MemorySendChannel[object], asked: dict[int, tuple[trio.Event, list[bytes]]]
) -> bytes | None:
    """The group's /metrics, from the supervisor; ``None`` when it does not
    answer within :data:`METRICS_TIMEOUT`, or at once when the request
    cannot even be queued (the supervisor has stopped reading)."""
    ref = next(_metric_refs)
    done, box = trio.Event(), list[bytes]()
    asked[ref] = (done, box)
    try:
        if _post(outbox, MetricsRequest(ref)):
            with trio.move_on_after(METRICS_TIMEOUT):
                await done.wait()
    finally:
        del asked[ref]
    return box[0] if box else None


_metric_refs = itertools.count(1)
