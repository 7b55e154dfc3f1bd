"""Fuzzing the parsers at every way in, from the outside (issue 8, point 3).

Property tests (hypothesis): whatever bytes or strings come in, each entry
point raises only its documented error (with a documented reason or status),
and what it accepts has the documented guarantees, checked independently of
the code under test:

- broker messages and publish bodies (:mod:`smapws._core.envelope`):
  ``InvalidMessage`` with a reason of ``INVALID_REASONS``; an accepted
  message is strict, browser-safe JSON (valid UTF-8, no NaN/Infinity, no lone
  surrogate) nested at most ``max_depth`` deep;
- request heads, cookies, Origin (:mod:`smapws._core.http`): ``HttpError``
  400/431/505 only; the others never raise;
- tokens (:mod:`smapws._core.auth`): ``AuthError`` with a documented reason,
  for garbage strings, mutated real tokens, and tokens correctly signed over
  arbitrary header and payload bytes.

WebSocket frames are fuzzed in ``test_fuzz_frames.py``, a live hub in
``test_fuzz_live.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from smapws._core.admission import Accept, Refuse
from smapws._core.auth import (
    MAX_USER_ID_LENGTH,
    AuthConfig,
    AuthError,
    VerifiedTokens,
    mint,
    valid_user_id,
    verify,
)
from smapws._core.envelope import (
    DEFAULT_MAX_JSON_DEPTH,
    DEFAULT_MAX_MESSAGE_BYTES,
    INVALID_REASONS,
    InvalidMessage,
    loads_strict,
    parse,
    parse_publish_body,
    rfc3339_ms,
    user_from_channel,
)
from smapws._core.frames import text_frame
from smapws._core.http import (
    MAX_HEAD_BYTES,
    HttpError,
    head_end,
    origin_allowed,
    parse_cookies,
    parse_head,
)

from .conftest import SECRET, parse_frames

WALL: Final = 1_795_000_000.123
FUZZ: Final = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# -- an independent judge of "strict, browser-safe JSON" --------------------------


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"non-standard constant {name} in accepted JSON")


def strict_json(text: bytes) -> Any:
    """What a browser's ``JSON.parse`` would make of ``text``, or an
    AssertionError: UTF-8 (strict), RFC 8259 JSON without NaN/Infinity, and
    finite numbers."""
    return json.loads(
        text.decode("utf-8"),
        parse_constant=_refuse_constant,
        parse_float=lambda s: _finite(float(s)),
        parse_int=_finite_int,
    )


def as_browser(obj: Any) -> Any:
    """``obj`` with every integer beyond 64 bits as the double JSON.parse
    makes of it."""
    if isinstance(obj, dict):
        return {k: as_browser(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [as_browser(v) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool) and _beyond_64_bits(obj):
        return float(obj)
    return obj


def _beyond_64_bits(n: int) -> bool:
    """Whether the fast path (orjson), as JSON.parse, reads ``n`` as a double."""
    return not -(2**63) <= n < 2**64


def _finite(x: float) -> float:
    assert math.isfinite(x), "a number that parses as infinity"
    return x


def _finite_int(digits: str) -> int | float:
    n = int(digits)
    try:
        float(n)  # JSON.parse rounds the same way, to Infinity where this overflows
    except OverflowError:
        raise AssertionError("an integer that parses as infinity") from None
    return float(n) if _beyond_64_bits(n) else n


def depth(obj: Any) -> int:
    """Nesting of arrays and objects; a bare object or array is 1 deep."""
    if isinstance(obj, dict):
        return 1 + max((depth(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((depth(v) for v in obj), default=0)
    return 0


def strings(obj: Any) -> list[str]:
    """Every string of ``obj``, keys included."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (k, *strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return []


def has_lone_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


# -- nasty JSON -------------------------------------------------------------------

