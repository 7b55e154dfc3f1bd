"""Fuzzing the WebSocket layer with client frames (issue 8, point 3).

After a valid upgrade, a client sends random and malformed frames (bad
opcodes, reserved bits, fragmented or oversized control frames, invalid
UTF-8, bad close codes, unmasked frames, lengths far beyond what follows),
some of them only once the hub has started closing. Whatever it sends, the
connection ends (at the latest by the pong deadline) and takes nothing with
it: the hub's frames are well formed, a close frame carries a documented
code (or echoes the client's own), no internal error is counted, and the hub
forgets the connection. In memory with trio's MockClock, so the heartbeat
deadlines pass in virtual time.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import time
from pathlib import Path
from typing import Final

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smapws._io import frontdoor
from smapws._io.app import App
from smapws._io.brokers.memory import MemoryBroker

from .conftest import make_config, parse_frames, token
from .test_websocket import UPGRADE_HEAD


def _documented_close_codes() -> frozenset[int]:
    """The codes of the "Close codes" page's table, but those it says are
    never sent (1006): read from docs/reference/close-codes.rst so the two
    cannot drift."""
    table = (Path(__file__).parent.parent / "docs/reference/close-codes.rst").read_text()
    rows = re.findall(r"^(\d{4})  +(.*)$", table, flags=re.M)
    return frozenset(int(code) for code, text in rows if "never sent" not in text)


#: The close codes the hub sends of its own accord (docs/reference/close-codes.rst).
HUB_CLOSE_CODES: Final = _documented_close_codes()
PING_INTERVAL: Final = 54.0
PONG_WAIT: Final = 60.0
WRITE_WAIT: Final = 10.0
#: Long enough for the slowest ending: a ping, no pong, the close handshake.
LONGEST: Final = PING_INTERVAL + PONG_WAIT + WRITE_WAIT + 2 * 1.0
MAX_CLIENT_MESSAGE: Final = 256


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x37\xfa\x21\x3d",
    length: int | None = None,
    long_form: bool = False,
) -> bytes:
    """A client frame, written independently of wsproto (RFC 6455 §5.2);
    ``length`` overrides the length field, ``long_form`` uses a longer
    length encoding than needed."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)
    m = 0x80 if mask is not None else 0
    if n < 126 and not long_form:
        head = bytes((b0, m | n))
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


INVALID_UTF8: Final = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]

payloads = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(str.encode),
    st.sampled_from(INVALID_UTF8),
    st.integers(0, MAX_CLIENT_MESSAGE * 2).map(lambda n: b"x" * n),
)


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """One client frame, and the close code it carries (None if no close
    frame or no code)."""
    kind = draw(st.sampled_from(["data", "control", "close", "any", "junk"]))
    if kind == "junk":  # (that does not start a close frame)
        junk = draw(st.binary(min_size=1, max_size=20).filter(lambda b: b[0] & 0xF != 0x8))
        return junk, None
    if kind == "close":
        code = draw(st.one_of(st.sampled_from([1000, 1001, 1005, 1006, 1015, 3000, 4999]),
                              st.integers(0, 0xFFFF)))  # fmt: skip
        reason = draw(st.sampled_from([b"", b"bye", b"x" * 124, *INVALID_UTF8]))
        payload = draw(st.sampled_from([close_payload(code, reason), b"\x03"]))
        opcode = 0x8
    elif kind == "control":
        opcode = draw(st.sampled_from([0x9, 0xA]))
        payload = draw(payloads)
    elif kind == "data":
        opcode = draw(st.sampled_from([0x0, 0x1, 0x2]))
        payload = draw(payloads)
    else:
        opcode = draw(st.integers(0, 15))
        payload = draw(payloads)
    length = draw(
        st.one_of(st.none(), st.none(), st.sampled_from([0, 200, 70_000, 2**40, 2**63 - 1]))
    )
    data = frame(
        opcode,
        payload,
        fin=draw(st.booleans()) if kind != "close" else True,
        rsv=draw(st.sampled_from([0, 0, 0, 1, 4, 7])),
        mask=draw(st.sampled_from([b"\x37\xfa\x21\x3d", b"\x00\x00\x00\x00", None])),
        length=length,
        long_form=draw(st.booleans()),
    )
    if opcode != 0x8 or length is not None or len(payload) < 2:
        return data, None
    return data, struct.unpack("!H", payload[:2])[0]  # a code the hub may echo


def _app() -> App:
    return App(
        make_config(
            SMAPWS_PING_INTERVAL=PING_INTERVAL,
            SMAPWS_PONG_WAIT=PONG_WAIT,
            SMAPWS_WRITE_WAIT=WRITE_WAIT,
            SMAPWS_MAX_CLIENT_MESSAGE_BYTES=MAX_CLIENT_MESSAGE,
        ),
        MemoryBroker(),
    )


