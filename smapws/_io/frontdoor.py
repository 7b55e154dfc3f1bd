"""One port for HTTP and WebSocket (two with ``SMAPWS_INTERNAL_PORT``).

The front door reads and parses the request head itself (once: the upgrade
is answered from it, and the WebSocket after it is the sans-IO
``smapws._core.wsconn`` driven by ``smapws._io.connection``), then:

- ``GET /health``, ``GET /ready``, ``GET /metrics``, ``POST /api/publish`` are
  answered as plain HTTP and the connection is closed;
- ``GET /ws`` with an upgrade is checked (draining, capacity, Origin, token)
  *before* the upgrade, refused with a plain HTTP status, or handed to the
  WebSocket layer together with the bytes already read;
- anything else gets 404/405/400, and a client that has not sent its head
  within ``SMAPWS_HANDSHAKE_TIMEOUT`` gets 408.

Each listener serves its own routes (:data:`ALL_ROUTES` on the one port, or
:data:`PUBLIC_ROUTES` and :data:`INTERNAL_ROUTES`); a path the listener does
not serve is 404, as if it did not exist.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import random
import time
from collections.abc import Mapping
from typing import Final, TypeAlias

import trio

from smapws._core.admission import RETRY_AFTER_S, Accept, Refuse
from smapws._core.envelope import InvalidMessage, parse_publish_body
from smapws._core.frames import close_frame
from smapws._core.history import Resume
from smapws._core.http import (
    MAX_HEAD_BYTES,
    HttpError,
    RequestHead,
    head_end,
    parse_head,
    response,
)
from smapws._core.wsconn import handshake_response, valid_key
from smapws._errors import SmapwsError
from smapws._io import assets, connection, demo, sockio
from smapws._io.app import App
from smapws._io.brokers import BrokerError
from smapws._io.connection import INTERNAL as INTERNAL_ERROR
from smapws._log import fields, logger

_RECEIVE_BYTES: Final = 4096
#: Bounds of the lingering close after a response (see ``_send``).
_LINGER_S: Final = 2.0
_LINGER_BYTES: Final = 256 * 1024
#: Deadline for the 503 sent to an address over its bound (a fresh socket's
#: send buffer takes it at once; a peer that reads nothing loses it).
_REFUSE_SEND_S: Final = 0.5
_JSON: Final = "application/json"
_METRICS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Paths a listener serves, with their allowed methods.
Routes: TypeAlias = Mapping[str, tuple[str, ...]]
#: Every path: what the one port serves when ``SMAPWS_INTERNAL_PORT`` is unset.
ALL_ROUTES: Final[Routes] = {
    "/health": ("GET", "HEAD"),
    "/ready": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
    "/api/publish": ("POST",),
    "/ws": ("GET",),
    assets.CLIENT_JS_PATH: ("GET", "HEAD"),
}
#: With ``SMAPWS_INTERNAL_PORT``, the public port: browsers and probes only.
#: The browser client is here (pages import it from the host they connect
#: to), and so are the demo's routes under ``SMAPWS_DEMO``.
PUBLIC_ROUTES: Final[Routes] = {
    p: ALL_ROUTES[p] for p in ("/health", "/ready", "/ws", assets.CLIENT_JS_PATH)
}
#: The internal port: probes, the scraper, the publishers. No ``/ws`` (404,
#: like any path a port does not serve): browsers come in only through the
#: public port and what fronts it (TLS, the ingress and its timeouts).
INTERNAL_ROUTES: Final[Routes] = {
    p: ALL_ROUTES[p] for p in ("/health", "/ready", "/metrics", "/api/publish")
}


def _peer(stream: trio.abc.Stream) -> tuple[str, str]:
    """The peer's IP address (the balancer's, behind one) and its
    ``host:port``, or "-" for each (one ``getpeername``)."""
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2]  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError, TypeError):
        return "-", "-"
    return str(host), f"{host}:{port}"


async def _refuse_address(app: App, stream: trio.abc.Stream, fd: int, address: str) -> None:
    """Answer 503 at once to a socket whose address holds
    ``SMAPWS_MAX_PENDING_PER_ADDRESS`` already, without reading its request
    or lingering: this answer must cost that address no slot."""
    _reject_log(app, "address_limit", 503, address)
    with trio.move_on_after(_REFUSE_SEND_S):
        await sockio.send_all(
            stream, fd, response(503, headers=(("Retry-After", str(RETRY_AFTER_S)),))
        )


class _Refused(SmapwsError):
    """Refuse a publish request: answer ``status`` and log/count ``reason``
    (a fixed word, safe to log)."""

    def __init__(
        self,
        status: int,
        reason: str,
        headers: tuple[tuple[str, str], ...] = (),
        **detail: object,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        #: More fields for the log line (never a secret).
        self.detail = detail
        super().__init__(reason)


class _Upgrade:
    """An upgrade that passed every check: what the WebSocket phase needs, and
    nothing of the request head (an idle connection keeps this alive)."""

    __slots__ = ("deadline", "expires_at", "key", "remote", "resume", "trailing", "user_id")

    def __init__(
        self,
        user_id: str,
        expires_at: float,
        key: str,
        trailing: bytes,
        remote: str,
        deadline: float,
        resume: Resume | None = None,
    ) -> None:
        self.deadline = deadline
        self.resume = resume
        self.user_id = user_id
        self.expires_at = expires_at
        self.key = key
        self.trailing = trailing
        self.remote = remote


async def handle(app: App, stream: trio.abc.Stream, routes: Routes = ALL_ROUTES) -> None:
    """Serve one accepted TCP connection until it is done; always closes it.
    Paths outside ``routes`` (the listener's) are 404.

    This is the connection's barrier: an unexpected exception ends this
    connection alone, answered 500 before the upgrade or closed with 1011
    after it, counted as ``websocket_internal_errors_total{where="connection"}``
    and logged once with its traceback. Only cancellation goes further."""
    upgraded: list[connection.Connection | None] = []
    fd = sockio.fd_of(stream)
    app.started(fd)
    address, remote = _peer(stream)
    try:
        if not app.pending_by_address.acquire(address):
            await _refuse_address(app, stream, fd, address)
            return
        try:
            upgrade = await _front(app, stream, fd, remote, routes)
        finally:
            app.pending_by_address.release(address)
        if upgrade is not None and (conn := await _accept(app, stream, fd, upgrade, upgraded)):
            # The connection's life, in this task (one coroutine frame less
            # per idle connection than a helper around it).
            trailing, resume, upgrade = upgrade.trailing, upgrade.resume, None
            await connection.run(app, stream, conn, resume, trailing, address)
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer went away; nothing to answer
    except* Exception as group:
        app.internal_error("connection", group, remote=remote)
        farewell = _farewell(upgraded[-1]) if upgraded else response(500)
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_LINGER_S),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await sockio.send_all(stream, fd, farewell)
    finally:
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()  # (aclose() would add a checkpoint, at the end)
        else:
            with trio.CancelScope(shield=True):
                await stream.aclose()
        if upgraded and upgraded[-1] is not None:
            _release(app, upgraded[-1])


def _release(app: App, conn: connection.Connection) -> None:
    """Let the connection's frame parser end (``WsConn.release``: else a
    reference cycle), once nothing more is read or written, farewell included."""
    try:
        conn.ws.release()
    except Exception as exc:  # a bug: counted, and this connection's alone
        app.internal_error("connection", exc, remote=conn.remote)


def _farewell(conn: connection.Connection | None) -> bytes:
    """What an upgraded connection that failed is sent last: the rest of a
    data frame written in part (a close frame inside it would break the
    client's framing), then a close frame with 1011."""
    if conn is not None:
        try:
            conn.request_close(INTERNAL_ERROR, "internal error", cause="internal_error")
            return conn.ws.data_to_send()
        except Exception:  # the connection's own state is what failed
            pass
    return close_frame(INTERNAL_ERROR, "internal error")


async def _front(
    app: App, stream: trio.abc.Stream, fd: int, remote: str, routes: Routes
) -> _Upgrade | None:
    """Read the request head and answer it, unless it is an acceptable
    upgrade: that is returned for the WebSocket phase. ``fd``: the socket's
    (:func:`~smapws._io.sockio.fd_of`); ``remote``: the peer, for the logs."""
    cfg = app.config
    buf = bytearray()
    # One deadline for the whole handshake: the head here, the 101 later. (A
    # bare CancelScope: fail_after's context-manager wrapper was a tenth of
    # the cost of a handshake.)
    deadline = trio.current_time() + cfg.handshake_timeout
    # A browser sends its head as soon as it connects: by the time this task
    # runs, it is usually all there. Then no deadline, no waiting, and no
    # entry in the table of heads being read (nothing else runs meanwhile).
    first = sockio.receive_now(fd, _RECEIVE_BYTES)
    if first is not None:
        if not first:
            return None
        buf += first
    end = head_end(buf)
    try:
        if end < 0:
            with trio.CancelScope(deadline=deadline) as scope, app.reading_head(scope, fd):
                while (end := head_end(buf)) < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise HttpError(431, "request head too large")
                    chunk = await sockio.receive_some(stream, fd, _RECEIVE_BYTES)
                    if not chunk:
                        return None
                    buf += chunk
        if end < 0:
            if trio.current_time() < deadline:  # evicted by a newer socket
                _reject_log(app, "head_evicted", 408, remote)
                with trio.move_on_after(_LINGER_S):  # no lingering read
                    await sockio.send_all(stream, fd, response(408))
                return None
            _reject_log(app, "handshake_timeout", 408, remote)
            await _send(app, stream, response(408))
            return None
        if end > MAX_HEAD_BYTES:
            raise HttpError(431, "request head too large")
        head = parse_head(bytes(buf[:end]))
    except HttpError as exc:
        _reject_log(app, "bad_request", exc.status, remote)
        await _send(app, stream, response(exc.status))
        return None

    methods = routes.get(head.path)
    if methods is None and app.config.demo and routes is not INTERNAL_ROUTES:
        methods = demo.ROUTES.get(head.path)
    if methods is None:
        await _send(app, stream, response(404))
    elif head.method not in methods:
        if head.path == "/ws":
            _reject_log(app, "bad_method", 405, remote)
        await _send(app, stream, response(405, headers=(("Allow", ", ".join(methods)),)))
    elif head.path == "/ws":
        decision = _check_upgrade(app, head)
        if isinstance(decision, Refuse):
            _reject_log(app, decision.reason, decision.status, remote, **dict(decision.detail))
            await _send(app, stream, response(decision.status, headers=decision.headers))
            return None
        if decision.query_token_used:
            app.metrics.query_token_used.inc()
            logger.warning(
                "deprecated query token used; send the access_token cookie instead",
                extra=fields(user=decision.user_id, remote=remote),
            )
        key = head.header("sec-websocket-key") or ""
        return _Upgrade(
            decision.user_id,
            decision.expires_at,
            key,
            bytes(buf[end:]),
            remote,
            deadline,
            decision.resume,
        )
    elif head.path == "/api/publish":
        await _publish(app, stream, head, bytes(buf[end:]), remote)
    elif head.path in demo.ROUTES:
        await _send(app, stream, demo.respond(app, head))
    else:
        await _send(app, stream, await _http_get(app, head))
    return None


async def _http_get(app: App, head: RequestHead) -> bytes:
    head_only = head.method == "HEAD"
    if head.path == assets.CLIENT_JS_PATH:
        # Public, and imported by pages of other origins (a dev server): CORS.
        return response(
            200,
            assets.read(assets.CLIENT_JS),
            content_type=assets.JAVASCRIPT,
            headers=(("Access-Control-Allow-Origin", "*"),),
            head_only=head_only,
        )
    if head.path == "/metrics":
        # A worker of a group answers with the group's metrics, collected by
        # its supervisor; 503 when they cannot be (never this worker's alone:
        # a partial sum would look to Prometheus like a counter reset).
        text = await app.render_metrics()
        if text is None:
            return response(503, head_only=head_only)
        return response(200, text, content_type=_METRICS_TYPE, head_only=head_only)
    body = json.dumps(app.health()).encode()
    status = 200 if head.path == "/health" or app.ready() else 503
    return response(status, body, content_type=_JSON, head_only=head_only)


async def _send(app: App, stream: trio.abc.Stream, data: bytes) -> None:
    """Write a whole response, then close gracefully.

    The client may still be sending (a refused request body): closing a
    socket with unread input makes the kernel send RST, which can destroy
    the response before the client reads it. So half-close our side, then
    read and discard until the client closes or a short deadline passes
    (nginx's "lingering close")."""
    fd = sockio.fd_of(stream)
    with trio.move_on_after(_LINGER_S) as scope:
        await sockio.send_all(stream, fd, data)
        await sockio.send_eof(stream, fd)
        discarded = 0
        # Counted against SMAPWS_MAX_PENDING_REQUESTS (and its address's
        # bound, held by ``handle``): clients that never close would
        # otherwise hold a descriptor each for 2 s outside every bound.
        with app.lingering_close(scope):
            while discarded < _LINGER_BYTES:
                chunk = await sockio.receive_some(stream, fd, _RECEIVE_BYTES)
                if not chunk:
                    break
                discarded += len(chunk)


def _reject_log(app: App, reason: str, status: int, remote: str, **detail: object) -> None:
    app.metrics.connections_rejected.labels(reason).inc()
    logger.info(
        "connection rejected",
        extra=fields(reason=reason, status=status, remote=remote, **detail),
    )


# -- WebSocket upgrade ---------------------------------------------------------


def _check_upgrade(app: App, head: RequestHead) -> Accept | Refuse:
    """Everything decided before the upgrade (see :mod:`smapws._core.admission`):
    this reads the clocks and draws the jitter it is given."""
    return app.admission.decide(
        head,
        app,
        key_ok=valid_key(head.header("sec-websocket-key") or ""),
        now=trio.current_time(),
        wall=time.time(),
        jitter=random.random(),
    )


async def _accept(
    app: App,
    stream: trio.abc.Stream,
    fd: int,
    upgrade: _Upgrade,
    upgraded: list[connection.Connection | None],
) -> connection.Connection | None:
    """Complete the upgrade: the connection to serve, or None when the peer
    went away first. ``upgraded`` gets an entry once the 101 is sent, the
    connection once it exists (for the barrier in :func:`handle`)."""
    cfg = app.config
    now = trio.current_time()
    # The token's expiry on the trio clock, which the heartbeat runs on.
    expiry = now + (upgrade.expires_at - time.time())
    app.upgrade_started(upgrade.user_id)
    accepted = False
    # The head is not parsed a second time (by h11 inside wsproto): the
    # front door's checks are the handshake.
    answer = handshake_response(upgrade.key)
    try:
        # Nothing to wait for (the common case): the 101 goes out now,
        # without a deadline, if the socket takes it whole.
        waits = app.upgrade_waits(upgrade.user_id, upgrade.resume)
        sent = 0 if waits else sockio.send_now(fd, answer)
        accepted = sent == len(answer)
        if not accepted:
            with trio.CancelScope(deadline=upgrade.deadline):
                # User mode: the 101 waits for the user's subscription (at
                # most SMAPWS_REDIS_TIMEOUT, and half the handshake's time).
                left = upgrade.deadline - now
                await app.until_subscribed(upgrade.user_id, now + min(cfg.redis_timeout, left / 2))
                # A tab resuming with an id this hub does not hold: what the
                # fleet's log has after it, read before the 101.
                upgrade.resume = await app.prepare_resume(upgrade.user_id, upgrade.resume)
                await sockio.send_all(stream, fd, answer[sent:])
                accepted = True  # (not when the deadline came first)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        app.upgrade_finished(upgrade.user_id)
    if not accepted:
        _reject_log(app, "handshake_failed", 400, upgrade.remote)
        return None
    upgraded.append(None)
    conn = upgraded[-1] = connection.Connection(
        app, upgrade.user_id, expires_at=expiry, remote=upgrade.remote, now=now
    )
    return conn


# -- publish API ---------------------------------------------------------------


async def _publish(
    app: App, stream: trio.abc.Stream, head: RequestHead, body: bytes, remote: str
) -> None:
    try:
        status, result = await _publish_inner(app, stream, head, body)
    except _Refused as r:
        status, result = r.status, {"error": r.reason}
        headers = r.headers
    else:
        headers = ()
    app.metrics.publish_requests.labels(str(status)).inc()
    if status >= 400:
        logger.info(
            "publish refused", extra=fields(status=status, reason=result["error"], remote=remote)
        )
    payload = json.dumps(result).encode()
    await _send(app, stream, response(status, payload, content_type=_JSON, headers=headers))


async def _publish_inner(
    app: App, stream: trio.abc.Stream, head: RequestHead, body: bytes
) -> tuple[int, dict[str, object]]:
    cfg = app.config
    if not cfg.api_key:
        raise _Refused(404, "publish_api_disabled")
    given = head.header("authorization") or ""
    scheme, _, key = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        key.strip().encode(), cfg.api_key.encode()
    ):
        raise _Refused(401, "bad_api_key", (("WWW-Authenticate", 'Bearer realm="smapws"'),))
    if "chunked" in (head.header("transfer-encoding") or "").lower():
        raise _Refused(411, "length_required")
    declared = head.header("content-length") or ""
    # Digits only: int() would also take "+66", " 66", "6_6" and "٦٦".
    if not (declared.isascii() and declared.isdigit()) or len(declared) > 12:
        raise _Refused(411, "length_required")
    length = int(declared)
    limit = cfg.max_message_bytes + 1024  # the message plus the user_id wrapper
    if length < 0 or length > limit:
        raise _Refused(413, "too_large")
    data = bytearray(body)
    with trio.move_on_after(cfg.handshake_timeout) as scope:
        while len(data) < length:
            chunk = await stream.receive_some(_RECEIVE_BYTES)
            if not chunk:
                raise _Refused(400, "incomplete_body")
            data += chunk
    if scope.cancelled_caught:
        raise _Refused(408, "body_timeout")
    try:
        user_id, message = parse_publish_body(
            bytes(data[:length]), max_bytes=cfg.max_message_bytes, max_depth=cfg.max_json_depth
        )
    except InvalidMessage as exc:
        raise _Refused(400 if exc.reason != "too_large" else 413, exc.reason) from exc
    channel = app.prefix + user_id.encode()
    try:
        hubs = await app.broker.publish(channel, message)
    except BrokerError as exc:
        raise _Refused(503, "broker_unavailable") from exc
    # What Redis counts is subscribers, that is hubs (1 for a user with no
    # tab, 2 with two workers), not tabs; "receivers" is the old name.
    return 202, {"status": "accepted", "hubs": hubs, "receivers": hubs}
