"""SMAPWS_SUBSCRIBE_MODE=user against a real redis-server: one SUBSCRIBE per
user served, batched, coalesced, restored after a reconnect.

What Redis itself says (``PUBSUB NUMSUB``, ``INFO commandstats``, the
receivers a ``PUBLISH`` reports) is the evidence; the hub's own metrics are
checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from smapws import Server, serve
from smapws._config import ConfigError, load
from smapws._core.subscriptions import BATCH

from .conftest import (
    API_KEY,
    SECRET,
    RedisServer,
    connect,
    free_port,
    http,
    make_config,
    metric,
    receive_json,
    wait_connections,
    wait_ready,
)
from .tcpproxy import TcpProxy
from .test_faults import publisher_for, report, resyncs, wait_delivery

COMMANDS = "websocket_subscription_commands_total"
SUBSCRIBED = "websocket_subscribed_channels"


def numsub(server: RedisServer, *users: str) -> dict[str, int]:
    with server.client() as c:
        pairs = c.pubsub_numsub(*[f"user_noti:{u}" for u in users])
    return {ch.decode().removeprefix("user_noti:"): n for ch, n in pairs}


def command_calls(server: RedisServer) -> dict[str, int]:
    """How many SUBSCRIBE / UNSUBSCRIBE / PSUBSCRIBE commands Redis ran."""
    with server.client() as c:
        stats = c.info("commandstats")
    return {
        name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("subscribe", "unsubscribe", "psubscribe")
    }


async def user_hub(nursery: trio.Nursery, url: str, **settings: Any) -> Server:
    cfg = make_config(REDIS_URL=url, SMAPWS_SUBSCRIBE_MODE="user", **settings)
    server: Server = await nursery.start(serve, cfg)
    await wait_ready(server)
    return server


async def until(check: Any, timeout: float = 5, what: str = "") -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


async def test_one_subscription_per_user_served_and_nothing_else(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    hub = await user_hub(nursery, own_redis.url)
    health = (await http(hub.port, "GET", "/health")).json()["subscriber"]
    assert (health["mode"], health["pattern"], health["subscribed_channels"]) == ("user", None, 0)
    async with connect(hub, "u1") as tab1, connect(hub, "u1") as tab2, connect(hub, "u2") as u2:
        await wait_connections(hub, 3)
        # One subscription per user, whatever the number of tabs; no pattern.
        assert numsub(own_redis, "u1", "u2", "u3") == {"u1": 1, "u2": 1, "u3": 0}
        assert command_calls(own_redis)["psubscribe"] == 0
        assert metric(hub, SUBSCRIBED) == 2
        # A user with no tab here costs this hub nothing: Redis sends it nowhere.
        assert own_redis.publish("u3", {"type": "notification", "payload": {}}) == 0
        assert own_redis.publish("u1", {"type": "notification", "payload": {"n": 1}}) == 1
        for tab in (tab1, tab2):
            assert (await receive_json(tab))["payload"] == {"n": 1}
        own_redis.publish("u2", {"type": "notification", "payload": {"for": "u2"}})
        assert (await receive_json(u2))["payload"] == {"for": "u2"}
        assert metric(hub, "websocket_broker_messages_received_total") == 2
        health = (await http(hub.port, "GET", "/health")).json()["subscriber"]
        assert health["subscribed_channels"] == 2


async def test_last_tab_closed_unsubscribes_after_the_linger_and_a_reload_costs_nothing(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    linger = 0.5
    hub = await user_hub(nursery, own_redis.url, SMAPWS_SUBSCRIBE_LINGER=linger)
    async with connect(hub, "r1") as tab:
        await wait_connections(hub, 1)
        own_redis.publish("r1", {"type": "notification", "payload": {"n": 0}})
        assert (await receive_json(tab))["payload"] == {"n": 0}
    before = command_calls(own_redis)
    sent_before = metric(hub, COMMANDS, {"command": "subscribe"})
    # A reload: the tab closed, and the same user is back well within the linger.
    async with connect(hub, "r1") as tab:
        await wait_connections(hub, 1)
        own_redis.publish("r1", {"type": "notification", "payload": {"n": 1}})
        assert (await receive_json(tab))["payload"] == {"n": 1}
    assert command_calls(own_redis) == before  # not one (UN)SUBSCRIBE
    assert metric(hub, COMMANDS, {"command": "subscribe"}) == sent_before
    assert numsub(own_redis, "r1") == {"r1": 1}  # still lingering
    closed_at = trio.current_time()
    await until(lambda: numsub(own_redis, "r1") == {"r1": 0}, timeout=5)
    waited = trio.current_time() - closed_at
    assert waited >= linger * 0.9, waited
    assert command_calls(own_redis)["unsubscribe"] == before["unsubscribe"] + 1
    await until(lambda: metric(hub, SUBSCRIBED) == 0)  # once confirmed
    await until(lambda: metric(hub, COMMANDS, {"command": "unsubscribe"}) >= 1)
    assert metric(hub, COMMANDS, {"command": "unsubscribe"}) == 1


async def test_many_users_cost_a_few_batched_commands(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    """1,200 users arriving together: ceil(1200 / 512) = 3 SUBSCRIBEs, not
    1,200; and as few UNSUBSCRIBEs once they have all gone. Driven through
    the hub's own entry points (an upgrade starting and finishing), so no
    1,200 sockets are needed; Redis counts the commands."""
    hub = await user_hub(nursery, own_redis.url, SMAPWS_SUBSCRIBE_LINGER=0.2)
    users = [f"bulk{i}" for i in range(1200)]
    before = command_calls(own_redis)
    app = hub.app
    for user in users:  # all in the same instant, as in a reconnect storm
        app.upgrade_started(user)
    await until(lambda: metric(hub, SUBSCRIBED) == len(users), timeout=10)
    calls = command_calls(own_redis)
    expected = -(-len(users) // BATCH)
    assert calls["subscribe"] - before["subscribe"] == expected
    # Counted once the send returned (the confirmations may come first).
    await until(lambda: metric(hub, COMMANDS, {"command": "subscribe"}) >= expected)
    assert metric(hub, COMMANDS, {"command": "subscribe"}) == expected
    assert set(numsub(own_redis, *users[::97]).values()) == {1}
    for user in users:
        app.upgrade_finished(user)
    await until(lambda: metric(hub, SUBSCRIBED) == 0, timeout=10)
    calls = command_calls(own_redis)
    assert calls["unsubscribe"] - before["unsubscribe"] == expected
    assert set(numsub(own_redis, *users[::97]).values()) == {0}
    assert len(app.channels.core) == 0  # type: ignore[union-attr]


async def test_a_new_tab_opens_only_once_subscribed(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    """The 101 waits for Redis's confirmation: whatever is published after
    the tab's ``open`` reaches it. The link is held still (a frozen proxy)
    while the tab connects; the tab does not open meanwhile; a message
    published then (Redis has no subscriber yet) is not delivered; the
    first one published after ``open`` is."""
    proxy: TcpProxy = await nursery.start(TcpProxy(own_redis.port).run)
    # A long probe interval: the freeze must not end the session.
    hub = await user_hub(nursery, proxy.url, SMAPWS_PROBE_INTERVAL=60)
    opened: list[float] = []
    frames: list[Any] = []

    async def tab() -> None:
        async with connect(hub, "w1") as ws:
            opened.append(trio.current_time())
            frames.append(await receive_json(ws, timeout=10))

    proxy.freeze()
    async with trio.open_nursery() as tabs:
        tabs.start_soon(tab)
        await trio.sleep(0.5)
        assert opened == []  # still waiting for the subscription
        assert own_redis.publish("w1", {"type": "notification", "payload": {"n": "early"}}) == 0
        thawed = trio.current_time()
        proxy.thaw()
        await until(lambda: bool(opened), timeout=5)
        assert opened[0] >= thawed
        assert own_redis.publish("w1", {"type": "notification", "payload": {"n": "late"}}) == 1
    assert [f["payload"] for f in frames] == [{"n": "late"}]


async def test_reconnect_subscribes_every_served_user_again(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    hub = await user_hub(nursery, own_redis.url)
    async with connect(hub, "k1") as k1, connect(hub, "k2") as k2:
        await wait_connections(hub, 2)
        reconnects = metric(hub, "websocket_subscriber_reconnects_total")
        with own_redis.client() as c:
            assert int(c.execute_command("CLIENT", "KILL", "TYPE", "pubsub")) >= 1
        killed_at = trio.current_time()
        arrived, frames = await wait_delivery(k1, publisher_for(own_redis, "k1"))
        recovery = arrived - killed_at
        assert metric(hub, "websocket_subscriber_reconnects_total") > reconnects
        # Each user's tabs are told about their gap, first.
        (notice,) = resyncs(frames)
        assert notice["payload"]["reason"] == "subscriber_reconnected"
        assert 0 < notice["payload"]["down_s"] < 2
        assert (await receive_json(k2))["type"] == "resync"
        assert numsub(own_redis, "k1", "k2") == {"k1": 1, "k2": 1}
        await wait_ready(hub)
    assert metric(hub, "websocket_resync_messages_total") == 2
    report("usermode_client_kill", recovery_s=recovery)


async def test_the_liveness_probe_still_finds_a_silent_link(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    interval = 0.5
    proxy: TcpProxy = await nursery.start(TcpProxy(own_redis.port).run)
    hub = await user_hub(nursery, proxy.url, SMAPWS_PROBE_INTERVAL=interval, SMAPWS_REDIS_TIMEOUT=1)
    async with connect(hub, "h1") as ws:
        await wait_connections(hub, 1)
        proxy.freeze_existing()
        frozen_at = trio.current_time()
        arrived, frames = await wait_delivery(ws, publisher_for(own_redis, "h1"))
        recovery = arrived - frozen_at
        assert recovery < 2 * interval + 2, recovery
        assert len(resyncs(frames)) == 1
        assert proxy.accepted >= 2
    report("usermode_half_open", recovery_s=recovery)


async def test_a_tab_opened_while_redis_is_down_gets_resync_then_messages(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    late = RedisServer(free_port(), tmp_path)
    cfg = make_config(
        REDIS_URL=late.url,
        SMAPWS_SUBSCRIBE_MODE="user",
        SMAPWS_RECONNECT_MAX=0.3,
        SMAPWS_REDIS_TIMEOUT=1,
    )
    hub: Server = await nursery.start(serve, cfg)
    try:
        async with connect(hub, "late") as ws:  # not held back: nothing to wait for
            await wait_connections(hub, 1)
            late.start()
            await wait_ready(hub)
            _, frames = await wait_delivery(ws, publisher_for(late, "late"))
            (notice,) = resyncs(frames)
            assert notice["payload"]["reason"] == "subscriber_reconnected"
    finally:
        late.kill()


async def test_the_current_state_follows_the_subscription(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    """User mode: a user's current state is held while subscribed (a second
    tab, or a reload within the linger, gets it) and forgotten when the
    subscription ends (it would be stale: this hub no longer hears about it)."""
    hub = await user_hub(nursery, own_redis.url, SMAPWS_SUBSCRIBE_LINGER=0.3)
    progress = {"type": "project_progress", "payload": {"project_id": "p", "done": 5}}
    async with connect(hub, "s1") as tab:
        await wait_connections(hub, 1)
        own_redis.publish("s1", progress)
        assert (await receive_json(tab))["payload"]["done"] == 5
        async with connect(hub, "s1") as second:
            assert (await receive_json(second))["payload"]["done"] == 5
    async with connect(hub, "s1") as reload:  # within the linger
        assert (await receive_json(reload))["payload"]["done"] == 5
    await until(lambda: numsub(own_redis, "s1") == {"s1": 0})
    await until(lambda: metric(hub, "websocket_snapshot_entries") == 0)
    async with connect(hub, "s1") as later:
        await wait_connections(hub, 1)
        own_redis.publish("s1", {"type": "notification", "payload": {"first": True}})
        first = json.loads(await later.recv())
        assert first["payload"] == {"first": True}  # no stale progress before it


async def test_publish_paths_are_unchanged(nursery: trio.Nursery, own_redis: RedisServer) -> None:
    """User mode changes who subscribes, not how to publish: the API and a
    plain PUBLISH reach the user's tabs."""
    hub = await user_hub(nursery, own_redis.url)
    async with connect(hub, "p1") as ws:
        await wait_connections(hub, 1)
        body = json.dumps(
            {"user_id": "p1", "message": {"type": "notification", "payload": {"x": 1}}}
        ).encode()
        r = await http(
            hub.port, "POST", "/api/publish", body=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        )  # fmt: skip
        assert r.json() == {"status": "accepted", "hubs": 1, "receivers": 1}
        assert (await receive_json(ws))["payload"] == {"x": 1}
    with redis.Redis(port=own_redis.port) as c:
        assert c.pubsub_numpat() == 0


