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
from datetime import UTC, datetime
from typing import Any, Final

from smapws._core.frames import text_frame

# The checks a publisher's message must pass live in smapws_publisher (one
# copy, shared with the publishers' own distribution); they are re-exported.
from smapws_publisher._validate import (
    DEFAULT_MAX_JSON_DEPTH,
    DEFAULT_MAX_MESSAGE_BYTES,
    INVALID_REASONS,
    MAX_USER_ID_LENGTH,
    InvalidMessage,
    check_message,
    loads_strict,
    valid_user_id,
)

__all__ = [
    "DEFAULT_MAX_JSON_DEPTH",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "INVALID_REASONS",
    "Envelope",
    "InvalidMessage",
    "encode_message",
    "loads_strict",
    "parse",
    "parse_publish_body",
    "rfc3339_ms",
    "user_from_channel",
]

#: Longest user id in UTF-8 bytes (4 per character at most): a longer channel
#: is refused before it is decoded.
_MAX_USER_ID_BYTES: Final = 4 * MAX_USER_ID_LENGTH

#: Message kinds, as the delivery policy (:mod:`smapws._core.outbox`) sees them.
OTHER: Final = 0  # notification, alert, unknown types: every one matters
PROGRESS: Final = 1  # project_progress: only the latest per project matters
COMPLETED: Final = 2  # project_completed: final, supersedes queued progress

_KINDS: Final = {"project_progress": PROGRESS, "project_completed": COMPLETED}


class Envelope:
    """One validated message, ready to be written to any number of sockets.

    ``frame`` is the complete WebSocket text frame (the JSON text is
    :attr:`text`). ``kind`` and ``key`` (the ``payload.project_id`` of progress
    and completion messages, else None) are what the delivery policy needs;
    ``received_at`` is the trio clock reading when the message reached the
    hub, for the delivery-latency histogram. Compared by identity: two
    envelopes are the same message only if they are the same object.

    Immutable by type (``Final``: mypy refuses an assignment), not at run
    time: a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``, 0.9 µs an envelope against 0.2, and the router
    builds one per message.
    """

    __slots__ = ("frame", "key", "kind", "received_at", "type")

    type: Final[str]
    kind: Final[int]
    key: Final[str | None]
    frame: Final[bytes]
    received_at: Final[float]

    def __init__(
        self, type: str, kind: int, key: str | None, frame: bytes, received_at: float
    ) -> None:
        self.type = type
        self.kind = kind
        self.key = key
        self.frame = frame
        self.received_at = received_at

    def __repr__(self) -> str:
        return (
            f"Envelope(type={self.type!r}, kind={self.kind}, key={self.key!r}, "
            f"frame=<{len(self.frame)} bytes>, received_at={self.received_at})"
        )

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


_stamp_cache: tuple[float, bytes] = (math.nan, b"")


def _timestamp_field(wall_time: float) -> bytes:
    """``,"timestamp":"<rfc3339_ms(wall_time)>"``. The router stamps a whole
    batch of messages with one wall time: the last one's field is kept."""
    global _stamp_cache
    at, field = _stamp_cache
    if at != wall_time:
        field = b',"timestamp":"' + rfc3339_ms(wall_time).encode("ascii") + b'"'
        _stamp_cache = (wall_time, field)
    return field


def parse(
    raw: bytes,
    *,
    wall_time: float,
    received_at: float,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_depth: int = DEFAULT_MAX_JSON_DEPTH,
    message_id: str | None = None,
) -> Envelope:
    """Validate one broker message and build its :class:`Envelope`, framed
    once.

    ``wall_time`` (POSIX seconds) is used for the ``timestamp`` field when the
    publisher did not set one; ``received_at`` is stored as is. With
    ``message_id`` (the chain id of :mod:`smapws._core.fleet`, 16 hex
    characters), ``"id": message_id`` is the last field of the delivered
    object: spliced in before the closing brace, after the timestamp; a
    top-level ``id`` the publisher set is replaced instead (the rare case:
    the object is re-encoded).

    Raises :class:`InvalidMessage` when the message is over ``max_bytes``, is
    not strict JSON nested at most ``max_depth`` deep (:func:`loads_strict`),
    is not an object, has no non-empty string ``type`` or a ``payload`` that
    is not an object; and nothing else.
    """
    obj, mtype, payload = check_message(raw, max_bytes=max_bytes, max_depth=max_depth)
    kind = _KINDS.get(mtype, OTHER)
    key: str | None = None
    if kind != OTHER:
        project = payload.get("project_id")
        if isinstance(project, (str, int)) and not isinstance(project, bool):
            key = str(project)
        else:
            kind = OTHER  # without a project id there is nothing to conflate on
    body = raw.strip()
    # The fields are spliced in before the closing brace rather than the
    # object re-encoded: the publisher's bytes are kept as they are (key
    # order, number format) and the cost is one copy. ``body`` ends with "}"
    # because it parsed as an object, and it is not empty because it has a
    # "type".
    stamp = b"" if "timestamp" in obj else _timestamp_field(wall_time)
    if message_id is None:
        text = (body[:-1] + stamp + b"}") if stamp else body
    elif "id" in obj:
        # (The key as parsed, not its bytes: ``"\\u0069d"`` is an ``id`` too,
        # and a browser keeps the last of two.)
        text = _replace_id(body[:-1] + stamp + b"}", message_id)
    else:
        text = b"".join((body[:-1], stamp, b',"id":"', message_id.encode("ascii"), b'"}'))
    return Envelope(mtype, kind, key, text_frame(text), received_at)


def _replace_id(text: bytes, message_id: str) -> bytes:
    """``text`` (a JSON object with a top-level ``id``) re-encoded with
    ``message_id`` as its ``id``, in the field's place."""
    obj = json.loads(text)
    obj["id"] = message_id
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


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
    except UnicodeDecodeError as exc:  # quotes a byte of the channel name, no secret
        raise InvalidMessage("bad_channel") from exc
    if not valid_user_id(user):
        raise InvalidMessage("bad_channel")
    return user


def encode_message(mtype: str, payload: dict[str, Any]) -> bytes:
    """Encode a broker message the way publishers do (compact JSON, UTF-8)."""
    return json.dumps({"type": mtype, "payload": payload}, separators=(",", ":")).encode()
