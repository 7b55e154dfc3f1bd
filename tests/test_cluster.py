"""Redis Cluster (issue 10, point 2) against a real cluster: 3 masters with a
replica each, six ``redis-server --cluster-enabled yes`` processes made into
a cluster by ``redis-cli --cluster create`` once per test session.

Tests that kill a master restart it afterwards (it rejoins as a replica of
its successor) and wait for the cluster to be whole again. Each prints one
``FAULT ...`` line with what it measured (run with ``-s``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from smapws import Server, serve
from smapws._core.cluster import SlotMap, TopologyError
from smapws.publisher import Publisher

from .conftest import (
    API_KEY,
    PortTaken,
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
from .test_faults import ONCE, cut_short_then_answered, report, resyncs, wait_delivery

#: Short, so that a failover takes a second or two, not 15 (Redis's default).
NODE_TIMEOUT_MS = 1000


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def channel(user: str) -> bytes:
    return f"user_noti:{user}".encode()


class Cluster:
    """Six redis-server processes of the test session's own."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = [cluster_port() for _ in range(6)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start_node(self, port: int) -> None:
        """Start a node on ``port`` and wait until it answers; raises
        :class:`PortTaken` when it exited first."""
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed; run the test command from the README"
        d = self.workdir / str(port)
        d.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             # A replica syncs at once (Redis waits 5 s for more by default).
             "--repl-diskless-sync-delay", "0",
             "--save", "", "--appendonly", "no",
             "--dir", str(d), "--logfile", str(d / "redis.log")],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.procs[port].poll() is not None:
                del self.procs[port]
                raise PortTaken(f"redis-server exited at start on {port}")
            with contextlib.suppress(redis.ConnectionError), self.client(port) as c:
                if c.ping():
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {port} did not start")

    def create(self) -> None:
        for i in range(len(self.ports)):
            # A port chosen free may be taken before redis-server binds it
            # (or its bus port, +10000): most often as the ephemeral port of
            # a client's connection, from the same range. CI met it once.
            for _ in range(5):
                try:
                    self.start_node(self.ports[i])
                except PortTaken:
                    self.ports[i] = cluster_port()
                else:
                    break
            else:
                raise RuntimeError("no free port a cluster node could bind")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_whole()

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, **ONCE)

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def slots(self) -> SlotMap:
        """The map as the first live node that knows one tells it."""
        for port in self.alive():
            with contextlib.suppress(redis.RedisError, TopologyError), self.client(port) as c:
                slots = SlotMap.parse(c.execute_command("CLUSTER SLOTS"), ("127.0.0.1", port))
                if slots.covered:
                    return slots
        raise AssertionError("no live node knows the slots")

    def owner(self, user: str) -> int:
        address = self.slots().owner(key_slot(channel(user)))
        assert address is not None
        return address[1]

    def replica_of(self, master: int) -> int:
        """A live replica of ``master`` (its own view)."""
        for port in self.alive():
            with self.client(port) as c:
                info = c.info("replication")
            if info.get("role") == "slave" and int(info["master_port"]) == master:
                return port
        raise AssertionError(f"{master} has no replica")

    def wait_whole(self, timeout: float = 30) -> None:
        """Until every node is up and says the cluster is ok, with 3 masters
        that each have a replica in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, AssertionError):
                if self._whole():
                    return
            time.sleep(0.1)
        raise AssertionError("the cluster did not become whole")

    def _whole(self) -> bool:
        if len(self.alive()) != 6:
            return False
        for port in self.ports:
            with self.client(port) as c:
                if c.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                    return False
                info = c.info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        slots = self.slots()
        if len(slots.masters) != 3 or slots.covered != 16384:
            return False
        # Every master knows every replica (the failover election needs that).
        for _, port in slots.masters:
            with self.client(port) as c:
                nodes = c.execute_command("CLUSTER", "NODES").decode().splitlines()
            flags = [line.split()[2].split(",") for line in nodes]
            if sum(1 for f in flags if "slave" in f and "fail" not in f) != 3:
                return False
        return True

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.kill()
        proc.wait()

    def heal(self, port: int) -> None:
        """Restart a killed node (it rejoins, as a replica) and wait."""
        if self.procs[port].poll() is not None:
            self.start_node(port)
        self.wait_whole()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()

    def spublish(self, user: str, data: Any) -> int:
        """SPUBLISH, as a sharded publisher does, on the slot's owner now."""
        with self.client(self.owner(user)) as c:
            return int(c.spublish(channel(user), json.dumps(data)))

    def publish(self, user: str, data: Any, port: int | None = None) -> int:
        """A plain PUBLISH on ``port`` (default: the first live node)."""
        with self.client(port or self.alive()[0]) as c:
            return int(c.publish(channel(user), json.dumps(data)))


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="smapws-cluster-") as d:
        c = Cluster(Path(d))
        started = time.monotonic()
        try:
            c.create()
            print(f"\nCLUSTER created in {time.monotonic() - started:.1f} s")
            yield c
        finally:
            c.stop()