#: Fragments that have broken JSON parsers, or that a strict one must refuse.
NASTY_TOKENS: Final = [
    b"[", b"]", b"{", b"}", b",", b":", b'"', b"\\", b"\\\\", b'\\"', b"\\u", b"\\ud800",
    b"\\udc00", b"\\uD83D\\uDE00", b"\\ud83d\\ude00", b"\\ud83d", b"\\\\ud800", b"\\\\\\ud800",
    b"\\uDFFF", b"\\u0000", b"\\x41", b"\\'", b"NaN", b"-NaN", b"Infinity", b"-Infinity",
    b"1e999", b"-1e999", b"1E+400", b"0.0e-99999", b"-0", b"01", b"0x10", b"1.", b".5",
    b"9" * 4301, b"1" + b"0" * 400, b"1." + b"1" * 5000, b"true", b"false", b"null",
    b"tru", b'"type"', b'"payload"', b'"timestamp"', b'"project_id"', b'"project_progress"',
    b"\xef\xbb\xbf", b" ", b"\t", b"\n", b"\r", b"\x0c", b"\x0b", b"\x00", b"\x1f",
    b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x80\xa8", b"\xc3",
    b"\xf0\x9f\x98\x80", b"/*", b"*/", b"//",
]  # fmt: skip

VALID_MESSAGES: Final = [
    b'{"type":"notification","payload":{"title":"Hi","body":"x"}}',
    b'{"type": "project_progress", "payload": {"project_id": "p1", "done": 15, "total": 40}}',
    b'{"type":"project_completed","payload":{"project_id":7},"timestamp":"2026-01-01T00:00:00Z"}',
    b'  {"payload":{"a":[1,2.5,-0,{"b":null}],"s":"\\ud83d\\ude00\\n\\\\u0041"},'
    b'"type":"alert"}\r\n',
    b'{"type":"x","payload":{},"type":"y"}',
]

nasty_tokens = st.lists(st.sampled_from(NASTY_TOKENS), max_size=40).map(b"".join)


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    """Arrays and objects nested around the depth bound, up to far beyond
    the parser's recursion limit, closed or not, inside a valid envelope
    or bare."""
    n = draw(st.one_of(st.integers(0, 40), st.integers(0, 3000)))
    opener = draw(st.sampled_from([b"[", b'{"a":', b'[{"k":', b"[1,"]))
    closer = {b"[": b"]", b'{"a":': b"}", b'[{"k":': b"}]", b"[1,": b"]"}[opener]
    core = draw(st.sampled_from([b"0", b"NaN", b'"\\ud800"', b"[]", b"{}", b"1e999", b""]))
    closing = closer * draw(st.sampled_from([n, max(n - 1, 0), n + 1]))
    body = opener * n + core + closing
    if draw(st.booleans()):
        return b'{"type":"notification","payload":{"deep":' + body + b"}}"
    return body


@st.composite
def json_value(draw: st.DrawFn, *, nasty: bool) -> Any:
    """A Python value to encode as JSON: with ``nasty``, NaN, infinities,
    integers beyond a double and lone surrogates are in the mix."""
    text = st.text(
        st.characters(codec="utf-8")
        | (st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) if nasty else st.nothing()),
        max_size=12,
    )
    floats = st.floats(allow_nan=nasty, allow_infinity=nasty)
    # Integers beyond a double's range parse as Infinity in a browser.
    huge = st.integers(10**307, 10**310).map(lambda n: -n if n % 2 else n)
    leaves = (
        st.none()
        | st.booleans()
        | st.integers()
        | floats
        | text
        | (huge if nasty else st.nothing())
    )
    return draw(
        st.recursive(
            leaves,
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
            max_leaves=20,
        )
    )


