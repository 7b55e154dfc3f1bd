"""WebSocket frame encoding for server-to-client data frames (RFC 6455 §5.2).

Server frames are never masked, so one encoded frame can be written unchanged
to every connection that should receive it: the router encodes a message once
and each writer copies bytes, instead of running a protocol state machine per
connection per message.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81  # FIN bit + opcode 0x1 (text)
_MAX_7BIT = 125
_MAX_16BIT = 0xFFFF


def text_frame(payload: bytes) -> bytes:
    """Return one complete, unmasked, final text frame carrying ``payload``.

    ``payload`` must already be valid UTF-8 (the caller encoded it from a str or
    validated it); this function does not check, because it is on the hot path.
    """
    n = len(payload)
    if n <= _MAX_7BIT:
        header = bytes((_FIN_TEXT, n))
    elif n <= _MAX_16BIT:
        header = struct.pack("!BBH", _FIN_TEXT, 126, n)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, n)
    return header + payload


_FIN_CLOSE = 0x88  # FIN bit + opcode 0x8 (close)


def close_frame(code: int, reason: str = "") -> bytes:
    """Return an unmasked close frame with ``code`` and ``reason`` (RFC 6455
    §5.5.1: a control frame's payload is at most 125 bytes, so the reason is
    cut to fit, never inside a UTF-8 sequence)."""
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    payload = struct.pack("!H", code) + text
    return bytes((_FIN_CLOSE, len(payload))) + payload