def seeds(cluster: Cluster) -> str:
    """Two of the six: the hub learns the rest."""
    return ",".join(f"127.0.0.1:{p}" for p in cluster.ports[:2])


def users_on_two_masters(cluster: Cluster) -> tuple[str, str]:
    """Two user ids whose slots belong to different masters."""
    slots = cluster.slots()
    first = "alice"
    owner = slots.owner(key_slot(channel(first)))
    for i in range(1000):
        other = f"bob{i}"
        if slots.owner(key_slot(channel(other))) != owner:
            return first, other
    raise AssertionError("no second master")


def api_body(user: str, via: str) -> bytes:
    message = {"type": "notification", "payload": {"via": via}}
    return json.dumps({"user_id": user, "message": message}).encode()


def probe_message(n: int) -> dict[str, Any]:
    return {"type": "probe_test", "payload": {"n": n}}


def quietly(publish: Callable[[int], object]) -> Callable[[int], object]:
    def attempt(n: int) -> object:
        with contextlib.suppress(redis.RedisError, AssertionError):
            return publish(n)
        return None

    return attempt


async def subscriber(hub: Server) -> dict[str, Any]:
    sub: dict[str, Any] = (await http(hub.port, "GET", "/health")).json()["subscriber"]
    return sub


@pytest.mark.parametrize("mode", ["pattern", "user"])
async def test_one_node_subscription_moves_when_its_node_dies(
    nursery: trio.Nursery, cluster: Cluster, mode: str
) -> None:
    """Pattern mode (and user mode without sharding) subscribe on one node:
    a PUBLISH on any node reaches it (the cluster relays plain PUBLISH), and
    when that node dies the hub moves to another one."""
    cfg = make_config(
        REDIS_CLUSTER_NODES=seeds(cluster),
        SMAPWS_SUBSCRIBE_MODE=mode,
        SMAPWS_REDIS_TIMEOUT=1,
        SMAPWS_PROBE_INTERVAL=1,
    )
    hub: Server = await nursery.start(serve, cfg)
    await wait_ready(hub)
    sub = await subscriber(hub)
    assert sub["url"] == "cluster://" + seeds(cluster)
    node = int(sub["server"].rpartition(":")[2])
    try:
        async with connect(hub, "c1") as ws:
            await wait_connections(hub, 1)
            # Another node relays it (its reply counts its own subscribers: 0).
            elsewhere = next(p for p in cluster.ports if p != node)
            assert cluster.publish("c1", probe_message(-1), port=elsewhere) == 0
            assert (await receive_json(ws))["payload"] == {"n": -1}
            # The publish API goes through the cluster (a plain PUBLISH).
            r = await http(
                hub.port, "POST", "/api/publish", body=api_body("c1", "api"),
                headers={"Authorization": f"Bearer {API_KEY}"},
            )  # fmt: skip
            assert r.status == 202
            assert (await receive_json(ws))["payload"] == {"via": "api"}
            if mode == "user":
                with cluster.client(node) as c:
                    assert c.pubsub_numsub(channel("c1")) == [(channel("c1"), 1)]
                    assert c.pubsub_numsub(channel("other")) == [(channel("other"), 0)]

            cluster.kill(node)
            killed_at = trio.current_time()
            publish = quietly(lambda n: cluster.publish("c1", probe_message(n)))
            arrived, frames = await wait_delivery(ws, publish, timeout=20)
            recovery = arrived - killed_at
            assert len(resyncs(frames)) == 1
            moved_to = int((await subscriber(hub))["server"].rpartition(":")[2])
            assert moved_to != node
    finally:
        await trio.to_thread.run_sync(cluster.heal, node)
    report(f"cluster_{mode}_node_killed", recovery_s=recovery)