def internal_errors(app: App) -> float:
    return sum(
        s.value
        for metric in app.metrics.registry.collect()
        if metric.name == "websocket_internal_errors"
        for s in metric.samples
        if s.name.endswith("_total")
    )


async def exchange(
    app: App,
    before: list[bytes],
    after_close: list[bytes],
    *,
    chunk: int,
    deliver: int,
) -> bytes:
    """Upgrade, send ``before`` in pieces of ``chunk`` bytes, deliver
    ``deliver`` messages, and once the hub sends a close frame send
    ``after_close``; read until the hub closes. Returns what the hub sent
    after its 101 head."""
    client, server = trio.testing.memory_stream_pair()
    head = UPGRADE_HEAD.format(query="", extra=f"Cookie: access_token={token('u1')}\r\n")
    received = b""

    async def send(data: bytes) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for i in range(0, len(data), chunk):
                await client.send_all(data[i : i + chunk])

    async with trio.open_nursery() as duties:
        duties.start_soon(app.maintain)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(frontdoor.handle, app, server)
            await send(head.encode() + b"".join(before))
            for i in range(deliver):
                app.route(
                    b"user_noti:u1",
                    b'{"type":"notification","payload":{"i":%d}}' % i,
                    wall_time=time.time(),
                    now=trio.current_time(),
                )
            answered = False
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await client.receive_some(65536):
                    received += data
                    body = received.partition(b"\r\n\r\n")[2]
                    if not answered and b"\x88" in body and _has_close(body):
                        answered = True
                        await send(b"".join(after_close))
            await client.aclose()
        duties.cancel_scope.cancel()
    head_sent, _, body = received.partition(b"\r\n\r\n")
    assert head_sent.startswith(b"HTTP/1.1 101 "), head_sent[:40]
    return body


def _has_close(body: bytes) -> bool:
    try:
        return any(op == 0x8 for op, _ in parse_frames(body))
    except AssertionError:  # a frame still incomplete
        return False


def check(app: App, body: bytes, client_codes: set[int], elapsed: float, deliver: int) -> None:
    """What the hub sent and what it kept, whatever the client sent."""
    sent = parse_frames(body)  # well formed: unmasked, complete
    ops = [op for op, _ in sent]
    assert set(ops) <= {0x1, 0x8, 0x9, 0xA}, ops
    if 0x8 in ops:
        assert ops.index(0x8) == len(ops) - 1, "frames after the close frame"
        payload = sent[-1][1]
        if payload:
            (code,) = struct.unpack("!H", payload[:2])
            assert code in HUB_CLOSE_CODES or code in client_codes, code
            payload[2:].decode("utf-8")
    # Delivered in order, or not at all once the connection is closing.
    got = [json.loads(p)["payload"]["i"] for op, p in sent if op == 0x1]
    assert got == list(range(len(got))) and len(got) <= deliver
    assert internal_errors(app) == 0
    assert app.hub.active_connections == 0
    assert app.pending_upgrades == 0
    assert elapsed <= LONGEST, f"the connection lasted {elapsed} s"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(frames(), max_size=6),
    after_close=st.lists(frames(), max_size=3),
    chunk=st.sampled_from([1, 3, 7, 4096]),
    deliver=st.integers(0, 3),
)
def test_any_client_frames_end_only_their_own_connection(
    before: list[tuple[bytes, int | None]],
    after_close: list[tuple[bytes, int | None]],
    chunk: int,
    deliver: int,
) -> None:
    client_codes = {code for _, code in before + after_close if code is not None}

    async def scenario() -> None:
        app = _app()
        start = trio.current_time()
        body = await exchange(
            app,
            [f for f, _ in before],
            [f for f, _ in after_close],
            chunk=chunk,
            deliver=deliver,
        )
        check(app, body, client_codes, trio.current_time() - start, deliver)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize(
    "late",
    [
        frame(0x9, b"keepalive"),
        frame(0x1, b"x" * (MAX_CLIENT_MESSAGE + 1)),
        frame(0x1, b"x" * MAX_CLIENT_MESSAGE, fin=False) + frame(0x0, b"x"),
    ],
    ids=["ping", "too-big", "too-big-in-parts"],
)
async def test_a_frame_while_the_hub_closes_is_not_an_internal_error(
    autojump_clock: trio.testing.MockClock, late: bytes
) -> None:
    """The hub closes (no pong: 1011) and the client sends a ping, or a
    message over the limit, before it answers the close: the library's pong
    (or 1009 close frame) after our close frame raised LocalProtocolError in
    the reader, an internal error, for instance for every client with its
    own keepalive pings during a drain."""
    app = _app()
    start = trio.current_time()
    body = await exchange(app, [], [late], chunk=4096, deliver=0)
    check(app, body, set(), trio.current_time() - start, 0)
    assert [op for op, _ in parse_frames(body)] == [0x9, 0x8]
