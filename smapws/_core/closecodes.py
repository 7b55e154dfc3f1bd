"""The WebSocket close codes the hub sends, in one place.

The contract is docs/reference/close-codes.rst; the browser client's
``CloseCode`` (``smapws/static/smapws-client.js`` and its ``.d.ts``) is held to
this enum by a test. RFC 6455 §7.4.1 defines the numbers.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """A close frame's status code, as the hub uses it."""

    #: The client closed, or a normal end.
    NORMAL = 1000
    #: The hub is draining for shutdown: reconnect elsewhere.
    GOING_AWAY = 1001
    #: The client sent a malformed frame.
    PROTOCOL_ERROR = 1002
    #: Never sent: what a client sees when the socket closed without a close
    #: frame (a write blocked past ``SMAPWS_WRITE_WAIT``, a refused upgrade).
    ABNORMAL = 1006
    #: A client text message was not valid UTF-8.
    INVALID_DATA = 1007
    #: The token expired, or the client sent frames too fast.
    POLICY = 1008
    #: A client message was larger than ``SMAPWS_MAX_CLIENT_MESSAGE_BYTES``.
    TOO_BIG = 1009
    #: No pong in time, or an unexpected error in this connection.
    INTERNAL = 1011
    #: The connection's send queue overflowed: reconnect later.
    TRY_AGAIN_LATER = 1013