@st.composite
def encoded_messages(draw: st.DrawFn) -> bytes:
    """A message object (sometimes with a wrong type or payload) encoded the
    ways a publisher might: ASCII-escaped, raw UTF-8, or with lone surrogates
    written as CESU/WTF-8 bytes (``surrogatepass``)."""
    payload = draw(json_value(nasty=True))
    obj: Any = {"type": draw(st.sampled_from(["notification", "project_progress", "", 5]))}
    obj["payload"] = payload if draw(st.booleans()) else {"v": payload}
    if draw(st.booleans()):
        obj = draw(st.sampled_from([obj, [obj], payload]))
    ascii_only = draw(st.booleans())
    text = json.dumps(obj, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], tokens: list[bytes]) -> bytes:
    """A seed input with a few random edits: insert a nasty token, delete or
    duplicate a range, flip a byte, truncate."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(data)))
        j = draw(st.integers(i, min(len(data), i + 16)))
        op = draw(st.sampled_from(["insert", "delete", "dup", "flip", "truncate"]))
        if op == "insert":
            data[i:i] = draw(st.sampled_from(tokens))
        elif op == "delete":
            del data[i:j]
        elif op == "dup":
            data[i:i] = data[i:j] * draw(st.integers(1, 50))
        elif op == "flip" and i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
    return bytes(data)


broker_messages = st.one_of(
    st.binary(max_size=200),
    nasty_tokens,
    deep_nesting(),
    encoded_messages(),
    mutated(VALID_MESSAGES, NASTY_TOKENS),
    st.sampled_from(VALID_MESSAGES),
)


# -- envelope -----------------------------------------------------------------


def check_envelope_text(text: bytes, max_depth: int) -> Any:
    """The guarantees of an accepted broker message, judged independently."""
    obj = strict_json(text)
    assert isinstance(obj, dict)
    assert isinstance(obj["type"], str) and obj["type"]
    assert isinstance(obj["payload"], dict)
    assert "timestamp" in obj
    assert depth(obj) <= max_depth
    assert not any(has_lone_surrogate(s) for s in strings(obj))
    return obj


@FUZZ
@given(raw=broker_messages, max_depth=st.sampled_from([1, 2, 3, 8, DEFAULT_MAX_JSON_DEPTH]))
# Found by the clean-clone run of 2026-12-04: an integer below -2**63 reads as
# a double (as JSON.parse reads it) on the delivered side, so the published
# side must be read that way too.
@example(raw=b'{"type": "notification", "payload": {"v": [-9223372039002259457]}}', max_depth=3)
def test_parse_raises_only_invalid_message_and_accepts_only_browser_safe_json(
    raw: bytes, max_depth: int
) -> None:
    try:
        env = parse(raw, wall_time=WALL, received_at=1.0, max_depth=max_depth)
    except InvalidMessage as exc:
        assert exc.reason in INVALID_REASONS
        return
    obj = check_envelope_text(env.text, max_depth)
    assert env.type == obj["type"]
    assert env.frame == text_frame(env.text)
    assert parse_frames(env.frame) == [(0x1, env.text)]
    # The publisher's object is what is sent (a duplicate key taken last, as
    # JSON.parse does), plus the timestamp when it had none; numbers as a
    # browser reads them (an integer beyond 64 bits is a double).
    sent = as_browser(json.loads(raw))
    assert {k: v for k, v in obj.items() if k != "timestamp" or "timestamp" in sent} == sent


@FUZZ
@example(raw=b'{"type": "notification", "payload": {"v": [1%s]}}' % (b"2" * 308), max_depth=3)
@given(raw=broker_messages, max_depth=st.integers(1, 40))
def test_loads_strict_raises_only_its_reasons(raw: bytes, max_depth: int) -> None:
    try:
        obj = loads_strict(raw, max_depth=max_depth)
    except InvalidMessage as exc:
        assert exc.reason in ("not_utf8", "not_json", "too_deep", "bad_number", "bad_unicode")
        return
    # Whatever it takes, a browser takes back as it was sent. (An integer
    # beyond 64 bits is a double to a browser; the hub forwards the bytes,
    # so which of the two the validator held does not reach a client:
    # hypothesis found a 309-digit one that the fallback kept as an int.)
    assert as_browser(strict_json(raw)) == as_browser(obj)
    assert depth(obj) <= max_depth
    assert not any(has_lone_surrogate(s) for s in strings(obj))


@settings(FUZZ, max_examples=50)
@example(payload=-9223372036854775809, mtype="0", stamp=False)
@given(
    payload=json_value(nasty=False),
    mtype=st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
    stamp=st.booleans(),
)
def test_every_valid_message_within_bounds_is_accepted_unchanged(
    payload: Any, mtype: str, stamp: bool
) -> None:
    obj: dict[str, Any] = {"type": mtype, "payload": {"data": payload}}
    if stamp:
        obj["timestamp"] = "2026-01-01T00:00:00.000Z"
    raw = json.dumps(obj, ensure_ascii=False).encode()
    assume(len(raw) <= DEFAULT_MAX_MESSAGE_BYTES and depth(obj) <= DEFAULT_MAX_JSON_DEPTH)
    env = parse(raw, wall_time=WALL, received_at=0.0)
    got = check_envelope_text(env.text, DEFAULT_MAX_JSON_DEPTH)
    # Both sides read by the same (browser-like) parser: an integer beyond
    # 64 bits is a double to it, as to JSON.parse, whatever Python's json
    # made of it (hypothesis found -9223372036854775809).
    assert got["payload"] == strict_json(json.dumps(obj["payload"]).encode())
    assert got["timestamp"] == (obj["timestamp"] if stamp else rfc3339_ms(WALL))


@FUZZ
@given(
    body=st.one_of(
        broker_messages.map(lambda m: b'{"user_id":"u1","message":' + m + b"}"),
        st.tuples(
            st.one_of(
                st.text(max_size=20),
                st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1),
                st.integers(),
                st.none(),
                st.just("a" * (MAX_USER_ID_LENGTH + 1)),
            ),
            json_value(nasty=True),
        ).map(
            lambda um: json.dumps({"user_id": um[0], "message": um[1]}).encode(
                "utf-8", "surrogatepass"
            )
        ),
        mutated([b'{"user_id":"u1","message":' + m + b"}" for m in VALID_MESSAGES], NASTY_TOKENS),
        st.binary(max_size=100),
    )
)
def test_publish_body_raises_only_invalid_message(body: bytes) -> None:
    try:
        user_id, message = parse_publish_body(body)
    except InvalidMessage as exc:
        assert exc.reason in INVALID_REASONS
        return
    assert valid_user_id(user_id)
    assert user_id.encode("utf-8")  # it can name a channel
    assert strict_json(body)["user_id"] == user_id
    # What is published is what the router will accept.
    env = parse(message, wall_time=WALL, received_at=0.0)
    check_envelope_text(env.text, DEFAULT_MAX_JSON_DEPTH)


@FUZZ
@given(
    channel=st.one_of(
        st.binary(max_size=40),
        st.binary(max_size=40).map(lambda b: b"user_noti:" + b),
        st.text(max_size=20).map(lambda s: ("user_noti:" + s).encode()),
    )
)
def test_user_from_channel_raises_only_bad_channel(channel: bytes) -> None:
    try:
        user = user_from_channel(channel, b"user_noti:")
    except InvalidMessage as exc:
        assert exc.reason == "bad_channel"
        return
    assert user and b"user_noti:" + user.encode("utf-8") == channel


# -- HTTP ---------------------------------------------------------------------

HEAD_SEEDS: Final = [
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /ws?token=abc&x=%ff%00 HTTP/1.1\r\nHost: h:80\r\nUpgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: http://h:80\r\nCookie: a=1; access_token=x\r\n"
    b"Cookie: b=2\r\n\r\n",
    b"POST /api/publish HTTP/1.0\r\nAuthorization: Bearer k\r\nContent-Length: 12\r\n\r\n",
]
HTTP_TOKENS: Final = [
    b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\x7f", b"\xff", b"//", b"//[",
    b"//[::1]", b"//[v1.x]", b"//[abc]", b"//h\xbc", b"%", b"%zz", b"?", b"#", b"&&=",
    b"HTTP/2.0", b"HTTP/1.1", b"HTTPS/1.1", b"Cookie: ", b"Host: ", b"a" * 2000,
    b"X: y\r\n" * 60, b"\r\n\r\n", b"Content-Length: ", b"Transfer-Encoding: ",
]  # fmt: skip

#: Pieces of a request target (after "/", "//" or "//[": an authority).
TARGET_TOKENS: Final = [
    b"/", b"[", b"]", b"::1", b"abc", b"v1.x", b"\xbc", b"%", b"%2F", b"?", b"#", b"@", b":",
    b"80", b"\x00", b"\xff", b"..",
]  # fmt: skip

heads = st.one_of(
    st.binary(max_size=300),
    mutated(HEAD_SEEDS, HTTP_TOKENS),
    st.lists(st.sampled_from(HTTP_TOKENS + HEAD_SEEDS), max_size=12).map(b"".join),
    st.binary(max_size=100).map(lambda b: b"GET /" + b + b" HTTP/1.1\r\n\r\n"),
    st.tuples(
        st.sampled_from([b"/", b"//", b"//["]), st.lists(st.sampled_from(TARGET_TOKENS), max_size=6)
    ).map(lambda t: b"GET " + t[0] + b"".join(t[1]) + b" HTTP/1.1\r\nHost: h\r\n\r\n"),
    st.text(max_size=40).map(lambda t: f"GET {t} HTTP/1.1\r\n\r\n".encode("utf-8", "replace")),
)


#: The seeds' upgrade with a header more (a body announced, in any spelling
#: and value): heads that reach the admission's later checks.
upgrade_heads = st.tuples(
    st.sampled_from([b"Content-Length", b"content-length", b"Transfer-Encoding", b"X"]),
    st.binary(max_size=16).filter(lambda v: b"\r" not in v and b"\n" not in v),
).map(lambda t: HEAD_SEEDS[1][:-2] + t[0] + b": " + t[1] + b"\r\n\r\n")


@FUZZ
@given(data=st.one_of(heads, upgrade_heads))
def test_the_upgrade_decision_answers_every_head_that_parses(data: bytes) -> None:
    """Whatever head the parser accepts (a body announced or not, any
    headers), the admission decides, accept or refuse, and raises nothing."""
    from .test_core_admission import Load, admission

    try:
        head = parse_head(data)
    except HttpError:
        return
    decision = admission().decide(head, Load(), key_ok=True, now=0.0, wall=time.time(), jitter=0.5)
    assert isinstance(decision, Accept | Refuse)


@FUZZ
@given(data=heads)
def test_parse_head_raises_only_http_errors(data: bytes) -> None:
    end = head_end(data)
    assert end == -1 or (data[:end].endswith(b"\r\n\r\n") and b"\r\n\r\n" not in data[: end - 1])
    try:
        head = parse_head(data)
    except HttpError as exc:
        assert exc.status in (400, 431, 505), exc
        return
    assert head.version in ("HTTP/1.0", "HTTP/1.1")
    assert head.method and " " not in head.method
    assert head.target.startswith("/")
    for name, value in head.headers.items():
        assert name == name.lower() and name
        assert not any(c in value for c in "\r\n\x00")
    if len(data) <= MAX_HEAD_BYTES:
        assert len(head.headers) <= 100


#: RFC 9110's tchar, spelled out: what parse_head must take in a method or a
#: header name, and nothing else (it checks with a regular expression).
TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_names = st.text(
    alphabet=st.one_of(
        st.sampled_from(sorted(TCHARS)),
        st.characters(max_codepoint=0x2FF, blacklist_characters="\r\n:"),
    ),
    max_size=12,
)


_values = st.text(
    alphabet=st.one_of(st.sampled_from(" \t\x00a:"), st.characters(max_codepoint=0xFF)), max_size=12
).filter(lambda v: "\r" not in v and "\n" not in v)


@FUZZ
@given(method=_names, name=_names, target=_names, value=_values)
@example(method="\xe9", name="a", target="", value="v")  # a letter, not a tchar
@example(method="GET", name="\xb2", target="", value="v")  # a digit to Unicode, not a tchar
@example(method="GET", name="a", target="\x7f", value="v")
@example(method="GET", name="a", target="\x85", value="v")  # (not a control for the target rule)
@example(method="GET", name="a", target="", value=" \t v \t ")
@example(method="GET", name="a", target="", value="v\x00")
def test_methods_names_and_targets_are_checked_character_by_character(
    method: str, name: str, target: str, value: str
) -> None:
    """A head is taken iff its method and header name are non-empty runs of
    tchars, its target holds no control, space or DEL and the value no NUL
    (the rules as written per character; parse_head checks them with
    expressions); the value is kept without its leading and trailing blanks."""
    data = f"{method} /{target} HTTP/1.1\r\n{name}:{value}\r\nHost: h\r\n\r\n".encode(
        "latin-1", "replace"
    )
    text = data.decode("latin-1")
    method, target = text.split(" ")[0], text.split(" ")[1]
    name = text.split("\r\n")[1].partition(":")[0]
    expected = (
        bool(method) and set(method) <= TCHARS
        and bool(name) and set(name) <= TCHARS
        and not any(c <= " " or c == "\x7f" for c in target)
        and "\x00" not in value
        and text.split("\r\n")[0].count(" ") == 2  # (the request line in three parts)
    )  # fmt: skip
    try:
        head = parse_head(data)
    except HttpError as exc:
        assert not expected, exc
    else:
        assert expected
        if name.lower() != "host":
            assert head.headers[name.lower()] == value.strip(" \t")


@pytest.mark.parametrize("target", [b"//[", b"//[abc]/", b"//[::1/x", b"//[1.2.3.4]"])
def test_a_target_urlsplit_refuses_is_a_400(target: bytes) -> None:
    """urlsplit raises ValueError for these authorities: it left parse_head
    (a 500 from the connection's barrier, an internal error)."""
    with pytest.raises(HttpError) as err:
        parse_head(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert err.value.status == 400


@pytest.mark.parametrize("origin", ["http://[", "http://[abc]", "https://[::1"])
@pytest.mark.parametrize("allowed", [(), ("https://*.example.com",)])
def test_an_origin_urlsplit_refuses_is_not_allowed(origin: str, allowed: tuple[str, ...]) -> None:
    """Any browser-less client can send one: it was a 500 and an internal
    error for each upgrade."""
    assert origin_allowed(origin, "h", allowed) is False


@FUZZ
@given(
    header=st.one_of(st.none(), st.text(max_size=60), st.binary(max_size=60).map(
        lambda b: b.decode("latin-1")
    )),
    pairs=st.lists(
        st.tuples(
            st.text("abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=8),
            st.text("abcXYZ0123456789-_.~+/=", max_size=12),
        ),
        max_size=5,
    ),
)  # fmt: skip
def test_parse_cookies_never_raises_and_reads_what_browsers_send(
    header: str | None, pairs: list[tuple[str, str]]
) -> None:
    cookies = parse_cookies(header)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in cookies.items())
    sent = "; ".join(f"{k}={v}" for k, v in pairs)
    first: dict[str, str] = {}
    for k, v in pairs:
        first.setdefault(k, v)
    assert parse_cookies(sent) == first


@FUZZ
@given(
    origin=st.one_of(
        st.none(),
        st.text(max_size=40),
        st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
        st.lists(st.sampled_from(["http://", "https://", "[", "]", "::1", "h", ".", ":",
                                  "80", "@", "/", "\xbc", "%", "null", "*"]),
                 max_size=8).map("".join),
    ),
    host=st.one_of(st.none(), st.sampled_from(["h", "h:80", "[::1]:1", ""]), st.text(max_size=10)),
    allowed=st.lists(
        st.sampled_from(["*", "http://h", "https://*.example.com", "http://[::1]:1", "x://*."]),
        max_size=3,
    ).map(tuple),
)  # fmt: skip
def test_origin_allowed_only_answers_yes_or_no(
    origin: str | None, host: str | None, allowed: tuple[str, ...]
) -> None:
    assert origin_allowed(origin, host, allowed) in (True, False)


# -- tokens ------------------------------------------------------------------------

AUTH_REASONS: Final = frozenset({
    "missing_token", "malformed", "bad_signature", "bad_algorithm", "expired",
    "not_yet_valid", "bad_issuer", "bad_audience", "missing_claim", "bad_user",
})  # fmt: skip
NOW: Final = 1_800_000_000.0
#: Long enough for HS512 (PyJWT warns below 64 bytes, and warnings are errors here).
KEY: Final = SECRET * 2
CONFIGS: Final = [
    AuthConfig(algorithms=("HS256",), key=KEY),
    AuthConfig(algorithms=("HS256", "HS512"), key=KEY, issuer="smap", audience="hub"),
    AuthConfig(algorithms=("HS384",), key=KEY, user_claim="user_id", leeway=30),
]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_raw(header: bytes, payload: bytes, alg: str = "HS256") -> str:
    """A token whose signature is right, over header and payload bytes that
    may be anything: what only a holder of the key can make."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    sig = hmac.new(KEY.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(sig)}"


claim_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(10**300, 10**400), st.floats(),
    st.text(max_size=10), st.just("u\x00"), st.just("\ud800"), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([NOW - 10, NOW + 10, NOW + 3600, "smap", "hub", ["hub", "x"]]),
)  # fmt: skip


@st.composite
def signed_tokens(draw: st.DrawFn) -> str:
    """Tokens signed with the right key over fuzzed headers and claims."""
    alg = draw(st.sampled_from(["HS256", "HS384", "HS512"]))
    header: Any = draw(
        st.sampled_from(
            [
                {"alg": alg, "typ": "JWT"},
                {"alg": alg, "crit": ["x"]},
                {"alg": "none"},
                {"alg": ["HS256"]},
                {"alg": alg, "b64": False},
                {"alg": alg, "kid": {"a": 1}},
                [alg],
                "x",
            ]
        )
    )
    claims = draw(
        st.dictionaries(
            st.sampled_from(["sub", "user_id", "exp", "nbf", "iat", "iss", "aud", "jti"]),
            claim_values,
        )
    )
    header_bytes = json.dumps(header).encode()
    payload_bytes = json.dumps(claims, allow_nan=True).encode("utf-8", "surrogatepass")
    payload_bytes = draw(st.sampled_from([payload_bytes, b"[]", b"\xff", b"{", b'{"exp":1e999}']))
    return sign_raw(header_bytes, payload_bytes, alg)


def real_tokens() -> list[str]:
    return [
        mint("u1", key=KEY, now=NOW, extra={"iss": "smap", "aud": "hub"}),
        mint("u2", key=KEY, now=NOW - 7200, ttl=3600),
        mint("u3", key=KEY, algorithm="HS512", now=NOW),
        mint("u4", key=SECRET[::-1], now=NOW),
    ]


tokens = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    mutated(
        [t.encode() for t in real_tokens()], [b".", b"=", b"+", b"/", b"eyJ", b"\xff", b""]
    ).map(lambda b: b.decode("latin-1")),
    signed_tokens(),
)


def check_claims(user_id: str, expires_at: float) -> None:
    assert valid_user_id(user_id)
    assert math.isfinite(expires_at) and expires_at > NOW  # "exp ... in the future"


@FUZZ
@given(token=tokens, config=st.sampled_from(CONFIGS))
def test_verify_raises_only_auth_errors(token: str, config: AuthConfig) -> None:
    try:
        claims = verify(token, config, now=NOW)
    except AuthError as exc:
        assert exc.reason in AUTH_REASONS
        assert len(token) < 8 or token not in str(exc)
        return
    check_claims(claims.user_id, claims.expires_at)


@settings(FUZZ, max_examples=50)
@given(token_list=st.lists(tokens, min_size=1, max_size=6), at=st.floats(NOW - 10, NOW + 9000))
def test_verified_tokens_cache_raises_only_auth_errors(token_list: list[str], at: float) -> None:
    cache = VerifiedTokens(CONFIGS[0], max_entries=2)
    for token in [*token_list, *token_list]:
        for now in (NOW, at):
            try:
                claims = cache.verify(token, now=now)
            except AuthError as exc:
                assert exc.reason in AUTH_REASONS
                continue
            assert valid_user_id(claims.user_id)
            assert math.isfinite(claims.expires_at) and claims.expires_at > now
    assert len(cache) <= 2


#: Values of a NumericDate claim (exp, nbf) that a key's holder might sign.
dates = st.one_of(
    st.sampled_from([10**400, -(10**400), math.nan, math.inf, -math.inf, 1e308, True, None, "1"]),
    st.floats(),
    st.integers(),
    st.sampled_from([NOW - 10, NOW + 10, NOW + 3600]),
)


@FUZZ
@given(exp=dates, nbf=dates, leeway=st.sampled_from([0.0, 30.0]))
def test_verify_raises_only_auth_errors_for_any_signed_dates(
    exp: object, nbf: object, leeway: float
) -> None:
    claims: dict[str, object] = {"sub": "u1", "exp": exp}
    if nbf is not None:
        claims["nbf"] = nbf
    token = sign_raw(b'{"alg":"HS256","typ":"JWT"}', json.dumps(claims).encode())
    config = AuthConfig(algorithms=("HS256",), key=KEY, leeway=leeway)
    try:
        verified = verify(token, config, now=NOW)
    except AuthError as exc:
        assert exc.reason in AUTH_REASONS
        return
    check_claims(verified.user_id, verified.expires_at)


@pytest.mark.parametrize(
    "claims",
    [
        b'{"sub":"u1","exp":1' + b"0" * 400 + b"}",  # an int no float holds
        b'{"sub":"u1","exp":NaN}',  # never "in the future"
        b'{"sub":"u1","exp":1e999}',
        b'{"sub":"u1","exp":1900000000,"nbf":NaN}',
    ],
)
def test_a_signed_token_with_an_absurd_date_is_malformed(claims: bytes) -> None:
    token = sign_raw(b'{"alg":"HS256","typ":"JWT"}', claims)
    with pytest.raises(AuthError) as err:
        verify(token, CONFIGS[0], now=time.time())
    assert err.value.reason == "malformed"
