"""Load generator: many cheap WebSocket clients spread over worker processes.

Each worker is a single-threaded ``epoll`` loop over raw non-blocking sockets, with the
hand-written client of :mod:`bench.wsclient` (no WebSocket library: one ``recvmsg``
per readable socket, every complete frame in it parsed at once, and a 1 ms pause
after each busy wake-up so that one wake-up serves many sockets). A worker records,
per benchmark step, the publish stamp and publish-to-receive latency of every marked
message it gets. The receive time is the kernel's receive timestamp of the segment,
moved onto ``time.monotonic_ns()`` (one system-wide clock on Linux, the publisher's),
so the worker's own scheduling never inflates a latency. Workers answer pings, so
hubs with a heartbeat keep the connections open.

Two client protocols (``protocol=`` of :meth:`LoadGen.connect`): ``plain``, where a
connection is open at the ``101`` and every text frame is one message, and
``centrifuge``, where the client then sends Centrifuge's connect command (JSON
protocol), the connection counts as open when the connect reply arrives, and a text
frame may carry several messages, newline-delimited (Centrifuge batches the pushes
queued for one connection): deliveries are always counted by message.

The coordinator side is :class:`LoadGen`; every request to a worker has a deadline and
raises :class:`LoadGenError` when a worker fails to answer in time or dies.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import socket
import struct
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt

from bench.wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ProtocolError,
    bench_mark,
    centrifuge_connect_reply,
    client_frame,
    handshake_request,
    parse_frames,
    parse_handshake_response,
)

# Keep each worker well under the 20,000 fd limit (and the 9,000 asked for).
MAX_CONNECTIONS_PER_WORKER = 8000
# A read this large drains a socket's whole receive queue in one call (batched reads).
RECV_SIZE = 262144
# How often connection deadlines are checked while connecting.
_TICK_S = 0.05
# After a wake-up that found messages, let more arrive for this long before polling
# again: one wake-up then serves many sockets, which cuts the client's CPU per message
# several times at high rates. It does not bias latencies, which are taken from the
# kernel's receive timestamps, not from when the worker got round to reading.
_BATCH_S = 0.001
# Linux SO_TIMESTAMPNS (asm-generic value; Python does not export it): the kernel
# stamps each received segment (CLOCK_REALTIME, struct timespec) and recvmsg hands
# the stamp over as ancillary data.
_SO_TIMESTAMPNS = 35
_ANC_SIZE = socket.CMSG_SPACE(16)
# Attempts per connection before counting it failed; 4xx answers are never retried.
_MAX_ATTEMPTS = 3

_TIMESPEC = struct.Struct("@qq")
_CONNECTING, _HANDSHAKE, _OPEN, _GREETING = 0, 1, 2, 3
#: The client protocols :meth:`LoadGen.connect` speaks.
PROTOCOLS = ("plain", "centrifuge")
# Centrifuge's connect command, JSON protocol (method 0, connect, is the default):
# the credentials came with the upgrade (the cookie), so it carries no token.
_CENTRIFUGE_CONNECT = b'{"id":1}'


def user_id(index: int) -> str:
    """The user id of benchmark user ``index`` (shared by the load generator and publisher)."""
    return f"bench{index}"


def mint_token(secret: str, user: str, ttl_s: int = 3600) -> str:
    """An HS256 JWT with ``sub=user`` and ``exp`` ``ttl_s`` seconds from now."""
    return jwt.encode({"sub": user, "exp": int(time.time()) + ttl_s}, secret, algorithm="HS256")


class LoadGenError(Exception):
    """A worker failed, died, or did not answer within its deadline."""


class _Client:
    """One client connection's state in a worker."""

    __slots__ = ("accept", "attempts", "buf", "deadline", "frag", "index", "sock", "state")

    def __init__(self, index: int) -> None:
        self.index = index
        self.sock: socket.socket | None = None
        self.state = _CONNECTING
        self.buf = b""
        self.frag = b""
        self.accept = b""
        self.attempts = 0
        self.deadline = 0.0


