"""The systemd notify protocol (``sd_notify(3)``), in a few lines, without libsystemd.

systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET``, the address of
an ``AF_UNIX``/``SOCK_DGRAM`` socket (a file system path, or ``@name`` in the
Linux abstract namespace), and reads newline-separated ``KEY=VALUE``
assignments from each datagram the service sends there:

``READY=1``
    start-up is finished: ``systemctl start`` returns, units ordered
    ``After=`` the hub start. smapws sends it once it is listening *and* its
    broker subscription is connected (the moment ``/ready`` turns 200).
``STOPPING=1``
    the hub has begun to drain (SIGTERM/SIGINT, :meth:`Server.drain`). Sent
    with ``EXTEND_TIMEOUT_USEC`` covering the whole drain, so systemd never
    kills a drain that is within its own timeout, whatever ``TimeoutStopSec=``.
``WATCHDOG=1``
    "the event loop still runs": sent from a trio task every half of
    ``$WATCHDOG_USEC`` (``WatchdogSec=``). A stuck loop sends nothing, and
    systemd kills and restarts the unit. (With ``SMAPWS_WORKERS`` > 1 the
    supervisor sends it, and only while every worker is alive.)
``STATUS=...``
    one line of text that ``systemctl status`` shows: state, connections.

Guarantees of this module:

- Nothing happens when ``$NOTIFY_SOCKET`` is unset (not under systemd), or
  names an address family this module does not speak (logged once).
- Sending never blocks the trio loop: the socket is non-blocking, and a
  datagram the socket cannot take at once is dropped (systemd would rather
  miss a status line than have the hub wait).
- Sending never raises: if the socket is gone (systemd restarted, a test
  closed it), the failure is logged once per error kind and the hub goes on.

The pure parts (:func:`parse_address`, :func:`watchdog_period`,
:func:`encode`, :func:`hub_status`, :func:`group_status`) read no
environment, clock or socket.
"""

from __future__ import annotations

import errno
import math
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

import trio
from trio_util import AsyncValue

from smapws._core.group import GroupView
from smapws._errors import SmapwsError
from smapws._log import fields, logger

#: A status that differs only in its counts is re-sent at most this often:
#: ``systemctl status`` is read by a human, not a monitor.
STATUS_REFRESH_S: Final = 5.0
#: systemd keeps STATUS= short; a longer line is cut rather than dropped.
MAX_STATUS_CHARS: Final = 200


class NotifyAddressError(SmapwsError, ValueError):
    """``$NOTIFY_SOCKET`` holds an address this module cannot send to."""


def parse_address(value: str | None) -> str | None:
    """The ``AF_UNIX`` address to send to, from the value of ``$NOTIFY_SOCKET``.

    ``None`` or ``""`` (not under systemd) gives ``None``. An absolute path is
    returned as is; ``@name`` becomes ``"\\0name"``, Python's spelling of the
    abstract namespace. Raises :class:`NotifyAddressError` for anything else
    (a relative path, systemd's ``vsock:`` addresses).
    """
    if not value:
        return None
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifyAddressError(
        "NOTIFY_SOCKET: expected an absolute path or an @abstract name, got "
        f"{value.split(':', 1)[0]!r}..."
    )


