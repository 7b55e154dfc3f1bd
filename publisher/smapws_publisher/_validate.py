"""The hub's checks of what publishers send, sans-IO: one copy, for the hub
(``smapws._core.envelope``, ``smapws._core.auth``) and for the publishers.

A message a publisher sends is one the hub delivers exactly when
:func:`check_message` accepts it; a user id is one a token can carry exactly
when :func:`valid_user_id` says so. Plain functions over bytes and strings:
no I/O, no clock, nothing but the standard library and orjson.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final, TypeGuard

import orjson

#: Default bound on one broker message, in bytes. Seed payloads are ~200 B; a
#: notification with a long text stays well under this. Larger messages are
#: dropped (and counted) rather than copied to thousands of sockets.
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024

#: Default bound on the nesting of arrays and objects in a broker message or a
#: publish body (``SMAPWS_MAX_JSON_DEPTH``). The seed's messages nest 2 deep;
#: CPython's parser raises ``RecursionError`` somewhere near 1,000, and a
#: browser's ``JSON.parse`` has a limit of its own: a bound well under both.
DEFAULT_MAX_JSON_DEPTH: Final = 32

#: User ids become part of a Redis channel name and of log lines; bound them.
MAX_USER_ID_LENGTH: Final = 256

#: Characters no user id may hold: C0 and C1 controls, DEL, and UTF-16
#: surrogates (a JSON string can carry a lone one as an escape; it has no
#: UTF-8 encoding, so it could name no channel).
_NOT_IN_USER_ID: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def valid_user_id(user: object) -> TypeGuard[str]:
    """Whether ``user`` can be a user id: a non-empty string of at most
    :data:`MAX_USER_ID_LENGTH` characters, none of them a control character
    or a surrogate. The same rule for a token's claim and a publish request."""
    return (
        isinstance(user, str)
        and 0 < len(user) <= MAX_USER_ID_LENGTH
        and _NOT_IN_USER_ID.search(user) is None
    )


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
    # (The length first: CPython prepares the 309-byte needle of ``in`` even
    # for a shorter text, 440 ns, more than half what orjson takes to parse
    # a 180-byte message.)
    if scan.count(b"[") <= max_depth and (
        len(scan) < _MAX_FINITE_DIGITS or _LONG_DIGIT_RUN not in scan
    ):
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


def check_message(
    raw: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_depth: int = DEFAULT_MAX_JSON_DEPTH,
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Check one broker message as the hub does; return ``(message, type,
    payload)``.

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
    return obj, mtype, payload
