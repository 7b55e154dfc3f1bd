"""Just enough HTTP/1.1 for the front door: parse one request head, build one
response, read cookies, judge an Origin.

The front door answers each plain HTTP request once and closes the connection
(``Connection: close``); WebSocket upgrades are handed on with the bytes already
read. So there is no keep-alive or pipelining state to track here, only a
careful parser with bounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final
from urllib.parse import SplitResult, parse_qsl, urlsplit

from smapws._errors import SmapwsError

#: Longest request head accepted. Browsers send ~1-2 KiB for an upgrade; a
#: large cookie jar can reach several KiB. Beyond this: 431.
MAX_HEAD_BYTES: Final = 16 * 1024
MAX_HEADERS: Final = 100

#: RFC 9110's ``token`` (methods, header names), and what a request target
#: may not hold (controls, space, DEL). Regular expressions: a check per
#: character in Python was a tenth of parsing a browser's head.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_IN_TARGET: Final = re.compile(r"[\x00-\x20\x7f]")


class HttpError(SmapwsError):
    """A request the front door answers with ``status`` and closes."""

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{status} {detail}".strip())


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request line and headers. Header names are lower case; repeated
    headers are joined with ``", "`` (``"; "`` for Cookie, RFC 6265 §5.4)."""

    method: str
    target: str
    path: str
    query: dict[str, str]
    version: str
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def has_token(self, name: str, token: str) -> bool:
        """Whether the comma-separated header ``name`` lists ``token``
        (case-insensitive), as for ``Connection: keep-alive, Upgrade``."""
        value = self.headers.get(name)
        if value is None:
            return False
        return any(part.strip().lower() == token for part in value.split(","))


def head_end(buffer: bytes | bytearray) -> int:
    """Index just past the blank line ending the head, or -1 if not there yet."""
    i = buffer.find(b"\r\n\r\n")
    return -1 if i < 0 else i + 4


def parse_head(data: bytes) -> RequestHead:
    """Parse a request head (request line + headers, ending in CRLF CRLF).

    Raises :class:`HttpError` 400 for anything malformed, 505 for an HTTP
    version other than 1.0/1.1.
    """
    try:
        text = data.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        # Not chained: the cause's ``object`` is the whole head, cookies included.
        raise HttpError(400, "undecodable head") from None
    lines = text.split("\r\n")
    # A head ends with an empty line; drop it (and the empty string after it).
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise HttpError(400, "empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "bad request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "bad method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise HttpError(505, "HTTP version not supported")
        raise HttpError(400, "bad request line")
    if not target.startswith("/") or _NOT_IN_TARGET.search(target):
        raise HttpError(400, "bad request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many headers")
    headers: dict[str, str] = {}
    # No expression over the values: what a peer sends there is scanned a
    # fixed number of times whatever it holds (an expression whose blanks
    # and value overlapped took 1.2 s to refuse 16 KB of blanks and a NUL).
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "bad header line")
        if "\n" in value or "\r" in value or "\x00" in value:
            raise HttpError(400, "bad header value")
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            joiner = "; " if key == "cookie" else ", "
            headers[key] = headers[key] + joiner + value
        else:
            headers[key] = value
    split = _urlsplit(target)
    if split is None:
        raise HttpError(400, "bad request target")
    query = dict(parse_qsl(split.query, keep_blank_values=True))
    return RequestHead(
        method=method,
        target=target,
        path=split.path,
        query=query,
        version=version,
        headers=headers,
    )


def _urlsplit(url: str) -> SplitResult | None:
    """``urlsplit``, or None where it raises ``ValueError``: an authority it
    refuses, as in ``//[`` or ``http://[abc]``."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def parse_cookies(header: str | None) -> dict[str, str]:
    """Parse a ``Cookie`` header into a dict; the first value of a name wins
    (the most specific path, per RFC 6265 §5.4 ordering)."""
    cookies: dict[str, str] = {}
    if not header:
        return cookies
    for pair in header.split(";"):
        name, sep, value = pair.strip().partition("=")
        if not sep or not name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies.setdefault(name.strip(), value)
    return cookies


def response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: tuple[tuple[str, str], ...] = (),
    head_only: bool = False,
) -> bytes:
    """Build a complete HTTP/1.1 response that closes the connection.

    With no ``body``, the reason phrase followed by a newline is sent, so that
    ``curl`` shows something readable.
    """
    phrase = HTTPStatus(status).phrase
    if not body and status >= 300:
        body = f"{status} {phrase}\n".encode()
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    lines.extend(f"{k}: {v}" for k, v in headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def request_scheme(head: RequestHead) -> str:
    """The scheme the browser used to reach the hub: ``https`` when the
    balancer in front says so in ``X-Forwarded-Proto`` (its first value),
    else ``http`` (the hub's own listener is plain HTTP). A browser cannot set
    this header on a WebSocket request, so a page cannot claim another
    scheme; a non-browser client could, but it could send any Origin too."""
    proto = (head.header("x-forwarded-proto") or "").split(",")[0].strip().lower()
    return "https" if proto in ("https", "wss") else "http"


def origin_allowed(
    origin: str | None,
    host: str | None,
    allowed: tuple[str, ...],
    scheme: str = "http",
) -> bool:
    """Judge a browser's ``Origin`` header.

    - No Origin (a non-browser client): allowed; such a client could send any
      Origin it liked, so refusing it would protect nothing.
    - ``allowed`` empty: same origin only: the Origin's host[:port] equals the
      request's ``Host`` header *and* its scheme is ``scheme``, the scheme the
      browser used to reach this hub (``http`` for ``ws://``, ``https`` for
      ``wss://``): a plain-HTTP page of the same host (one anybody on the path
      can write) is another origin.
    - Otherwise an entry matches when it equals the Origin (scheme://host[:port],
      case-insensitive), is ``*``, or is ``scheme://*.domain`` and the Origin's
      host is a subdomain of ``domain`` (one or more non-empty labels before it:
      ``https://.domain`` is no host).
    """
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    if not allowed:
        if host is None or origin == "null":
            return False
        split = _urlsplit(origin)
        return (
            split is not None
            and bool(split.netloc)
            and split.scheme == scheme
            and split.netloc == host.strip().lower()
        )
    for entry in allowed:
        entry = entry.lower().rstrip("/")
        if entry in ("*", origin):
            return True
        entry_scheme, sep, rest = entry.partition("://*.")
        if sep:
            o = _urlsplit(origin)
            if o is None or o.scheme != entry_scheme or not o.netloc.endswith("." + rest):
                continue
            labels = o.netloc[: -len(rest) - 1].split(".")
            if all(labels):
                return True
    return False
