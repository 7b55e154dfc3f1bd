"""A live hub fed garbage (issue 8, point 3): what the fuzzing found."""

from __future__ import annotations

from smapws import Server

from .conftest import RedisServer, connect, metric, receive_json, wait_connections


async def test_escaped_quotes_cannot_hold_the_router(
    redis_hub: Server, redis_server: RedisServer
) -> None:
    """Brackets past the depth bound, then an unterminated string of escaped
    quotes: the depth scan rescanned the rest of the text from every quote,
    and one 64 KiB message held the hub (every tab, every request) for 90 s.
    Now it is dropped at once and the next message is delivered."""
    async with connect(redis_hub, "u1") as ws:
        await wait_connections(redis_hub, 1)
        attack = b"[" * 33 + b'"' + b'\\"' * 32_000
        assert len(attack) > 64_000
        redis_server.publish("u1", attack)
        redis_server.publish("u1", {"type": "notification", "payload": {"n": 1}})
        assert (await receive_json(ws))["payload"] == {"n": 1}
    reason = {"reason": "too_deep"}
    assert metric(redis_hub, "websocket_broker_messages_invalid_total", reason) == 1
