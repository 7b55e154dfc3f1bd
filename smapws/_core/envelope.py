"""Broker messages: validate, stamp and encode once.

A broker message is what backend services PUBLISH to ``user_noti:{user_id}``::

    {"type": "project_progress", "payload": {"project_id": "p1", ...}}

:func:`parse` checks it and returns an :class:`Envelope` holding the text that
every connection of the user receives: the published object plus ``timestamp``
(RFC 3339, UTC, milliseconds) when the publisher gave none, already framed as a
WebSocket text frame. Anything else raises :class:`InvalidMessage` with a short,
fixed ``reason`` suitable for a metric label.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from smapws._core.auth import MAX_USER_ID_LENGTH, valid_user_id
from smapws._core.frames import text_frame

#: Default bound on one broker message, in bytes. Seed payloads are ~200 B; a
#: notification with a long text stays well under this. Larger messages are
#: dropped (and counted) rather than copied to thousands of sockets.
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024

#: Default bound on the nesting of arrays and objects in a broker message or a
#: publish body (``SMAPWS_MAX_JSON_DEPTH``). The seed's messages nest 2 deep;
#: CPython's parser raises ``RecursionError`` somewhere near 1,000, and a
#: browser's ``JSON.parse`` has a limit of its own: a bound well under both.
DEFAULT_MAX_JSON_DEPTH: Final = 32

#: Longest user id in UTF-8 bytes (4 per character at most): a longer channel
#: is refused before it is decoded.
_MAX_USER_ID_BYTES: Final = 4 * MAX_USER_ID_LENGTH

#: The reasons :class:`InvalidMessage` may carry; they are metric label values.
INVALID_REASONS: Final = (
    "too_large",
    "not_utf8",
    "not_json",
    "too_deep",
    "bad_number",
    "bad_unicode",
    "not_object",
    "bad_type",
    "bad_payload",
    "bad_channel",
    "bad_user_id",
)


class InvalidMessage(ValueError):
    """A broker message that cannot be delivered.

    ``reason`` is one of :data:`INVALID_REASONS`. The message text never
    contains the message body (it could be large, or private).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in INVALID_REASONS, reason
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


#: Message kinds, as the delivery policy (:mod:`smapws._core.outbox`) sees them.
OTHER: Final = 0  # notification, alert, unknown types: every one matters
PROGRESS: Final = 1  # project_progress: only the latest per project matters
COMPLETED: Final = 2  # project_completed: final, supersedes queued progress

_KINDS: Final = {"project_progress": PROGRESS, "project_completed": COMPLETED}


@dataclass(frozen=True, slots=True, eq=False)
class Envelope:
    """One validated message, ready to be written to any number of sockets.

    ``frame`` is the complete WebSocket text frame (the JSON text is
    :attr:`text`). ``kind`` and ``key`` (the ``payload.project_id`` of progress
    and completion messages, else None) are what the delivery policy needs;
    ``received_at`` is the trio clock reading when the message reached the
    hub, for the delivery-latency histogram. Compared by identity: two
    envelopes are the same message only if they are the same object.
    """

    type: str
    kind: int
    key: str | None
    frame: bytes
    received_at: float

    @property
    def text(self) -> bytes:
        """The JSON text the client receives (the frame without its header)."""
        n = self.frame[1] & 0x7F
        return self.frame[2 if n < 126 else 4 if n == 126 else 10 :]


_second_cache: tuple[int, str] = (-1, "")


def rfc3339_ms(epoch_seconds: float) -> str:
    """Format a POSIX timestamp as RFC 3339 UTC with milliseconds, e.g.
    ``2026-11-26T04:40:21.123Z``. (The part up to the second is computed once
    per second: this runs for every message.)"""
    global _second_cache
    whole = int(epoch_seconds // 1)
    millis = int((epoch_seconds - whole) * 1000)
    second, prefix = _second_cache
    if second != whole:
        prefix = datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second_cache = (whole, prefix)
    return f"{prefix}{millis:03d}Z"


def _no_constant(name: str) -> Any:
    raise InvalidMessage("bad_number", name)


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):  # 1e999 parses as infinity
        raise InvalidMessage("bad_number")
    return x


#: Digits of the largest integer a double holds (1.797e308): an integer
#: written with more parses as Infinity in a browser, as 1e999 does.
_MAX_FINITE_DIGITS: Final = 309
#: A run of that many digits (in a number or a string): only then are the
#: integers of a text checked one by one (a Python call per integer).
_LONG_DIGITS: Final = re.compile(rf"\d{{{_MAX_FINITE_DIGITS}}}")


