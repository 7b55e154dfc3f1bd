"""Broker message validation, stamping and framing (sans-IO)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smapws._core.envelope import (
    InvalidMessage,
    encode_message,
    parse,
    rfc3339_ms,
    user_from_channel,
)
from smapws._core.frames import text_frame

from .conftest import parse_frames

WALL = 1_795_000_000.123  # 2026-11-18T11:06:40.123Z


def test_adds_timestamp_and_keeps_the_published_object() -> None:
    raw = b'{"type": "project_progress", "payload": {"project_id": "p1", "done": 15}}'
    env = parse(raw, wall_time=WALL, received_at=7.0)
    obj = json.loads(env.text)
    assert obj == {
        "type": "project_progress",
        "payload": {"project_id": "p1", "done": 15},
        "timestamp": rfc3339_ms(WALL),
    }
    assert env.type == "project_progress"
    assert env.received_at == 7.0


def test_keeps_a_publisher_timestamp_untouched() -> None:
    raw = b'{"type":"alert","payload":{},"timestamp":"2020-01-01T00:00:00Z"}'
    env = parse(raw, wall_time=WALL, received_at=0)
    assert env.text == raw


def test_each_wall_time_stamps_its_own_timestamp() -> None:
    # parse keeps the last wall time's field (the router stamps a batch with
    # one): a message stamped at another time, before or after, has its own.
    raw = b'{"type":"alert","payload":{}}'
    walls = [WALL, WALL, WALL + 0.25, WALL + 86_400, WALL, 0.0]
    stamps = [
        json.loads(parse(raw, wall_time=w, received_at=0, message_id="0" * 16).text)["timestamp"]
        for w in walls
    ]
    assert stamps == [rfc3339_ms(w) for w in walls]
    assert len(set(stamps)) == 4
    assert json.loads(parse(raw, wall_time=WALL + 1, received_at=0).text) == {
        "type": "alert",
        "payload": {},
        "timestamp": rfc3339_ms(WALL + 1),
    }


def test_timestamp_format_is_rfc3339_utc_milliseconds() -> None:
    assert rfc3339_ms(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_ms(1_795_000_000.1239) == "2026-11-18T11:06:40.123Z"
    assert rfc3339_ms(1_795_000_000.9999) == "2026-11-18T11:06:40.999Z"


def test_unknown_types_are_forwarded() -> None:
    env = parse(b'{"type":"resync_maybe","payload":{"a":1}}', wall_time=WALL, received_at=0)
    assert json.loads(env.text)["type"] == "resync_maybe"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe{}", "not_utf8"),
        (b"not json", "not_json"),
        (b"", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"text"', "not_object"),
        (b'{"payload": {}}', "bad_type"),
        (b'{"type": "", "payload": {}}', "bad_type"),
        (b'{"type": 5, "payload": {}}', "bad_type"),
        (b'{"type": "x"}', "bad_payload"),
        (b'{"type": "x", "payload": [1]}', "bad_payload"),
        (b'{"type": "x", "payload": null}', "bad_payload"),
    ],
)
def test_invalid_messages_raise_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse(raw, wall_time=WALL, received_at=0)
    assert info.value.reason == reason


def test_size_limit() -> None:
    raw = encode_message("notification", {"text": "x" * 100})
    parse(raw, wall_time=WALL, received_at=0, max_bytes=len(raw))
    with pytest.raises(InvalidMessage) as info:
        parse(raw, wall_time=WALL, received_at=0, max_bytes=len(raw) - 1)
    assert info.value.reason == "too_large"
    assert "x" * 10 not in str(info.value)  # the body never lands in an error text


def test_channel_to_user() -> None:
    assert user_from_channel(b"user_noti:user_123", b"user_noti:") == "user_123"
    for bad in (b"user_noti:", b"other:u1", b"user_noti:\xff"):
        with pytest.raises(InvalidMessage):
            user_from_channel(bad, b"user_noti:")


@pytest.mark.parametrize(
    "user",
    ["u" * 257, "u" * 1_000_000, "u1\x1b[31m", "u1\r\nforged", "\x00", "u\x85"],
)
def test_a_channel_no_token_can_name_is_bad_channel(user: str) -> None:
    # No token carries such a user id (auth.valid_user_id), so no tab can
    # receive the message; and its user id would be held by the replay
    # window and the current state outside their byte bounds.
    with pytest.raises(InvalidMessage) as info:
        user_from_channel(b"user_noti:" + user.encode(), b"user_noti:")
    assert info.value.reason == "bad_channel"


def test_the_longest_user_id_names_a_channel() -> None:
    for user in ("u" * 256, "\U0001f600" * 256):
        assert user_from_channel(b"user_noti:" + user.encode(), b"user_noti:") == user


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_lengths(size: int) -> None:
    payload = b"a" * size
    frame = text_frame(payload)
    assert frame[0] == 0x81  # FIN + text
    assert parse_frames(frame) == [(0x1, payload)]


@given(
    st.text(min_size=1, max_size=20),
    st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=20), max_size=5),
    st.sampled_from(["", " ", "\n", "  \r\n"]),
)
def test_any_valid_message_round_trips(mtype: str, payload: dict[str, object], ws: str) -> None:
    raw = (ws + json.dumps({"type": mtype, "payload": payload}) + ws).encode()
    env = parse(raw, wall_time=WALL, received_at=0)
    obj = json.loads(env.text)
    assert obj["type"] == mtype
    assert obj["payload"] == payload
    assert obj["timestamp"] == rfc3339_ms(WALL)
    assert parse_frames(env.frame) == [(0x1, env.text)]


# -- strict JSON (issue 8) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"type":"x","payload":{"v":NaN}}', "bad_number"),
        (b'{"type":"x","payload":{"v":-Infinity}}', "bad_number"),
        (b'{"type":"x","payload":{"v":1e999}}', "bad_number"),
        (b'{"type":"x","payload":{"v":-1e400}}', "bad_number"),
        (b'{"type":"x","payload":{"v":"\\ud800"}}', "bad_unicode"),
        (b'{"type":"x","payload":{"\\udc00":1}}', "bad_unicode"),
        (b'{"type":"x","payload":{"v":"\\uDBFF\\u0041"}}', "bad_unicode"),
        (b'{"type":"x","payload":{"a":' + b"[" * 1000 + b"]" * 1000 + b"}}", "too_deep"),
        (b"[" * 60_000, "too_deep"),
        (b"{" * 60_000, "too_deep"),
        (b'{"type":"x","payload":{"v":' + b"9" * 5000 + b"}}", "bad_number"),
        # JSON.parse gives Infinity (and JSON.stringify null) for these:
        (b'{"type":"x","payload":{"v":1' + b"0" * 309 + b"}}", "bad_number"),
        (b'{"type":"x","payload":{"v":-1' + b"0" * 309 + b"}}", "bad_number"),
        (b'{"type":"x","payload":{"v":' + b"9" * 309 + b"}}", "bad_number"),
        (
            b'{"type":"x","payload":{"v":[1,"' + b"7" * 400 + b'",2' + b"0" * 400 + b"]}}",
            "bad_number",
        ),
    ],
)
def test_strict_json_refuses_what_a_browser_would_not_take_back(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse(raw, wall_time=WALL, received_at=0)
    assert info.value.reason == reason


def test_the_largest_finite_integers_are_taken() -> None:
    # 1e308 (309 digits) and the largest integer a double holds are finite in
    # JSON.parse; so is a long run of digits inside a string.
    largest = str(int(sys.float_info.max)).encode()
    for number in (b"1" + b"0" * 308, largest, b"-" + largest):
        raw = b'{"type":"x","payload":{"v":' + number + b',"s":"' + b"9" * 500 + b'"}}'
        assert json.loads(parse(raw, wall_time=WALL, received_at=0).text)["payload"]["v"] == int(
            number
        )


def test_strict_json_takes_what_is_valid() -> None:
    # A paired surrogate escape is one character; an escaped backslash before
    # "ud800" is text, not an escape; brackets inside strings are not nesting.
    raw = (
        b'{"type":"x","payload":{"emoji":"\\ud83d\\ude00","text":"\\\\ud800",'
        b'"brackets":"' + b"[" * 100 + b'","n":1.5e300,"deep":' + b"[" * 30 + b"]" * 30 + b"}}"
    )
    obj = json.loads(parse(raw, wall_time=WALL, received_at=0).text)
    assert obj["payload"]["emoji"] == "\U0001f600"
    assert obj["payload"]["text"] == "\\ud800"


def test_depth_bound_is_exact() -> None:
    from smapws._core.envelope import loads_strict

    assert loads_strict(b"[" * 5 + b"]" * 5, max_depth=5) == [[[[[]]]]]
    with pytest.raises(InvalidMessage) as info:
        loads_strict(b"[" * 6 + b"]" * 6, max_depth=5)
    assert info.value.reason == "too_deep"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"1" * 309, True),
        (b'{"n":' + b"9" * 309 + b"}", True),
        (b'{"n":' + b"9" * 308 + b"}", False),
        (b"1" * 308 + b"x" + b"1" * 308, False),
        (b"\xd9" * 400, False),  # not an ASCII digit, whatever it decodes to
        (b"x" * 60_000, False),
    ],
)
def test_long_digit_runs_are_found_as_the_regex_found_them(raw: bytes, expected: bool) -> None:
    from smapws._core.envelope import loads_strict
    from smapws_publisher._validate import _has_long_digits, _loads_careful

    assert _has_long_digits(raw) is expected
    assert bool(re.search(rb"\d{309}", raw)) is expected
    # And loads_strict, whose fast path skips the search in a text too short
    # to hold such a run, takes or refuses each as its careful path does.

    def outcome(loads: Callable[[], object]) -> str:
        try:
            loads()
        except InvalidMessage as exc:
            return exc.reason
        return "taken"

    assert outcome(lambda: loads_strict(raw)) == outcome(lambda: _loads_careful(raw, 32))


def _framed_twice(raw: bytes, mid: str) -> bytes:
    """What clients received before the id was given to :func:`parse`: the
    message framed with its timestamp, then the id spliced into that text
    (or a publisher's top-level ``id`` replaced) and framed again."""
    text = parse(raw, wall_time=WALL, received_at=0.0).text
    field = b'"id":"' + mid.encode("ascii") + b'"}'
    if b'"id"' in text:
        obj = json.loads(text)
        if "id" in obj:
            obj["id"] = mid
            return text_frame(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())
    return text_frame(text[:-1] + b"," + field)


_extras = st.dictionaries(
    st.sampled_from(["id", "timestamp", "ID", "x", "\u00e9"]),
    st.one_of(st.integers(), st.text(max_size=5), st.none()),
    max_size=3,
)


@given(
    extra=_extras,
    payload=st.dictionaries(st.sampled_from(["id", "project_id", "n"]), st.text(max_size=4)),
    mtype=st.sampled_from(["notification", "project_progress", "alert"]),
    spaced=st.booleans(),
)
def test_the_id_given_to_parse_frames_what_clients_received_before(
    extra: dict[str, object], payload: dict[str, object], mtype: str, spaced: bool
) -> None:
    """One frame per message, byte for byte the frame built twice before."""
    obj = {"type": mtype, "payload": payload, **extra}
    raw = json.dumps(obj, ensure_ascii=False, separators=(", ", ": ") if spaced else (",", ":"))
    data = b"  " + raw.encode() + b"\n"
    mid = "0123456789abcdef"
    env = parse(data, wall_time=WALL, received_at=0.0, message_id=mid)
    assert env.frame == _framed_twice(data, mid)
    assert json.loads(env.text)["id"] == mid


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type":"x","payload":{"id":1}}',  # "id" in the text, not at the top
        b'{"id":null,"type":"x","payload":{},"timestamp":"t"}',
        b'{"type":"x","payload":{},"id":"a\\u00e9"}',
    ],
)
def test_the_id_given_to_parse_keeps_the_edge_cases_as_they_were(raw: bytes) -> None:
    mid = "fedcba9876543210"
    env = parse(raw, wall_time=WALL, received_at=0.0, message_id=mid)
    assert env.frame == _framed_twice(raw, mid)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type":"x","payload":{},"\\u0069d":"escaped"}',
        b'{"type":"x","payload":{},"\\u0069\\u0064":"escaped"}',
        b'{"type":"x","payload":{},"id":"plain"}',
    ],
)
def test_a_publishers_id_however_escaped_is_replaced_not_doubled(raw: bytes) -> None:
    """Review of issue 17: ``"\\u0069d"`` is an ``id`` key too; splicing a
    second one gave the browser two (JSON.parse keeps the last)."""
    mid = "fedcba9876543210"
    env = parse(raw, wall_time=WALL, received_at=0.0, message_id=mid)
    pairs = json.loads(env.text, object_pairs_hook=lambda kv: kv)
    assert [v for k, v in pairs if k == "id"] == [mid]
