"""The asyncio-side read loop of a subscription: one of the two places
where smapws touches a private part of redis-py (its hiredis parser; the
other is a connection's writer, in ``client._DropsUnsent``, so that a cut
write's socket closes).

The loop runs on the asyncio side of the trio-asyncio bridge and hands each
message to trio with ``send_nowait``: crossing the bridge once per message
costs ~4x more (DESIGN.md §1). It reads RESP2 replies straight from the
hiredis reader behind redis-py's connection (:func:`fast_reader`), not
through the public ``PubSub.get_message``, whose layers (retry, timeout,
push handling, a dict per message) cost more than the rest of a delivery.

Measured (``python -m bench.micro_pump --small 20000 --large 1500 --rounds
5``: a backlog read by this loop into a trio channel drained as the router
would, best of 5 alternated rounds, 2-core machine shared with other work):

============  ====================  ====================  =========
message       ``get_message``       fast reader           CPU ratio
============  ====================  ====================  =========
200 B         10.5 µs, 85,000/s     5.9 µs, 130,000/s     1.8x
60 KB         98 µs, 7,500/s        78 µs, 10,400/s       1.26x
============  ====================  ====================  =========

(CPU µs per message, then messages/s.) At 200 B the public path nearly
doubles the read loop's cost, and the read loop is the one part of the hub
that cannot be spread over connections: it is what keeps the hub from being
Redis's slow reader (issue 16). At 60 KB copying the bytes dominates both.

Without hiredis, or with a redis-py whose layout differs, :func:`fast_reader`
returns None and the loop uses ``get_message``: slower, never wrong.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import redis.asyncio as aioredis
import trio

from smapws._io.brokers import Item, QueueBytes
from smapws._io.brokers.redis.probes import Progress

try:  # redis-py internals, for the fast path (see fast_reader)
    from redis._parsers import hiredis as _redis_hiredis
except ImportError:  # pragma: no cover - another redis-py layout: no fast path
    _redis_hiredis = None  # type: ignore[assignment]
_HIREDIS_PARSER: type | None = getattr(_redis_hiredis, "_AsyncHiredisParser", None)
_NOT_ENOUGH_DATA: object | None = getattr(_redis_hiredis, "NOT_ENOUGH_DATA", None)


def fast_reader(
    pubsub: aioredis.client.PubSub,
) -> tuple[Callable[[], Any], Callable[[], Awaitable[object]]] | None:
    """``(gets, read_more)`` of the hiredis reader behind ``pubsub``'s
    connection when it has one and speaks RESP2, else None (then every reply
    goes through ``get_message``).

    Each reply that redis-py hands over costs eight coroutine layers (retry,
    timeout, push handling, a dict): at 12,000 messages/s that was most of
    the pump's time. With the fast reader the pump takes each reply from the
    reader's buffer itself (``gets()``, one C call), and when the buffer is
    empty waits for the next socket read (``read_more()``, the parser's own
    read: it feeds the reader, and raises ``ConnectionError`` at EOF). Every
    reply that is not a ``pmessage`` still goes through redis-py's
    ``PubSub.handle_message``, so its subscription state stays right."""
    if _HIREDIS_PARSER is None or _NOT_ENOUGH_DATA is None:
        return None
    conn = pubsub.connection
    parser = getattr(conn, "_parser", None)
    if conn is None or conn.protocol != 2 or not isinstance(parser, _HIREDIS_PARSER):
        return None
    gets = getattr(getattr(parser, "_reader", None), "gets", None)
    read_more = getattr(parser, "read_from_socket", None)
    if not callable(gets) or not callable(read_more):
        return None
    return gets, read_more


async def pump(
    pubsub: aioredis.client.PubSub,
    sink: trio.MemorySendChannel[Item],
    on_drop: Callable[[], None],
    progress: Progress,
    probe: bytes,
    on_probe: Callable[[bytes], None],
    on_control: Callable[[str, bytes], None],
    max_bytes: int | None = None,
    on_too_large: Callable[[bytes, int], object] = lambda channel, size: None,
    queued: QueueBytes | None = None,
) -> None:
    """asyncio side: read the subscription and hand messages to trio without
    waiting, counting them in ``progress``: ``pmessage`` (pattern mode),
    ``message`` and ``smessage`` (user mode, sharded or not). Messages on
    the probe channel go to ``on_probe(data)`` (never to users);
    (un)subscribe confirmations to ``on_control(kind, channel)``,
    synchronously, so that whatever it does happens before the next message
    is read (a user mode hub registers a tab's subscription there: messages
    read after it are that tab's). A message over ``max_bytes`` goes to
    ``on_too_large(channel, size)`` instead, unparsed and without taking a
    place in the router's queue; one that ``queued`` (the queue's bytes)
    refuses goes to ``on_drop()``, like one the full queue refuses. Returns
    or raises when the connection fails."""
    get = pubsub.get_message
    handle = pubsub.handle_message
    send = sink.send_nowait
    limit = (1 << 62) if max_bytes is None else max_bytes
    take = (lambda n: True) if queued is None else queued.take

    def on_message(msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind in _DATA_KINDS:
            data_message(msg["channel"], msg["data"])
        else:
            on_control(kind, msg["channel"])

    def data_message(channel: bytes, data: bytes) -> None:
        progress.messages += 1
        if channel == probe:
            on_probe(data)
            return
        size = len(data)
        if size > limit:
            on_too_large(channel, size)
            return
        if not take(size):
            on_drop()
            return
        try:
            send((channel, data))
        except trio.WouldBlock:
            on_drop()
            if queued is not None:
                queued.give(size)

    fast = fast_reader(pubsub)
    if fast is None:
        while True:
            msg = await get(timeout=None)
            if msg is not None:
                on_message(msg)
    gets, read_more = fast
    while True:
        reply = gets()
        if reply is _NOT_ENOUGH_DATA:
            await read_more()
            continue
        if type(reply) is list:
            # Data replies skip redis-py's dict-building handler: ``pmessage``
            # is [kind, pattern, channel, data], ``message``/``smessage``
            # [kind, channel, data]. Confirmations go through it (it keeps
            # the subscription state redis-py needs to resubscribe).
            n = len(reply)
            if n == 4 and reply[0] == b"pmessage":
                data_message(reply[2], reply[3])
                continue
            if n == 3 and reply[0] in _DATA_KINDS_RAW:
                data_message(reply[1], reply[2])
                continue
        elif isinstance(reply, Exception):  # an error reply: the link is unusable
            raise reply
        msg = await handle(reply)  # type: ignore[no-untyped-call]
        if msg is not None:
            on_message(msg)


#: The message kinds that carry data (the rest are confirmations).
_DATA_KINDS: Final = frozenset({"pmessage", "message", "smessage"})
_DATA_KINDS_RAW: Final = frozenset({b"message", b"smessage"})
