"""The Redis server settings that let it drop this hub's subscription
(``client-output-buffer-limit pubsub``, ``proto-max-bulk-len``), read once
per broker and named in one start-up warning."""

from __future__ import annotations

from typing import Final

import redis.asyncio as aioredis

#: How many messages of ``SMAPWS_MAX_MESSAGE_BYTES`` Redis must be able to
#: hold for this hub while it is briefly not reading (a GC pause, a busy
#: core, a burst of publishes in one event-loop turn) without dropping it:
#: a thousand 64 KiB messages is 64 MiB.
BURST_MESSAGES: Final = 1000

#: The settings the README recommends, named in the start-up warning.
RECOMMENDED_REDIS_CONFIG: Final = (
    "CONFIG SET client-output-buffer-limit 'pubsub 256mb 128mb 60' "
    "and CONFIG SET proto-max-bulk-len 1mb (or in redis.conf)"
)


def _size(text: str) -> int:
    """Redis's size notation (``32mb``, ``8388608``, ``1gb``) in bytes."""
    text = text.strip().lower()
    for suffix, factor in (("gb", 1 << 30), ("mb", 1 << 20), ("kb", 1 << 10), ("b", 1)):
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def limit_problems(config: dict[str, str], max_message_bytes: int) -> list[str]:
    """What in a Redis server's ``config`` (``CONFIG GET`` replies:
    ``client-output-buffer-limit``, ``proto-max-bulk-len``) lets it drop a
    subscriber that accepts messages of ``max_message_bytes``: a pubsub
    limit (hard, or soft) under :data:`BURST_MESSAGES` such messages, or a
    ``proto-max-bulk-len`` that lets one publish pass the hard limit. Empty
    when nothing does (a 0 limit is none)."""
    problems: list[str] = []
    words = config.get("client-output-buffer-limit", "").split()
    hard = soft = 0
    for i, word in enumerate(words[:-3]):
        if word == "pubsub":
            hard, soft = _size(words[i + 1]), _size(words[i + 2])
    burst = BURST_MESSAGES * max_message_bytes
    for name, limit in (("hard", hard), ("soft", soft)):
        if 0 < limit < burst:
            problems.append(
                f"client-output-buffer-limit pubsub {name} limit {limit} bytes is under "
                f"{BURST_MESSAGES} messages of SMAPWS_MAX_MESSAGE_BYTES ({burst} bytes)"
            )
    bulk = config.get("proto-max-bulk-len")
    if bulk is not None and hard and _size(bulk) >= hard:
        problems.append(
            f"proto-max-bulk-len {_size(bulk)} lets one PUBLISH pass the pubsub hard "
            f"limit ({hard} bytes) and drop every subscriber"
        )
    return problems


async def config_get(client: aioredis.Redis) -> dict[str, str]:
    """asyncio side: ``CONFIG GET`` of the two settings :func:`limit_problems`
    reads."""
    out: dict[str, str] = {}
    for name in ("client-output-buffer-limit", "proto-max-bulk-len"):
        reply = await client.config_get(name)
        for key, value in reply.items():
            k = key.decode() if isinstance(key, bytes) else str(key)
            out[k] = value.decode() if isinstance(value, bytes) else str(value)
    return out