async def test_sharded_user_mode_publish_paths_and_a_master_failover(
    nursery: trio.Nursery, cluster: Cluster
) -> None:
    cfg = make_config(
        REDIS_CLUSTER_NODES=seeds(cluster),
        SMAPWS_SUBSCRIBE_MODE="user",
        SMAPWS_SHARDED_PUBSUB="true",
        SMAPWS_REDIS_TIMEOUT=1,
        SMAPWS_PROBE_INTERVAL=1,
    )
    hub: Server = await nursery.start(serve, cfg)
    await wait_ready(hub)
    a, b = users_on_two_masters(cluster)
    master = cluster.owner(a)
    sub = await subscriber(hub)
    assert (sub["mode"], sub["sharded"], sub["slots_covered"]) == ("user", True, 16384)
    assert sorted(int(n["node"].rpartition(":")[2]) for n in sub["nodes"]) == sorted(
        p for _, p in cluster.slots().masters
    )
    try:
        async with connect(hub, a) as tab_a, connect(hub, b) as tab_b:
            await wait_connections(hub, 2)
            assert metric(hub, "websocket_subscribed_channels") == 2
            # Sharded: SPUBLISH reaches the hub, a plain PUBLISH does not.
            assert cluster.publish(a, probe_message(-3)) == 0
            assert cluster.spublish(a, probe_message(-2)) == 1
            assert (await receive_json(tab_a))["payload"] == {"n": -2}
            # The hub's own publish API and `smapws publish` use SPUBLISH.
            r = await http(
                hub.port, "POST", "/api/publish", body=api_body(a, "api"),
                headers={"Authorization": f"Bearer {API_KEY}"},
            )  # fmt: skip
            assert r.json() == {"status": "accepted", "hubs": 1, "receivers": 1}
            assert (await receive_json(tab_a))["payload"] == {"via": "api"}
            env = {
                **os.environ,
                "REDIS_CLUSTER_NODES": seeds(cluster),
                "SMAPWS_SUBSCRIBE_MODE": "user",
                "SMAPWS_SHARDED_PUBSUB": "true",
            }
            result = await trio.run_process(
                [sys.executable, "-m", "smapws", "publish", "--user", a,
                 "--type", "notification", "--payload", '{"via": "cli"}'],
                env=env, capture_stdout=True,
            )  # fmt: skip
            assert json.loads(result.stdout) == {"status": "published", "hubs": 1, "receivers": 1}
            assert (await receive_json(tab_a))["payload"] == {"via": "cli"}
            # The library, given a cluster client and sharded=True.
            startup = [ClusterNode("127.0.0.1", p) for p in cluster.ports[:2]]
            with Publisher(client=RedisCluster(startup_nodes=startup), sharded=True) as pub:
                assert pub.notify(a, "t", "m") == 1
            assert (await receive_json(tab_a))["payload"]["title"] == "t"

            # The master owning a's slot dies.
            cluster.kill(master)
            killed_at = trio.current_time()
            failover = 0.0

            async def watch_failover() -> None:
                nonlocal failover
                while True:
                    owner = await trio.to_thread.run_sync(quietly(lambda _: cluster.owner(a)), 0)
                    if owner not in (None, master):
                        failover = trio.current_time() - killed_at
                        return
                    await trio.sleep(0.05)

            async with trio.open_nursery() as watchers:
                watchers.start_soon(watch_failover)
                publish = quietly(lambda n: cluster.spublish(a, probe_message(n)))
                arrived, frames = await wait_delivery(tab_a, publish, timeout=30)
            resumed = arrived - killed_at
            # The watcher sees the new owner up to one poll (50 ms, plus its
            # thread hop) late: delivery may be seen back first within that.
            assert 0 < failover <= resumed + 0.2, (failover, resumed)
            (notice,) = resyncs(frames)
            assert notice["payload"]["reason"] == "subscriber_reconnected"
            # b's master never failed: b's first frame is its message, no resync.
            assert cluster.spublish(b, probe_message(7)) == 1
            assert (await receive_json(tab_b))["payload"] == {"n": 7}
            await wait_ready(hub, timeout=10)
            sub = await subscriber(hub)
            assert master not in [int(n["node"].rpartition(":")[2]) for n in sub["nodes"]]
    finally:
        await trio.to_thread.run_sync(cluster.heal, master)
    report(
        "cluster_sharded_master_killed",
        failover_s=failover,
        delivery_resumed_s=resumed,
        after_failover_s=resumed - failover,
    )


