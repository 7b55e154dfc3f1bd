"""Publisher process: Redis ``PUBLISH user_noti:<user>`` at a target rate, or in one burst.

It speaks RESP over a raw socket (pipelined, replies read without blocking the pace),
so that a Python Redis client is never what limits the offered rate. Every message is
about :data:`MESSAGE_SIZE` bytes and carries ``"bench": "<step>:<seq>:<publish ns>"``
in its payload, stamped with ``time.monotonic_ns()`` right before the batch is written.

The coordinator side is :class:`Publisher`; each request has a deadline and raises
:class:`PublisherError` when missed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import random
import signal
import socket
import time
from typing import Any

from bench.loadgen import user_id

CHANNEL_PREFIX = b"user_noti:"
# Target size of one published message in bytes (the "~200 B").
MESSAGE_SIZE = 200
# Pacing tick: each tick sends what is due, so batches stay small and arrivals smooth.
_TICK_S = 0.002


class PublisherError(Exception):
    """The publisher failed, died, or did not answer within its deadline."""


def encode_message(step: int, seq: int, t_ns: int) -> bytes:
    """One benchmark message as published (JSON, about :data:`MESSAGE_SIZE` bytes)."""
    head = b'{"type":"notification","payload":{"bench":"%d:%d:%d","title":"bench","body":"' % (
        step,
        seq,
        t_ns,
    )
    pad = max(0, MESSAGE_SIZE - len(head) - 3)
    return head + b"x" * pad + b'"}}'


def _publish_command(channel: bytes, message: bytes) -> bytes:
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(message),
        message,
    )


class _Replies:
    """Counts RESP integer replies (``:<receivers>\\r\\n``) as they arrive."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tail = b""
        self.count = 0
        self.receivers = 0

    def _feed(self, data: bytes) -> None:
        lines = (self.tail + data).split(b"\r\n")
        self.tail = lines.pop()
        for line in lines:
            if not line.startswith(b":"):
                raise PublisherError(f"unexpected Redis reply {line[:80]!r}")
            self.count += 1
            self.receivers += int(line[1:])

    def poll(self) -> None:
        """Read whatever replies are already there, without waiting."""
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                raise PublisherError("Redis closed the connection")
            self._feed(data)

    def wait(self, expected: int, timeout_s: float) -> None:
        """Read replies until ``expected`` have arrived; raise after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.count < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PublisherError(f"only {self.count}/{expected} Redis replies in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            finally:
                self.sock.settimeout(None)
            if not data:
                raise PublisherError("Redis closed the connection")
            self._feed(data)


def _channels(users: int) -> list[bytes]:
    return [CHANNEL_PREFIX + user_id(i).encode() for i in range(users)]


def _run_rate(
    sock: socket.socket, step: int, users: int, rate: float, duration_s: float, seed: int
) -> dict[str, Any]:
    channels = _channels(users)
    rng = random.Random(seed)
    replies = _Replies(sock)
    total = int(rate * duration_s)
    cpu0 = time.process_time()
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            t_ns = time.monotonic_ns()
            batch = [
                _publish_command(rng.choice(channels), encode_message(step, seq, t_ns))
                for seq in range(sent, due)
            ]
            sock.sendall(b"".join(batch))
            sent = due
            replies.poll()
        time.sleep(_TICK_S)
    elapsed = time.monotonic() - start
    replies.wait(sent, 30)
    return {
        "published": sent,
        "receivers": replies.receivers,
        "elapsed_s": elapsed,
        "cpu_s": time.process_time() - cpu0,
    }


def _run_burst(sock: socket.socket, step: int, users: int) -> dict[str, Any]:
    channels = _channels(users)
    replies = _Replies(sock)
    cpu0 = time.process_time()
    t_ns = time.monotonic_ns()
    payload = b"".join(
        _publish_command(ch, encode_message(step, seq, t_ns)) for seq, ch in enumerate(channels)
    )
    sock.sendall(payload)
    sent_ns = time.monotonic_ns()
    replies.wait(users, 30)
    return {
        "published": users,
        "receivers": replies.receivers,
        "t0_ns": t_ns,
        "send_s": (sent_ns - t_ns) / 1e9,
        "cpu_s": time.process_time() - cpu0,
    }


def publisher_socket(host: str, port: int) -> socket.socket:
    """A publisher process's connection to Redis: blocking once connected
    (within 10 s), no Nagle delay. The process ignores SIGINT (the
    coordinator stops it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.create_connection((host, port), timeout=10)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _publisher_main(ctl: multiprocessing.connection.Connection, host: str, port: int) -> None:
    """Entry point of the publisher process: serve requests until ``quit`` or EOF."""
    sock = publisher_socket(host, port)
    while True:
        try:
            cmd = ctl.recv()
        except (EOFError, OSError):
            return
        try:
            if cmd[0] == "rate":
                ctl.send(("done", _run_rate(sock, *cmd[1:])))
            elif cmd[0] == "burst":
                ctl.send(("done", _run_burst(sock, *cmd[1:])))
            elif cmd[0] == "quit":
                return
        except (OSError, PublisherError) as exc:
            ctl.send(("error", f"{type(exc).__name__}: {exc}"))


class Publisher:
    """Coordinator handle on the publisher process (connected to Redis at ``host:port``).

    :meth:`shutdown` is idempotent and never raises.
    """

    def __init__(self, host: str, port: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc: Any = ctx.Process(
            target=_publisher_main, args=(child, host, port), name="publisher", daemon=True
        )
        self._proc.start()
        child.close()

    @property
    def pid(self) -> int:
        """Process id of the publisher."""
        return int(self._proc.pid)

    def _ask(self, cmd: tuple[Any, ...], timeout_s: float) -> dict[str, Any]:
        try:
            self._pipe.send(cmd)
            if not self._pipe.poll(timeout_s):
                raise PublisherError(f"publisher did not finish {cmd[0]!r} in {timeout_s:.0f} s")
            reply = self._pipe.recv()
        except (EOFError, OSError) as exc:
            raise PublisherError("the publisher process died") from exc
        if reply[0] != "done":
            raise PublisherError(reply[1])
        result: dict[str, Any] = reply[1]
        return result

    def rate(self, step: int, users: int, rate: float, duration_s: float) -> dict[str, Any]:
        """Publish ``rate`` messages/s for ``duration_s`` to users drawn at random.

        Returns ``published``, ``receivers`` (sum of Redis' PUBLISH replies: how many
        subscribers got each message), ``elapsed_s`` and ``cpu_s``.
        """
        return self._ask(("rate", step, users, rate, duration_s, step), duration_s + 40)

    def burst(self, step: int, users: int) -> dict[str, Any]:
        """Publish one message to every user in a single pipelined write.

        Every message carries the same stamp ``t0_ns``, taken before the write.
        """
        return self._ask(("burst", step, users), 60)

    def shutdown(self) -> None:
        """Stop the publisher: ask, then terminate, then kill. Never raises."""
        with contextlib.suppress(OSError, ValueError):
            self._pipe.send(("quit",))
        self._proc.join(3)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(2)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2)
        self._pipe.close()
