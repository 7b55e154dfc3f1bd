"""``smapws listen``: open a tab as a user and print what the hub sends.

For the integration guide's "frontend connected but not receiving updates":
an operator opens a connection the way a browser does (the ``access_token``
cookie) from the hub's own host and sees, frame by frame, what that user
receives. The client side is trio-websocket's public API.

Every frame is printed on standard output as one JSON line (the hub's
messages are JSON objects; anything else is wrapped as ``{"text": ...}`` or
``{"binary": <length>}``). Status lines (opened, closed with its code) go to
standard error. The token is never printed.
"""

from __future__ import annotations

import json
import re
import ssl
import sys
from typing import IO, Final
from urllib.parse import quote, urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from smapws._core.closecodes import CloseCode

#: Close codes after which ``listen`` exits 0: a normal close, or the hub
#: going away (a drain).
NORMAL_CLOSES: Final = (CloseCode.NORMAL, CloseCode.GOING_AWAY)

#: Largest frame accepted (trio-websocket's default is 1 MiB; a hub's frames
#: are bounded by SMAPWS_MAX_MESSAGE_BYTES, 64 KiB by default, and nothing a
#: hub may send should end the listener).
MAX_FRAME: Final = 16 * 1024 * 1024

#: What a cookie's value may hold (RFC 6265 §4.1.1, ``cookie-octet``): no
#: whitespace, control character, DQUOTE, comma, semicolon or backslash.
_COOKIE_VALUE: Final = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")


def with_since(url: str, since: str | None) -> str:
    if not since:
        return url
    return f"{url}{'&' if '?' in url else '?'}since={quote(since)}"


def frame_line(message: str | bytes) -> str:
    """One frame as one line of JSON."""
    if isinstance(message, bytes):
        return json.dumps({"binary": len(message)})
    try:
        return json.dumps(json.loads(message), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        return json.dumps({"text": message}, ensure_ascii=False)


async def listen(
    url: str,
    token: str,
    *,
    since: str | None = None,
    count: int | None = None,
    connect_timeout: float = 10.0,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    """Connect to ``url`` (``ws://`` or ``wss://``) with ``token`` as the
    ``access_token`` cookie and print every frame until the hub closes (or
    ``count`` frames). Returns the exit status: 0 after ``count`` frames or
    a normal close (1000, 1001), 1 when the upgrade is refused or fails, or
    on any other close, 2 for a URL that is not ``ws://`` or ``wss://`` or
    a token a cookie cannot carry (whitespace around it is dropped)."""
    target = with_since(url, since)
    try:
        parts = urlsplit(target)
        # (.port raises for a port that is no number or out of range.)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
    except ValueError:  # that, or a broken IPv6 literal ("ws://[::1/ws")
        parts = None
    if parts is None or parts.scheme not in ("ws", "wss") or not parts.hostname:
        print(f"smapws: listen: expected a ws:// or wss:// URL, not {url!r}", file=err)
        return 2
    # A JWT has no whitespace: what surrounds it came with it (a file with
    # CRLF line ends, a paste). Anything else a cookie cannot carry is
    # refused here, without the token: h11 would refuse the header with the
    # whole value in its message, a traceback's last line.
    token = token.strip()
    if not _COOKIE_VALUE.fullmatch(token):
        print(
            "smapws: listen: the token holds characters a cookie cannot carry "
            "(whitespace, control characters, '\"', ',', ';' or '\\'); not printed",
            file=err,
        )
        return 2
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = [(b"Cookie", f"access_token={token}".encode())]
    # The stream is ours (opened here, closed in the finally): trio-websocket's
    # open_websocket_url leaves the socket of a refused upgrade open.
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
    status = 1
    try:
        async with trio.open_nursery() as nursery:  # where trio-websocket reads
            with trio.fail_after(connect_timeout):
                stream = await trio.open_tcp_stream(parts.hostname, port)
                if parts.scheme == "wss":
                    stream = trio.SSLStream(
                        stream, ssl.create_default_context(), server_hostname=parts.hostname
                    )
                    # Here, not in trio-websocket's reader task, whose failure
                    # ("certificate verify failed") left the upgrade waiting
                    # out connect_timeout, reported as TooSlowError.
                    await stream.do_handshake()
                ws = await wrap_client_stream(
                    nursery,
                    stream,
                    parts.netloc,
                    resource,
                    extra_headers=headers,
                    max_message_size=MAX_FRAME,
                )
            try:
                status = await _print_frames(ws, target, count, out, err)
            finally:
                await ws.aclose()
    except* ConnectionRejected as group:
        exc = group.exceptions[0]
        assert isinstance(exc, ConnectionRejected)
        body = (exc.body or b"")[:200].decode("utf-8", "replace").strip()
        print(
            f"smapws: listen: the hub refused the upgrade: HTTP {exc.status_code}"
            + (f" ({body})" if body else ""),
            file=err,
        )
    except* (HandshakeError, OSError, trio.BrokenResourceError, trio.TooSlowError) as group:
        failure = group.exceptions[0]
        # The type, and what it says (trio's "all attempts to connect to
        # 127.0.0.1:1 failed", the resolver's "Name or service not known";
        # a failed TLS handshake's cause, "certificate verify failed"): none
        # of these carries a request header, so no token.
        why = str(failure) or str(failure.__cause__ or "")
        why = " ".join(why.split())[:200]
        name = type(failure).__name__ + (f": {why}" if why else "")
        print(f"smapws: listen: cannot connect to {url}: {name}", file=err)
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
    return status


async def _print_frames(
    ws: WebSocketConnection, target: str, count: int | None, out: IO[str], err: IO[str]
) -> int:
    print(json.dumps({"event": "open", "url": target}), file=err, flush=True)
    received = 0
    while count is None or received < count:
        try:
            message = await ws.get_message()
        except ConnectionClosed as exc:
            code = None if exc.reason is None else exc.reason.code
            why = None if exc.reason is None else exc.reason.reason
            print(
                json.dumps({"event": "closed", "code": code, "reason": why}), file=err, flush=True
            )
            return 0 if code in NORMAL_CLOSES else 1
        print(frame_line(message), file=out, flush=True)
        received += 1
    return 0