def _finite_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_FINITE_DIGITS:
        raise InvalidMessage("bad_number")
    n = int(text)
    try:
        float(n)  # rounds as JSON.parse does: OverflowError where it gives Infinity
    except OverflowError:
        raise InvalidMessage("bad_number") from None
    return n


#: A JSON string (with its escapes), and the brackets outside strings. An
#: unterminated string runs to the end of the text (the parser stops there
#: anyway): were a match allowed to fail, the search would start again at the
#: next quote and rescan the rest, quadratic in escaped quotes (``[[...["\\"\\"``
#: repeated: 64 KiB took 90 s). The loop is unrolled: up to twice as fast
#: as the alternation.
_STRING: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_BRACKETS: Final = re.compile(r"[\[\]{}]")
#: An escaped UTF-16 surrogate: ``\ud800``-``\udfff``, any case.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (JSON or not)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


#: The fast path's one scan of the raw bytes (issue 16): every ASCII digit
#: becomes "0", "[" and "{" become "[", every other byte " ". In the result,
#: counting "[" bounds the depth, and a run of :data:`_MAX_FINITE_DIGITS`
#: zeros is a number too long for a double. One translate, one count, one
#: substring search, all in C: the regex ``\d{309}`` and the two counts this
#: replaces took 630 us on a 60 KB message (orjson parses it in 15), which made
#: the router the slow reader of Redis at large messages.
_SCAN_TABLE: Final = bytes(
    0x30 if 0x30 <= i <= 0x39 else 0x5B if i in (0x5B, 0x7B) else 0x20 for i in range(256)
)
_LONG_DIGIT_RUN: Final = b"0" * _MAX_FINITE_DIGITS


def _has_long_digits(raw: bytes) -> bool:
    """Whether ``raw`` holds a run of :data:`_MAX_FINITE_DIGITS` ASCII digits."""
    return _LONG_DIGIT_RUN in raw.translate(_SCAN_TABLE)