async def test_sharded_channels_follow_a_slot_move(nursery: trio.Nursery, cluster: Cluster) -> None:
    """A manual failover (``CLUSTER FAILOVER`` on a replica) moves the slots:
    the old master pushes ``sunsubscribe`` for their channels, and the hub
    subscribes them on the new master."""
    cfg = make_config(
        REDIS_CLUSTER_NODES=seeds(cluster),
        SMAPWS_SUBSCRIBE_MODE="user",
        SMAPWS_SHARDED_PUBSUB="true",
        SMAPWS_REDIS_TIMEOUT=1,
    )
    hub: Server = await nursery.start(serve, cfg)
    await wait_ready(hub)
    user = "mover"
    master = cluster.owner(user)
    replica = cluster.replica_of(master)
    async with connect(hub, user) as ws:
        await wait_connections(hub, 1)
        assert cluster.spublish(user, probe_message(-1)) == 1
        assert (await receive_json(ws))["payload"] == {"n": -1}
        with cluster.client(replica) as c:
            assert c.execute_command("CLUSTER FAILOVER") is True
        moved_at = trio.current_time()
        publish = quietly(lambda n: cluster.spublish(user, probe_message(n)))
        arrived, frames = await wait_delivery(ws, publish, timeout=20)
        assert cluster.owner(user) == replica
        (notice,) = resyncs(frames)
        assert notice["payload"]["reason"] == "subscriber_reconnected"
        with cluster.client(replica) as c:
            assert c.pubsub_shardnumsub(channel(user)) == [(channel(user), 1)]
        with cluster.client(master) as c:  # a replica now, holding nothing
            assert c.pubsub_shardnumsub(channel(user)) == [(channel(user), 0)]
    await trio.to_thread.run_sync(cluster.wait_whole)
    report("cluster_sharded_slot_moved", delivery_resumed_s=arrived - moved_at)


async def test_no_reachable_node_is_degraded_not_fatal(nursery: trio.Nursery) -> None:
    cfg = make_config(
        REDIS_CLUSTER_NODES=f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}",
        SMAPWS_SUBSCRIBE_MODE="user",
        SMAPWS_SHARDED_PUBSUB="true",
        SMAPWS_REDIS_TIMEOUT=0.5,
        SMAPWS_RECONNECT_MAX=0.2,
    )
    hub: Server = await nursery.start(serve, cfg)
    with trio.fail_after(5):
        while "Error" not in ((await subscriber(hub))["last_error"] or ""):
            await trio.sleep(0.05)
    sub = await subscriber(hub)
    assert sub["status"] == "connecting" and sub["slots_covered"] is None
    assert (await http(hub.port, "GET", "/ready")).status == 503
    # Tabs are served meanwhile; they get resync once their user is subscribed.
    async with connect(hub, "early"):
        await wait_connections(hub, 1)


async def test_a_standalone_redis_named_as_a_cluster_says_so(
    nursery: trio.Nursery, own_redis: Any
) -> None:
    cfg = make_config(
        REDIS_CLUSTER_NODES=f"127.0.0.1:{own_redis.port}",
        SMAPWS_REDIS_TIMEOUT=1,
        SMAPWS_RECONNECT_MAX=0.2,
    )
    hub: Server = await nursery.start(serve, cfg)
    with trio.fail_after(5):
        while "cluster support disabled" not in ((await subscriber(hub))["last_error"] or ""):
            await trio.sleep(0.05)
    assert (await http(hub.port, "GET", "/ready")).status == 503