def watchdog_period(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1``, or ``None`` when no watchdog is asked for.

    Half of ``$WATCHDOG_USEC``, as ``sd_watchdog_enabled(3)`` advises. ``None``
    when the variable is unset, zero or not a number, or when
    ``$WATCHDOG_PID`` is set and is not ``pid`` (the variables were meant for
    another process, e.g. inherited from a parent).
    """
    raw = env.get("WATCHDOG_USEC", "").strip()
    if not raw.isdigit() or int(raw) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "").strip()
    if owner and owner != str(pid):
        return None
    return int(raw) / 1e6 / 2


def encode(assignments: Mapping[str, str | int]) -> bytes:
    """One notification datagram: ``KEY=VALUE`` lines, in the mapping's order.

    Values are made single-line (a newline would start a new, unintended
    assignment) and ``STATUS`` is cut to :data:`MAX_STATUS_CHARS`. Raises
    ``ValueError`` for a key that is not ``[A-Z_]+``.
    """
    lines = []
    for key, value in assignments.items():
        if not key or not all(c.isupper() or c == "_" for c in key) or not key.isascii():
            raise ValueError(f"not a notify key: {key!r}")
        text = " ".join(str(value).splitlines())
        if key == "STATUS":
            text = text[:MAX_STATUS_CHARS]
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


class Status(NamedTuple):
    """What ``STATUS=`` says: ``state`` changes are sent at once, ``load``
    changes (counts) at most every :data:`STATUS_REFRESH_S`."""

    state: str
    load: str

    @property
    def text(self) -> str:
        return f"{self.state}; {self.load}" if self.load else self.state


def hub_status(health: Mapping[str, Any], port: int) -> Status:
    """The status line for a hub, from its ``/health`` document (the contract
    of DESIGN §3.3), e.g. ``ready on port 8081, redis subscriber connected;
    3 connections, 2 users``. The subscriber's ``last_error`` (already
    redacted by the broker) is shown while it is not connected."""
    sub = health.get("subscriber", {})
    backend = sub.get("backend", "?")
    sub_status = sub.get("status", "?")
    ws = health.get("websocket", {})
    load = f"{ws.get('active_connections', 0)} connections, {ws.get('active_users', 0)} users"
    if health.get("draining"):
        return Status(f"draining on port {port}", load)
    if sub_status == "connected":
        return Status(f"ready on port {port}, {backend} subscriber connected", load)
    error = f" ({sub['last_error']})" if sub.get("last_error") else ""
    if sub_status == "connecting" and not sub.get("reconnects"):
        return Status(
            f"listening on port {port}, waiting for the {backend} subscriber{error}", load
        )
    return Status(f"degraded on port {port}: {backend} subscriber {sub_status}{error}", load)


class Notifier:
    """Sends notifications to one ``$NOTIFY_SOCKET`` address; see the module
    docstring for what is guaranteed. ``Notifier(None)`` is the disabled one:
    every method is a no-op returning ``False``."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._closed = False
        self._failures_logged: set[int] = set()

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` asks for (disabled when unset or
        unusable; an unusable value is logged, never raised)."""
        env = os.environ if env is None else env
        try:
            return cls(parse_address(env.get("NOTIFY_SOCKET")))
        except NotifyAddressError as exc:
            logger.warning("systemd notify disabled", extra=fields(error=str(exc)))
            return cls(None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, assignments: Mapping[str, str | int]) -> bool:
        """Send one datagram at once, without waiting; ``True`` when the
        socket took it. Never raises ``OSError``. After :meth:`close`, sends
        nothing."""
        if self.address is None or self._closed:
            return False
        data = encode(assignments)
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(data, self.address)
        except OSError as exc:
            code = exc.errno or 0
            if code not in self._failures_logged:
                self._failures_logged.add(code)
                logger.warning(
                    "systemd notify failed",
                    extra=fields(
                        error=errno.errorcode.get(code, str(code)),
                        notification=data.split(b"=", 1)[0].decode(),
                    ),
                )
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send({"READY": 1, "STATUS": status})

    def stopping(self, status: str, *, extend_timeout_s: float) -> bool:
        """``STOPPING=1``, and ask systemd to allow ``extend_timeout_s`` more
        for the stop (it only ever extends ``TimeoutStopSec=``, never shortens)."""
        usec = max(1, math.ceil(extend_timeout_s * 1e6))
        return self.send({"STOPPING": 1, "STATUS": status, "EXTEND_TIMEOUT_USEC": usec})

    def watchdog(self) -> bool:
        return self.send({"WATCHDOG": 1})

    def status(self, status: str) -> bool:
        return self.send({"STATUS": status})

    def close(self) -> None:
        """Close the socket; the notifier is disabled from then on."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def group_status(view: GroupView, port: int) -> Status:
    """The status line of a group of workers (``SMAPWS_WORKERS`` > 1), e.g.
    ``ready on port 8081, 4 workers, redis subscribers connected; 3
    connections, 2 users``, or what is missing: ``degraded on port 8081: 3 of
    4 workers ready (worker 2 not running)``."""
    connections, users, _ = view.totals()
    load = f"{connections} connections, {users} users"
    n = view.size
    if view.draining:
        return Status(f"draining on port {port}: {view.running} of {n} workers running", load)
    backends = sorted({w.backend for w in view.workers if w is not None}) or ["?"]
    if view.ready:
        return Status(
            f"ready on port {port}, {n} workers, {'/'.join(backends)} subscribers connected", load
        )
    missing = []
    for i, w in enumerate(view.workers):
        if w is None:
            missing.append(f"worker {i} not running")
        elif w.unresponsive:
            missing.append(f"worker {i} not answering")
        elif not w.ready:
            missing.append(f"worker {i} {w.backend} subscriber {w.broker}")
    what = (
        "starting"
        if view.restarts == 0 and all(w is None or w.broker == "connecting" for w in view.workers)
        else "degraded"
    )
    detail = "; ".join(missing)
    return Status(
        f"{what} on port {port}: {view.ready_count} of {n} workers ready ({detail})", load
    )


async def supervise(
    notifier: Notifier,
    *,
    changes: AsyncValue[Any],
    is_ready: Callable[[], bool],
    describe: Callable[[], Status],
    watchdog_s: float | None,
    watchdog_ok: Callable[[], bool] = lambda: True,
    refresh_s: float = STATUS_REFRESH_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep systemd informed until cancelled (a task of the root nursery).

    ``changes`` is an observable value (trio-util's ``AsyncValue``) that
    changes whenever readiness or the state part of ``describe()`` may have:
    this task waits on it, it does not poll.

    - ``WATCHDOG=1`` at once and then every ``watchdog_s`` (when not
      ``None``), on the trio loop's own clock, so it stops exactly when the
      loop stops; a tick is skipped when ``watchdog_ok()`` (called once per
      tick) says no.
    - ``READY=1`` (with ``STATUS=``) once, the moment ``is_ready()`` is first
      true after a change of ``changes``; never before.
    - ``STATUS=`` at once when ``describe()``'s state changes; when only its
      counts changed, at most every ``refresh_s`` (counts are looked at that
      often: they are not observable values).

    ``STOPPING=1`` is not sent here but by whoever starts the drain, at that
    moment. An exception from ``describe``/``is_ready`` is logged once and
    taken as "not ready": the watchdog keeps running. Closes the notifier's
    socket when it returns.
    """
    ready_sent = describe_failed = False
    last: Status | None = None
    last_at = -math.inf
    next_watchdog = trio.current_time()
    task_status.started()
    try:
        while True:
            now = trio.current_time()
            if watchdog_s is not None and now >= next_watchdog:
                if watchdog_ok():
                    notifier.watchdog()
                next_watchdog = now + watchdog_s
            seen = changes.value
            try:
                status = describe()
                ready = is_ready()
            except Exception:  # a status line must never take the hub down
                if not describe_failed:
                    logger.exception("systemd status unavailable")
                describe_failed = True
                status, ready = last or Status("status unavailable", ""), False
            if not ready_sent and ready:
                notifier.ready(status.text)
                ready_sent = True
                last, last_at = status, now
            elif (
                last is None
                or status.state != last.state
                or (status != last and now - last_at >= refresh_s)
            ):
                notifier.status(status.text)
                last, last_at = status, now
            # Counts are looked at again once a refresh is due; any change of
            # `changes` (readiness, broker, draining) wakes this task at once.
            next_refresh = last_at + refresh_s if last_at + refresh_s > now else now + refresh_s
            wake = next_refresh if watchdog_s is None else min(next_refresh, next_watchdog)
            with trio.move_on_at(wake):
                await changes.wait_value(lambda v, seen=seen: v != seen)
    finally:
        notifier.close()