def loads_strict(raw: bytes, *, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """Parse ``raw`` as strict JSON (RFC 8259) that any browser's
    ``JSON.parse`` takes back as it was sent.

    Most messages take the fast path: few brackets (so the depth bound holds
    without a scan), no long run of digits, and orjson, which refuses all
    that this function refuses (NaN, Infinity, infinite numbers, lone
    surrogates, invalid UTF-8) and parses 5-10x faster than the standard
    library. Whatever it refuses, or cannot be judged that fast, is parsed
    again by the careful path below, which names the reason.

    Guarantees: UTF-8 text; no ``NaN``/``Infinity``, and no number that only
    parses as infinity (``1e999``, or an integer beyond a double's range);
    no lone UTF-16 surrogate (``"\ud800"``) in any string or key; arrays and
    objects nested at most ``max_depth`` deep, checked before parsing, so
    that no input reaches the parser's recursion limit. Raises
    :class:`InvalidMessage` (``not_utf8``, ``not_json``, ``too_deep``,
    ``bad_number``, ``bad_unicode``) and nothing else.
    """
    scan = raw.translate(_SCAN_TABLE)
    if scan.count(b"[") <= max_depth and _LONG_DIGIT_RUN not in scan:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # refused: the careful path says why
    return _loads_careful(raw, max_depth)


def _loads_careful(raw: bytes, max_depth: int) -> Any:
    """:func:`loads_strict` with the standard library's parser and a check
    of its own for each guarantee, so that a refusal has its reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage("not_utf8") from None
    # Counting brackets is an upper bound of the depth, at C speed: the exact
    # (slower) count runs only for messages with many brackets.
    if text.count("[") + text.count("{") > max_depth and _depth(text) > max_depth:
        raise InvalidMessage("too_deep", f"deeper than {max_depth}")
    parse_int = _finite_int if _LONG_DIGITS.search(text) else None
    try:
        obj = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=parse_int
        )
    except InvalidMessage:
        raise
    except (ValueError, RecursionError):
        raise InvalidMessage("not_json") from None
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        # Paired escapes decode to one character; a lone one stays a
        # surrogate, which no UTF-8 encoder takes.
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMessage("bad_unicode") from None
    return obj


def parse(
    raw: bytes,
    *,
    wall_time: float,
    received_at: float,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_depth: int = DEFAULT_MAX_JSON_DEPTH,
) -> Envelope:
    """Validate one broker message and build its :class:`Envelope`.

    ``wall_time`` (POSIX seconds) is used for the ``timestamp`` field when the
    publisher did not set one; ``received_at`` is stored as is.

    Raises :class:`InvalidMessage` when the message is over ``max_bytes``, is
    not strict JSON nested at most ``max_depth`` deep (:func:`loads_strict`),
    is not an object, has no non-empty string ``type`` or a ``payload`` that
    is not an object; and nothing else.
    """
    if len(raw) > max_bytes:
        raise InvalidMessage("too_large", f"{len(raw)} bytes > {max_bytes}")
    obj = loads_strict(raw, max_depth=max_depth)
    if not isinstance(obj, dict):
        raise InvalidMessage("not_object")
    mtype = obj.get("type")
    if not isinstance(mtype, str) or not mtype:
        raise InvalidMessage("bad_type")
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise InvalidMessage("bad_payload")
    kind = _KINDS.get(mtype, OTHER)
    key: str | None = None
    if kind != OTHER:
        project = payload.get("project_id")
        if isinstance(project, str | int) and not isinstance(project, bool):
            key = str(project)
        else:
            kind = OTHER  # without a project id there is nothing to conflate on
    body = raw.strip()
    if "timestamp" not in obj:
        # Splice the field in before the closing brace rather than re-encoding:
        # the publisher's bytes are kept as they are (key order, number format)
        # and the cost is one copy. ``body`` ends with "}" because it parsed as
        # an object, and it is not empty because it has a "type".
        stamp = b',"timestamp":"' + rfc3339_ms(wall_time).encode("ascii") + b'"}'
        body = body[:-1] + stamp
    return Envelope(type=mtype, kind=kind, key=key, frame=text_frame(body), received_at=received_at)


def parse_publish_body(
    body: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_depth: int = DEFAULT_MAX_JSON_DEPTH,
) -> tuple[str, bytes]:
    """Validate a publish request, ``{"user_id": "u1", "message": {...}}``,
    and return ``(user_id, message)``: the message encoded as compact UTF-8
    JSON, exactly what is then published on the user's channel.

    One validation for both ways in: the body is held to the same strict
    JSON as a broker message (one level deeper, for the wrapper), the user
    id to :func:`~smapws._core.auth.valid_user_id`, and the message is then
    checked by :func:`parse` exactly as the router will check it. Raises
    :class:`InvalidMessage` (any reason of :func:`parse`, or ``bad_user_id``)
    and nothing else.
    """
    req = loads_strict(body, max_depth=max_depth + 1)
    if not isinstance(req, dict):
        raise InvalidMessage("not_object")
    user_id = req.get("user_id")
    if not valid_user_id(user_id):
        raise InvalidMessage("bad_user_id")
    message = json.dumps(req.get("message"), separators=(",", ":"), ensure_ascii=False).encode()
    parse(message, wall_time=0.0, received_at=0.0, max_bytes=max_bytes, max_depth=max_depth)
    return user_id, message


def user_from_channel(channel: bytes, prefix: bytes) -> str:
    """Return the user id of a channel ``prefix + user_id``.

    Raises :class:`InvalidMessage` (``bad_channel``) when the channel does not
    start with ``prefix``, is not UTF-8, or names no user a token can carry
    (:func:`~smapws._core.auth.valid_user_id`: 1-256 characters, no control
    character). No tab could receive such a message, and the user id is kept
    (replay window, current state) outside what their byte bounds count: a
    channel of a megabyte would cost a megabyte per message.
    """
    user_bytes = len(channel) - len(prefix)
    if not channel.startswith(prefix) or not 0 < user_bytes <= _MAX_USER_ID_BYTES:
        raise InvalidMessage("bad_channel")
    try:
        user = channel[len(prefix) :].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage("bad_channel") from None
    if not valid_user_id(user):
        raise InvalidMessage("bad_channel")
    return user


def encode_message(mtype: str, payload: dict[str, Any]) -> bytes:
    """Encode a broker message the way publishers do (compact JSON, UTF-8)."""
    return json.dumps({"type": mtype, "payload": payload}, separators=(",", ":")).encode()


def with_id(envelope: Envelope, message_id: str) -> Envelope:
    """``envelope`` with ``"id": message_id`` as the last field of the
    delivered object (see :mod:`smapws._core.history`). A top-level ``id``
    the publisher set is replaced (the rare case: the object is re-encoded);
    otherwise the field is spliced in before the closing brace, one copy."""
    text = envelope.text
    field = b'"id":"' + message_id.encode("ascii") + b'"}'
    if b'"id"' in text:
        obj = json.loads(text)
        if "id" in obj:
            obj["id"] = message_id
            body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        else:
            body = text[:-1] + b"," + field
    else:
        body = text[:-1] + b"," + field
    return Envelope(
        type=envelope.type,
        kind=envelope.kind,
        key=envelope.key,
        frame=text_frame(body),
        received_at=envelope.received_at,
    )