def test_mode_settings_are_validated() -> None:
    base = {"JWT_SECRET": SECRET}
    cfg = load(base | {"REDIS_CLUSTER_NODES": "10.0.0.1:7000, 10.0.0.2", "REDIS_URL": "redis://x"})
    assert cfg.redis_cluster_nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379))
    assert cfg.broker == "redis" and cfg.redis_url is None  # the cluster wins
    assert cfg.redis_url_redacted == "cluster://10.0.0.1:7000,10.0.0.2:6379"
    assert (cfg.subscribe_mode, cfg.subscribe_linger, cfg.sharded_pubsub) == ("pattern", 5.0, False)
    sharded = load(
        base
        | {
            "REDIS_CLUSTER_NODES": "h:1",
            "SMAPWS_SUBSCRIBE_MODE": "USER",
            "SMAPWS_SHARDED_PUBSUB": "true",
        }
    )
    assert (sharded.subscribe_mode, sharded.sharded_pubsub) == ("user", True)
    for env, named in [
        ({"SMAPWS_SUBSCRIBE_MODE": "user"}, "SMAPWS_SUBSCRIBE_MODE"),  # no Redis
        ({"SMAPWS_SUBSCRIBE_MODE": "channels", "REDIS_URL": "redis://x"}, "SMAPWS_SUBSCRIBE_MODE"),
        ({"SMAPWS_SHARDED_PUBSUB": "true", "REDIS_CLUSTER_NODES": "h:1"}, "SMAPWS_SHARDED_PUBSUB"),
        (
            {
                "SMAPWS_SHARDED_PUBSUB": "1",
                "SMAPWS_SUBSCRIBE_MODE": "user",
                "REDIS_URL": "redis://x",
            },
            "SMAPWS_SHARDED_PUBSUB",
        ),
        (
            {"REDIS_CLUSTER_NODES": "h:1", "REDIS_SENTINELS": "s:1", "REDIS_SENTINEL_MASTER": "m"},
            "REDIS_CLUSTER_NODES",
        ),
        ({"REDIS_CLUSTER_NODES": "h:port"}, "REDIS_CLUSTER_NODES"),
        ({"SMAPWS_SUBSCRIBE_LINGER": "-1", "REDIS_URL": "redis://x"}, "SMAPWS_SUBSCRIBE_LINGER"),
    ]:
        with pytest.raises(ConfigError, match=f"^{named}:"):
            load(base | env)