async def test_fleet_log_appends_of_one_call_share_a_slot(cluster: Cluster) -> None:
    """The append script takes many entries per call; on a cluster the keys
    of one call must share a slot (redis-py refuses the call otherwise, and
    every append of the pipeline would fail): users on every master, two
    entries each in one batch, are all written, in order."""
    import trio_asyncio

    from smapws._core.fleet import GENESIS, encode_entry, log_key
    from smapws._io.brokers.redis import ClusterTarget, PublishClient
    from smapws._io.fleetlog import FleetLog
    from smapws.metrics import Metrics

    metrics = Metrics()
    target = ClusterTarget(tuple(("127.0.0.1", p) for p in cluster.ports[:2]))
    log = FleetLog(
        PublishClient(target, timeout=5.0),
        ttl=300.0,
        per_user=100,
        max_bytes=1 << 24,
        metrics=metrics,
    )
    users = [f"slots{time.monotonic_ns()}-{n}" for n in range(200)]
    owners = {cluster.owner(user) for user in users}
    assert len(owners) == 3
    first, second = "1" * 16, "2" * 16
    entries = {
        user: [encode_entry(first, GENESIS, 0, b"a"), encode_entry(second, first, 0, b"b")]
        for user in users
    }
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(log.run, lambda channel: None)
        for k in range(2):
            for user in users:
                log.append_nowait(channel(user), entries[user][k])
        with trio.fail_after(10):
            await log.flush()
        nursery.cancel_scope.cancel()
        await log.aclose()
    name = "websocket_fleet_log_appends_total"
    assert metrics.registry.get_sample_value(name, {"result": "written"}) == 2 * len(users)
    assert metrics.registry.get_sample_value(name, {"result": "failed"}) == 0
    startup = [ClusterNode("127.0.0.1", p) for p in cluster.ports[:2]]
    with RedisCluster(startup_nodes=startup) as c:
        for user in users:
            assert c.lrange(log_key(channel(user)), 0, -1) == entries[user]


@pytest.mark.parametrize("cut_by", ["its deadline", "a cancellation", "a frozen seed"])
async def test_a_cluster_call_cut_short_leaves_no_reply_for_the_next_one(
    nursery: trio.Nursery, cluster: Cluster, mock_clock: Any, monkeypatch: Any, cut_by: str
) -> None:
    """The cluster variant of test_faults' frozen-link tests (the publishing
    client has no socket timeout inside redis-py since fd992b7): through a
    proxy per node (the client is told to reach each node the cluster names
    through its proxy), a node whose link froze fails the call at
    SMAPWS_REDIS_TIMEOUT exactly; so does the first call's topology
    discovery when the seeds' links are frozen; and a call cancelled by its
    caller keeps the client, whose next call, once the link moves, gets its
    own answer, not the cut command's (a ClusterNode's connection
    disconnects on the cancellation as a plain one does)."""
    import trio_asyncio

    from smapws._io.brokers.redis import ClusterTarget, PublishClient
    from smapws._io.brokers.redis import client as client_module

    proxies: dict[int, TcpProxy] = {}
    for port in cluster.ports:
        proxies[port] = await nursery.start(TcpProxy(port).run)
    by_proxy = {proxy.port: proxy for proxy in proxies.values()}

    def through_proxy(address: tuple[str, int]) -> tuple[str, int]:
        host, port = address
        return (host, proxies[port].port) if port in proxies else address

    class ThroughProxies(client_module.RedisCluster):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, address_remap=through_proxy, **kwargs)

    monkeypatch.setattr(client_module, "RedisCluster", ThroughProxies)
    seeds = tuple(("127.0.0.1", proxies[port].port) for port in cluster.ports[:2])
    client = PublishClient(ClusterTarget(seeds), timeout=8)
    key = f"cut{time.monotonic_ns()}"

    def echo(word: bytes) -> list[tuple[Any, ...]]:
        return [("EVAL", "return ARGV[1]", 1, key, word)]

    async with trio_asyncio.open_loop():
        if cut_by == "a frozen seed":
            for proxy in by_proxy.values():
                proxy.freeze()
        else:
            assert await client.pipeline(echo(b"zeroth")) == [b"zeroth"]
            for proxy in by_proxy.values():
                proxy.freeze_existing()  # new connections work
        await cut_short_then_answered(
            client,
            by_proxy.values(),
            mock_clock,
            echo(b"first"),
            echo,
            by_deadline=cut_by != "a cancellation",
        )
        await client.aclose()
