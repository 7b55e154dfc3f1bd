"""Sans-IO pieces of the load generator's minimal WebSocket client (RFC 6455).

No sockets and no clock here: the worker in :mod:`bench.loadgen` feeds bytes in and
sends the bytes these functions return. Only what a benchmark client needs is
implemented: the client handshake (no extensions offered, so servers never compress),
parsing unmasked server frames, and masked pong/close frames.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# The benchmark marker the publisher puts in each payload: "bench": "<step>:<seq>:<ns>".
# Finding it in the raw frame is robust to key order and spacing, and costs a fraction
# of json.loads per message, which keeps the client cheap.
_MARK_KEY = b'"bench"'


class ProtocolError(Exception):
    """The server broke the WebSocket protocol (the connection must be dropped)."""


def handshake_request(host: str, port: int, path: str, token: str) -> tuple[bytes, bytes]:
    """Return ``(request bytes, expected Sec-WebSocket-Accept)`` for one upgrade.

    The token travels in the ``access_token`` cookie; no Origin header is sent (a
    non-browser client), and no extension is offered.
    """
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Cookie: access_token={token}\r\n"
        "\r\n"
    ).encode()
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    return request, accept


def parse_handshake_response(head: bytes, accept: bytes) -> int:
    """Check a response head (up to and without the blank line).

    Returns the HTTP status code; 101 is only returned when the upgrade is valid
    (the ``Sec-WebSocket-Accept`` matches). Raises :class:`ProtocolError` when the
    head is not HTTP or a 101 carries a wrong accept value.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP response: {lines[0][:60]!r}")
    status = int(parts[1])
    if status == 101:
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-accept":
                if value.strip() != accept:
                    raise ProtocolError("wrong Sec-WebSocket-Accept")
                return 101
        raise ProtocolError("101 without Sec-WebSocket-Accept")
    return status


def parse_frames(buf: bytes) -> tuple[list[tuple[bool, int, bytes]], bytes]:
    """Split ``buf`` into complete server frames.

    Returns ``([(fin, opcode, payload), ...], rest)`` where ``rest`` is the incomplete
    tail to prepend to the next read. Raises :class:`ProtocolError` on a masked
    server frame (RFC 6455 section 5.1).
    """
    frames: list[tuple[bool, int, bytes]] = []
    pos = 0
    end_of_buf = len(buf)
    while end_of_buf - pos >= 2:
        b0 = buf[pos]
        b1 = buf[pos + 1]
        if b1 & 0x80:
            raise ProtocolError("masked frame from server")
        length = b1 & 0x7F
        head = 2
        if length == 126:
            if end_of_buf - pos < 4:
                break
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            head = 4
        elif length == 127:
            if end_of_buf - pos < 10:
                break
            (length,) = struct.unpack_from("!Q", buf, pos + 2)
            head = 10
        end = pos + head + length
        if end > end_of_buf:
            break
        frames.append((bool(b0 & 0x80), b0 & 0x0F, buf[pos + head : end]))
        pos = end
    return frames, buf[pos:]


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """Encode one final, masked client frame (control payloads must be <= 125 bytes)."""
    if len(payload) > 125:
        raise ValueError("client_frame only encodes payloads of at most 125 bytes")
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


def bench_mark(message: bytes) -> tuple[int, int, int] | None:
    """Return ``(step, seq, publish_ns)`` from a delivered message, or None if unmarked.

    ``message`` is the JSON text (a frame header in front of it does no harm).
    """
    key = message.find(_MARK_KEY)
    if key < 0:
        return None
    start = message.find(b'"', key + len(_MARK_KEY)) + 1
    end = message.find(b'"', start)
    parts = message[start:end].split(b":")
    if start == 0 or end < 0 or len(parts) != 3:
        return None
    try:
        return int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return None


def centrifuge_connect_reply(message: bytes) -> bool:
    """Whether ``message`` is a successful reply to Centrifuge's connect command
    ``{"id":1}`` (JSON protocol): ``{"id":1,"result":{...}}``, no ``error``."""
    try:
        reply = json.loads(message)
    except ValueError:
        return False
    return (
        isinstance(reply, dict)
        and reply.get("id") == 1
        and isinstance(reply.get("result"), dict)
        and "error" not in reply
    )
