"""Issue 16, point 2: the hub is never the slow reader of Redis, and when
Redis's own limits let it drop the subscription, the hub says so.

Each test runs its own redis-server (``own_redis``) at Redis's default limits
(``client-output-buffer-limit pubsub 32mb 8mb 60``, ``proto-max-bulk-len
512mb``) or with the README's recommended ones (set with ``CONFIG SET``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
import trio

from smapws import Server, serve

from .conftest import (
    RedisServer,
    connect,
    make_config,
    metric,
    receive_json,
    wait_connections,
    wait_ready,
)

#: The README's recommended settings (its "Redis" section).
RECOMMENDED = {"client-output-buffer-limit": "pubsub 256mb 128mb 60", "proto-max-bulk-len": "1mb"}

#: One publish just over Redis's default pubsub hard limit (32 MiB).
HUGE = 33 * 1024 * 1024


def recommend(server: RedisServer) -> None:
    with server.client() as c:
        for name, value in RECOMMENDED.items():
            c.config_set(name, value)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Redis can drop")]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="smapws")
    yield caplog


async def start_hub(nursery: trio.Nursery, server: RedisServer) -> Server:
    hub: Server = await nursery.start(serve, make_config(REDIS_URL=server.url))
    await wait_ready(hub)
    return hub


async def test_default_limits_are_warned_about_once_naming_the_fix(
    nursery: trio.Nursery, own_redis: RedisServer, logs: pytest.LogCaptureFixture
) -> None:
    await start_hub(nursery, own_redis)
    found = warnings(logs)
    assert len(found) == 1
    assert "pubsub hard limit 33554432" in found[0]
    assert "proto-max-bulk-len 536870912" in found[0]
    record = next(r for r in logs.records if r.getMessage() == found[0])
    assert "client-output-buffer-limit 'pubsub 256mb 128mb 60'" in str(record.smapws_fields)


async def test_recommended_limits_are_not_warned_about(
    nursery: trio.Nursery, own_redis: RedisServer, logs: pytest.LogCaptureFixture
) -> None:
    recommend(own_redis)
    await start_hub(nursery, own_redis)
    assert warnings(logs) == []


def test_limit_problems_reads_redis_notation() -> None:
    from smapws._io.brokers.redis import limit_problems

    default = {
        "client-output-buffer-limit": (
            "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60"
        ),
        "proto-max-bulk-len": "536870912",
    }
    assert len(limit_problems(default, 65536)) == 3  # hard, soft, bulk
    assert (
        limit_problems(RECOMMENDED | {"client-output-buffer-limit": "pubsub 256mb 128mb 60"}, 65536)
        == []
    )
    assert limit_problems({"client-output-buffer-limit": "pubsub 0 0 0"}, 65536) == []  # no limit
    with pytest.raises(ValueError):  # the broker logs it could not check
        limit_problems({"client-output-buffer-limit": "pubsub lots 0 0"}, 65536)


async def test_a_33mb_publish_at_default_limits_is_a_counted_logged_disconnect(
    nursery: trio.Nursery, own_redis: RedisServer, logs: pytest.LogCaptureFixture
) -> None:
    hub = await start_hub(nursery, own_redis)
    with own_redis.client() as c:
        c.publish("user_noti:mallory", b"x" * HUGE)
    with trio.fail_after(10):
        while metric(hub, "websocket_broker_disconnects_total", {"cause": "closed_by_server"}) < 1:
            await trio.sleep(0.02)
    dropped = [r for r in logs.records if r.getMessage() == "Redis subscription dropped"]
    assert dropped and dropped[0].smapws_fields["cause"] == "closed_by_server"  # type: ignore[attr-defined]
    assert "client-output-buffer-limit" in dropped[0].smapws_fields["hint"]  # type: ignore[attr-defined]
    await wait_ready(hub)  # and it comes back


async def test_with_recommended_limits_a_33mb_publish_is_refused_and_the_bystander_keeps_receiving(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    recommend(own_redis)
    hub = await start_hub(nursery, own_redis)
    async with connect(hub, "bystander") as tab:
        await wait_connections(hub, 1)
        with own_redis.client() as c, pytest.raises((redis.ResponseError, redis.ConnectionError)):
            c.publish("user_noti:mallory", b"x" * HUGE)  # Redis refuses it (closes the publisher)
        # Max-size messages past the old 32 MiB limit, pipelined: Redis holds
        # them for the hub instead of dropping it.
        big = b'{"type":"notification","payload":{"p":"' + b"x" * 65_000 + b'"}}'
        with own_redis.client() as c:
            pipe = c.pipeline(transaction=False)
            for _ in range(600):
                pipe.publish("user_noti:flood", big)
            pipe.execute()
        own_redis.publish("bystander", {"type": "notification", "payload": {"n": 1}})
        assert (await receive_json(tab, timeout=20))["payload"] == {"n": 1}
    assert metric(hub, "websocket_broker_disconnects_total", {"cause": "closed_by_server"}) == 0
    assert metric(hub, "websocket_resync_messages_total") == 0


async def test_messages_over_the_bound_are_discarded_unparsed_without_taking_queue_places(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    # A router queue of 4 places: the oversized messages must not take them.
    hub: Server = await nursery.start(
        serve,
        make_config(REDIS_URL=own_redis.url, SMAPWS_INGEST_QUEUE=4, SMAPWS_MAX_MESSAGE_BYTES=1024),
    )
    await wait_ready(hub)
    async with connect(hub, "bystander") as tab:
        await wait_connections(hub, 1)
        with own_redis.client() as c:
            pipe = c.pipeline(transaction=False)
            for _ in range(200):
                pipe.publish("user_noti:mallory", b"{" + b" " * 2000 + b"}")
            pipe.publish("user_noti:bystander", b'{"type":"notification","payload":{"n":2}}')
            pipe.execute()
        assert (await receive_json(tab))["payload"] == {"n": 2}
    assert metric(hub, "websocket_broker_messages_invalid_total", {"reason": "too_large"}) == 200
    assert metric(hub, "websocket_broker_messages_dropped_total") == 0


async def test_where_config_is_refused_the_hub_says_it_could_not_check_and_serves(
    nursery: trio.Nursery, own_redis: RedisServer, logs: pytest.LogCaptureFixture
) -> None:
    with own_redis.client() as c:  # a Redis user without CONFIG, as on managed Redis
        c.execute_command("ACL", "SETUSER", "hub", "on", ">hubpass", "~*", "&*", "+@all", "-config")
    url = f"redis://hub:hubpass@127.0.0.1:{own_redis.port}/0"
    hub: Server = await nursery.start(serve, make_config(REDIS_URL=url))
    await wait_ready(hub)
    assert warnings(logs) == []
    assert [r for r in logs.records if r.getMessage() == "Redis limits not checked"]
    assert "hubpass" not in logs.text


async def test_a_message_dropped_before_the_router_gets_every_tab_a_resync(
    nursery: trio.Nursery, own_redis: RedisServer, logs: pytest.LogCaptureFixture
) -> None:
    # A router queue of 4 places and a pipelined burst: the read loop drops
    # what does not fit. Nobody knows whose messages those were, so every tab
    # is told, once, and no window replays across the hole (issue 16's soak:
    # 69 messages lost without a word while the router fell behind).
    hub: Server = await nursery.start(
        serve, make_config(REDIS_URL=own_redis.url, SMAPWS_INGEST_QUEUE=4)
    )
    await wait_ready(hub)
    async with connect(hub, "flooded") as tab, connect(hub, "bystander") as other:
        await wait_connections(hub, 2)
        body = b'{"type":"notification","payload":{"n":%d}}'
        with own_redis.client() as c:
            pipe = c.pipeline(transaction=False)
            for n in range(2000):
                pipe.publish("user_noti:flooded", body % n)
            pipe.execute()
        seen: list[int] = []
        with trio.fail_after(10):
            while True:
                msg = await receive_json(tab)
                if msg["type"] == "resync":
                    assert msg["payload"]["reason"] == "dropped"
                    break
                seen.append(msg["payload"]["n"])
        msg = await receive_json(other)
        assert (msg["type"], msg["payload"]["reason"]) == ("resync", "dropped")
    dropped = metric(hub, "websocket_broker_messages_dropped_total")
    assert dropped > 0 and len(seen) < 2000
    assert seen == sorted(seen)
    assert any("router's queue is full" in r.getMessage() for r in logs.records)