@dataclass
class _ConnectJob:
    host: str
    port: int
    path: str
    tokens: list[str]
    max_inflight: int
    timeout_s: float
    protocol: str = "plain"
    pending: collections.deque[int] = field(default_factory=collections.deque)
    inflight: int = 0
    ok: int = 0
    failed: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    t_start: int = 0
    t_end: int = 0


class _Worker:
    """The event loop of one worker process (runs until told to quit or its pipe closes)."""

    def __init__(self, ctl: multiprocessing.connection.Connection) -> None:
        self.ctl = ctl
        self.ep = select.epoll()
        self.clients: dict[int, _Client] = {}
        self.connecting: set[_Client] = set()
        self.job: _ConnectJob | None = None
        self.samples: dict[int, array[int]] = {}  # step -> flat (publish, latency) ns
        self.stats: collections.Counter[str] = collections.Counter()
        self.offset = 0
        self.quit = False
        # One message per text frame, or several (newline-delimited) with Centrifuge.
        self._record: Callable[[bytes, int], None] = self._record_one

    # -- the loop -----------------------------------------------------------------
    def run(self) -> None:
        ctl_fd = self.ctl.fileno()
        self.ep.register(ctl_fd, select.EPOLLIN)
        clients = self.clients
        on_readable = self._on_readable
        while not self.quit:
            timeout = _TICK_S if self.job is not None else 1.0
            events = self.ep.poll(timeout)
            # realtime - monotonic, to turn kernel receive stamps into monotonic time.
            self.offset = time.time_ns() - time.monotonic_ns()
            for fd, ev in events:
                if fd == ctl_fd:
                    self._on_command()
                    continue
                client = clients.get(fd)
                if client is None:
                    continue
                if client.state == _OPEN:
                    on_readable(client)
                elif client.state == _HANDSHAKE:
                    self._on_handshake(client)
                elif client.state == _GREETING:
                    self._on_greeting(client)
                else:
                    self._on_connected(client, ev)
            if self.job is not None:
                self._expire_and_refill()
            elif events:
                time.sleep(_BATCH_S)

    def _on_command(self) -> None:
        try:
            cmd = self.ctl.recv()
        except (EOFError, OSError):
            self.quit = True  # the coordinator is gone: leave
            return
        name = cmd[0]
        if name == "connect":
            _, host, port, path, tokens, max_inflight, timeout_s, protocol = cmd
            self.job = _ConnectJob(host, port, path, tokens, max_inflight, timeout_s, protocol)
            self._record = self._record_one
            if protocol == "centrifuge":
                self._record = self._record_batched
            self.job.pending.extend(range(len(tokens)))
            self.job.t_start = time.monotonic_ns()
            self._expire_and_refill()
        elif name == "counts":
            counts = {step: len(lat) // 2 for step, lat in self.samples.items()}
            self.ctl.send(("counts", counts, self._open_count()))
        elif name == "collect":
            out = {}
            for step in cmd[1]:
                lat = self.samples.pop(step, None)
                out[step] = lat.tobytes() if lat is not None else b""
            self.ctl.send(("collect", out, time.process_time(), dict(self.stats)))
        elif name == "cpu":
            self.ctl.send(("cpu", time.process_time()))
        elif name == "close":
            # Like a closing browser tab: a close frame (1001 going away), then the
            # socket; the server's answer is not awaited.
            going_away = client_frame(OP_CLOSE, (1001).to_bytes(2, "big"))
            for client in list(self.clients.values()):
                if client.state == _OPEN:
                    self._send(client, going_away)
                self._drop(client, None)
            self.ctl.send(("closed", dict(self.stats)))
        elif name == "quit":
            self.quit = True

    def _open_count(self) -> int:
        return sum(1 for c in self.clients.values() if c.state == _OPEN)

    # -- connecting -----------------------------------------------------------------
    def _expire_and_refill(self) -> None:
        job = self.job
        assert job is not None
        now = time.monotonic()
        for client in [c for c in self.connecting if c.deadline < now]:
            self._connect_failed(client, "timeout", retry=True)
        while job.pending and job.inflight < job.max_inflight:
            self._start_connect(job.pending.popleft())
        if job.inflight == 0 and not job.pending:
            self.ctl.send(
                (
                    "connected",
                    {
                        "ok": job.ok,
                        "failed": job.failed,
                        "statuses": dict(job.statuses),
                        "t_start": job.t_start,
                        "t_end": job.t_end,
                        "cpu_s": time.process_time(),
                    },
                )
            )
            self.job = None

    def _start_connect(self, index: int) -> None:
        job = self.job
        assert job is not None
        client = _Client(index)
        client.attempts += 1
        self._open_socket(client)

    def _open_socket(self, client: _Client) -> None:
        job = self.job
        assert job is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        err = sock.connect_ex((job.host, job.port))
        client.sock = sock
        client.state = _CONNECTING
        client.buf = b""
        client.deadline = time.monotonic() + job.timeout_s
        self.clients[sock.fileno()] = client
        self.connecting.add(client)
        job.inflight += 1
        if err not in (0, errno.EINPROGRESS):
            self._connect_failed(client, f"errno {err}", retry=True)
            return
        self.ep.register(sock.fileno(), select.EPOLLOUT)

    def _on_connected(self, client: _Client, ev: int) -> None:
        job = self.job
        sock = client.sock
        assert job is not None and sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(client, errno.errorcode.get(err, str(err)), retry=True)
            return
        request, client.accept = handshake_request(
            job.host, job.port, job.path, job.tokens[client.index]
        )
        try:
            sock.send(request)
        except OSError as exc:
            self._connect_failed(client, type(exc).__name__, retry=True)
            return
        client.state = _HANDSHAKE
        self.ep.modify(sock.fileno(), select.EPOLLIN)

    def _recv_connecting(self, client: _Client, eof: str) -> bytes:
        """Read from a connection not open yet; b"" when there is nothing (yet) or it
        failed (then counted, and retried, with ``eof`` naming a close)."""
        sock = client.sock
        assert sock is not None
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return b""
        except OSError as exc:
            self._connect_failed(client, type(exc).__name__, retry=True)
            return b""
        if not data:
            self._connect_failed(client, eof, retry=True)
        return data

    def _on_handshake(self, client: _Client) -> None:
        job = self.job
        assert job is not None
        data = self._recv_connecting(client, "eof")
        if not data:
            return
        sock = client.sock
        assert sock is not None
        client.buf += data
        end = client.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(client.buf) > 65536:
                self._connect_failed(client, "huge response head", retry=False)
            return
        try:
            status = parse_handshake_response(client.buf[:end], client.accept)
        except ProtocolError:
            self._connect_failed(client, "bad handshake", retry=False)
            return
        if status != 101:
            self._connect_failed(client, f"http {status}", retry=status >= 500)
            return
        rest = client.buf[end + 4 :]
        client.buf = b""
        if job.protocol == "centrifuge":
            client.state = _GREETING
            try:
                sock.send(client_frame(OP_TEXT, _CENTRIFUGE_CONNECT))
            except OSError as exc:
                self._connect_failed(client, type(exc).__name__, retry=True)
                return
            if rest:
                self._greet(client, rest)
            return
        self._opened(client)
        if rest:
            self._on_data(client, rest, time.monotonic_ns())

    def _opened(self, client: _Client) -> None:
        job = self.job
        assert job is not None
        client.state = _OPEN
        self.connecting.discard(client)
        job.inflight -= 1
        job.ok += 1
        job.t_end = time.monotonic_ns()

    def _on_greeting(self, client: _Client) -> None:
        """Centrifuge: read until the reply to the connect command."""
        data = self._recv_connecting(client, "eof after upgrade")
        if data:
            self._greet(client, data)

    def _greet(self, client: _Client, data: bytes) -> None:
        assert client.sock is not None
        try:
            frames, client.buf = parse_frames(client.buf + data)
        except ProtocolError:
            self._connect_failed(client, "protocol error", retry=False)
            return
        for i, (_fin, opcode, payload) in enumerate(frames):
            if opcode == OP_PING:
                with contextlib.suppress(OSError):  # a dead socket shows on the next read
                    client.sock.send(client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._connect_failed(client, f"closed before connect reply ({code})", retry=False)
                return
            elif opcode == OP_TEXT:
                first, _, more = payload.partition(b"\n")
                if not centrifuge_connect_reply(first):
                    self._connect_failed(client, "connect refused", retry=False)
                    return
                self._opened(client)
                now = time.monotonic_ns()
                if more:
                    self._record(more, now)
                self._on_frames(client, frames[i + 1 :], now)
                return

    def _connect_failed(self, client: _Client, why: str, *, retry: bool) -> None:
        job = self.job
        assert job is not None
        self._drop(client, None)
        job.inflight -= 1
        if retry and client.attempts < _MAX_ATTEMPTS:
            client.attempts += 1
            job.statuses[f"retried {why}"] += 1
            self._open_socket(client)
            return
        job.failed += 1
        job.statuses[why] += 1

    def _drop(self, client: _Client, why: str | None) -> None:
        sock = client.sock
        if sock is None:
            return
        fd = sock.fileno()
        self.clients.pop(fd, None)
        self.connecting.discard(client)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)
        sock.close()
        client.sock = None
        if why is not None:
            self.stats[why] += 1

    # -- the hot path ---------------------------------------------------------------
    def _on_readable(self, client: _Client) -> None:
        sock = client.sock
        assert sock is not None
        try:
            data, ancdata, _, _ = sock.recvmsg(RECV_SIZE, _ANC_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client, "closed by error")
            return
        if not data:
            self._drop(client, "closed by server (eof)")
            return
        if ancdata:
            # The stamp of the latest segment read: for earlier frames in the same
            # read it errs late, so latencies are never under-stated.
            sec, nsec = _TIMESPEC.unpack_from(ancdata[0][2])
            now = sec * 1_000_000_000 + nsec - self.offset
        else:
            now = time.monotonic_ns()
        # Fast path, nearly every read at the rates that matter: exactly one complete,
        # unfragmented text frame (7- or 16-bit length) and nothing buffered.
        if not client.buf and data[0] == 0x81:
            length = data[1]
            if length == 126 and len(data) >= 4:
                length = ((data[2] << 8) | data[3]) + 4
            else:
                length += 2
            if length == len(data):
                self._record(data, now)
                return
        self._on_data(client, data, now)

    def _on_data(self, client: _Client, data: bytes, now: int) -> None:
        try:
            frames, client.buf = parse_frames(client.buf + data if client.buf else data)
        except ProtocolError:
            self._drop(client, "protocol error")
            return
        self._on_frames(client, frames, now)

    def _on_frames(self, client: _Client, frames: list[tuple[bool, int, bytes]], now: int) -> None:
        for fin, opcode, payload in frames:
            if opcode in (OP_TEXT, OP_BINARY):
                if not fin:
                    client.frag = payload
                    continue
                self._record(payload, now)
            elif opcode == OP_CONT:
                client.frag += payload
                if fin:
                    self._record(client.frag, now)
                    client.frag = b""
            elif opcode == OP_PING:
                self.stats["pings"] += 1
                self._send(client, client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self._send(client, client_frame(OP_CLOSE, payload[:2]))
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._drop(client, f"closed by server ({code})")
                return

    def _record_batched(self, frame: bytes, now: int) -> None:
        """Record each newline-delimited message of one text frame (Centrifuge)."""
        if frame[:1] == b"\x81":  # the fast path left the frame header on: drop it
            frame = frame[4:] if frame[1] == 126 else frame[2:]
        messages = frame.split(b"\n")
        if len(messages) > 1:
            self.stats["frames with several messages"] += 1
        for message in messages:
            if message:
                self._record_one(message, now)

    def _record_one(self, message: bytes, now: int) -> None:
        """Record one delivered message (``message`` may still carry its frame header)."""
        mark = bench_mark(message)
        if mark is None:
            self.stats["unmarked messages"] += 1
            return
        samples = self.samples.get(mark[0])
        if samples is None:
            samples = self.samples[mark[0]] = array("q")
        samples.append(mark[2])  # publish time, then latency: pairs, flat
        samples.append(now - mark[2])

    def _send(self, client: _Client, data: bytes) -> None:
        sock = client.sock
        if sock is None:
            return
        try:
            sock.send(data)
        except OSError:
            self._drop(client, "closed by error")


def _worker_main(ctl: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process: Ctrl-C is the coordinator's business."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _Worker(ctl).run()


@dataclass(frozen=True)
class Samples:
    """The deliveries of one step: publish stamp and latency (both ns), index-aligned."""

    publish_ns: list[int]
    latency_ns: list[int]


@dataclass(frozen=True)
class ConnectResult:
    """What one connect storm achieved, summed over workers."""

    ok: int
    failed: int
    statuses: dict[str, int]
    seconds: float
    worker_cpu_s: float

    @property
    def handshakes_per_s(self) -> float:
        """Completed authenticated handshakes per second of storm (0 if none)."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0


class LoadGen:
    """Coordinator handle on ``workers`` load-generator processes.

    Processes are started at construction (spawned, inheriting this process's CPU
    affinity) and stopped by :meth:`shutdown`, which is idempotent and never raises.
    """

    def __init__(self, workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        self._pipes: list[multiprocessing.connection.Connection] = []
        try:
            for i in range(workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main, args=(child,), name=f"loadgen-{i}", daemon=True
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._pipes.append(parent)
        except BaseException:
            self.shutdown()
            raise

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers."""
        return [p.pid for p in self._procs]

    def _ask(self, index: int, cmd: tuple[Any, ...], expect: str, timeout_s: float) -> Any:
        pipe = self._pipes[index]
        try:
            pipe.send(cmd)
            return self._answer(index, expect, timeout_s)
        except (EOFError, OSError) as exc:
            raise LoadGenError(f"load-generator worker {index} died") from exc

    def _answer(self, index: int, expect: str, timeout_s: float) -> Any:
        pipe = self._pipes[index]
        if not pipe.poll(timeout_s):
            raise LoadGenError(f"worker {index} did not answer {expect!r} in {timeout_s:.0f} s")
        reply = pipe.recv()
        if reply[0] != expect:
            raise LoadGenError(f"worker {index} answered {reply[0]!r}, expected {expect!r}")
        return reply

    def cpu_seconds(self) -> list[float]:
        """CPU seconds (user + system) each worker has used so far."""
        return [self._ask(i, ("cpu",), "cpu", 10)[1] for i in range(len(self._pipes))]

    def connect(
        self,
        host: str,
        port: int,
        users: list[str],
        secret: str,
        *,
        path: str = "/ws",
        protocol: str = "plain",
        max_inflight: int = 100,
        timeout_s: float = 10.0,
        deadline_s: float = 120.0,
    ) -> ConnectResult:
        """Open one authenticated connection per entry of ``users``, all workers at once.

        Connection ``i`` goes to worker ``i % workers``; at most ``max_inflight``
        handshakes are in progress at a time over all workers (so a listen backlog
        of 100 is never the limit). Returns when every connection is open or has
        failed ``_MAX_ATTEMPTS`` times; raises :class:`LoadGenError` after
        ``deadline_s``. The storm's duration runs from the first connect to the
        last completed handshake (with ``protocol="centrifuge"``, the last connect
        reply: a connection is subscribed only then).
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown client protocol {protocol!r}")
        n = len(self._pipes)
        per_worker = [users[i::n] for i in range(n)]
        if max(len(p) for p in per_worker) > MAX_CONNECTIONS_PER_WORKER:
            raise ValueError("too many connections per worker: add workers")
        tokens_by_user = {u: mint_token(secret, u) for u in set(users)}
        inflight = max(1, max_inflight // n)
        cpu_before = self.cpu_seconds()
        for i, part in enumerate(per_worker):
            tokens = [tokens_by_user[u] for u in part]
            cmd = ("connect", host, port, path, tokens, inflight, timeout_s, protocol)
            try:
                self._pipes[i].send(cmd)
            except OSError as exc:
                raise LoadGenError(f"load-generator worker {i} died") from exc
        end = time.monotonic() + deadline_s
        replies = [
            self._answer(i, "connected", max(0.1, end - time.monotonic()))[1] for i in range(n)
        ]
        statuses: collections.Counter[str] = collections.Counter()
        for r in replies:
            statuses.update(r["statuses"])
        t_start = min(r["t_start"] for r in replies)
        t_end = max(r["t_end"] for r in replies)
        return ConnectResult(
            ok=sum(r["ok"] for r in replies),
            failed=sum(r["failed"] for r in replies),
            statuses=dict(statuses),
            seconds=max(0, t_end - t_start) / 1e9,
            worker_cpu_s=sum(r["cpu_s"] for r in replies) - sum(cpu_before),
        )

    def counts(self) -> tuple[dict[int, int], int]:
        """``({step: messages received so far}, open connections)`` over all workers."""
        total: collections.Counter[int] = collections.Counter()
        open_ = 0
        for i in range(len(self._pipes)):
            _, counts, n_open = self._ask(i, ("counts",), "counts", 10)
            total.update(counts)
            open_ += n_open
        return dict(total), open_

    def collect(self, steps: list[int]) -> tuple[dict[int, Samples], dict[str, int]]:
        """Take (and forget) what the workers recorded for ``steps``.

        Returns ``({step: samples}, counters)``; counters are the workers' running
        totals of events (pings answered, connections closed by the server...).
        """
        out = {s: Samples([], []) for s in steps}
        stats: collections.Counter[str] = collections.Counter()
        for i in range(len(self._pipes)):
            _, data, _cpu, wstats = self._ask(i, ("collect", steps), "collect", 30)
            for step, raw in data.items():
                pairs = array("q")
                pairs.frombytes(raw)
                out[step].publish_ns.extend(pairs[0::2])
                out[step].latency_ns.extend(pairs[1::2])
            stats.update(wstats)
        return out, dict(stats)

    def pause(self) -> None:
        """Stop every worker (``SIGSTOP``) until :meth:`resume`: their sockets keep
        receiving, and the kernel stamps each segment as it arrives, but the workers
        take no CPU at all. Ask them nothing while paused."""
        for proc in self._procs:
            os.kill(proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let paused workers run again (``SIGCONT``); harmless when not paused."""
        for proc in self._procs:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGCONT)

    def close_all(self) -> None:
        """Close every client connection (bounded wait per worker)."""
        for i in range(len(self._pipes)):
            self._ask(i, ("close",), "closed", 30)

    def shutdown(self) -> None:
        """Stop every worker: ask, then terminate, then kill. Never raises."""
        self.resume()  # a stopped worker would not act on "quit" or SIGTERM
        for pipe in self._pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(("quit",))
        deadline = time.monotonic() + 3
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for pipe in self._pipes:
            pipe.close()
        self._procs.clear()
        self._pipes.clear()
