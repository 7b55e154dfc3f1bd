"""Nothing from outside stops the hub (issue 8): a fault injected at each
barrier costs one message or one connection, never another tab's delivery,
and never the process. Real sockets, a real redis-server."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from smapws import Server, serve
from smapws._core.snapshot import Snapshots
from smapws._io import connection as connection_module
from smapws._io import frontdoor
from smapws._io.brokers.redis import RedisBroker
from smapws._io.connection import Connection

from .conftest import (
    API_KEY,
    UPGRADE_HEADERS,
    RedisServer,
    close_code,
    connect,
    http,
    make_config,
    metric,
    parse_frames,
    receive_json,
    wait_connections,
    wait_ready,
)
from .test_websocket import memory_app, memory_client, route, running, silent_client

ERRORS = "websocket_internal_errors_total"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    handler = _Records()
    log = logging.getLogger("smapws")
    log.addHandler(handler)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)


def _internal(records: list[logging.LogRecord], where: str) -> list[logging.LogRecord]:
    return [
        r
        for r in records
        if r.getMessage() == "internal error" and r.smapws_fields["where"] == where  # type: ignore[attr-defined]
    ]


async def test_a_message_that_breaks_routing_is_dropped_and_routing_goes_on(
    redis_hub: Server,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    records: list[logging.LogRecord],
) -> None:
    real_observe = Snapshots.observe

    def observe(self: Snapshots, user: str, env: Any, now: float) -> None:
        if user == "victim":
            raise RuntimeError("injected fault in routing")
        real_observe(self, user, env, now)

    monkeypatch.setattr(Snapshots, "observe", observe)
    progress = {"type": "project_progress", "payload": {"project_id": "p1", "done": 1}}
    async with connect(redis_hub, "victim") as victim, connect(redis_hub, "bystander") as other:
        await wait_connections(redis_hub, 2)
        redis_server.publish("victim", progress)
        redis_server.publish("bystander", progress)
        assert (await receive_json(other))["payload"]["done"] == 1
        # Routing went on: the next message for the victim (a type that
        # does not reach the faulty code) is delivered too.
        redis_server.publish("victim", {"type": "notification", "payload": {"n": 2}})
        assert (await receive_json(victim))["payload"] == {"n": 2}
    assert metric(redis_hub, ERRORS, {"where": "route"}) == 1
    (record,) = _internal(records, "route")
    assert record.exc_info is not None and "injected fault" in str(record.exc_info[1])


async def test_a_connection_that_fails_after_the_upgrade_gets_1011_alone(
    memory_hub: Server, monkeypatch: pytest.MonkeyPatch, records: list[logging.LogRecord]
) -> None:
    real_run = connection_module.run

    async def run(app: Any, stream: Any, conn: Connection, *rest: Any) -> None:
        if conn.user_id == "victim":
            raise RuntimeError("injected fault in a connection")
        await real_run(app, stream, conn, *rest)

    monkeypatch.setattr(connection_module, "run", run)
    async with connect(memory_hub, "bystander") as other:
        async with connect(memory_hub, "victim") as victim:
            assert await close_code(victim) == 1011
        await _publish(memory_hub, "bystander", {"type": "notification", "payload": {}})
        assert (await receive_json(other))["type"] == "notification"
    assert metric(memory_hub, ERRORS, {"where": "connection"}) == 1
    assert len(_internal(records, "connection")) == 1
    assert (await http(memory_hub.port, "GET", "/health")).status == 200


async def test_a_request_that_fails_before_the_upgrade_gets_500_alone(
    memory_hub: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(app: Any, head: Any) -> Any:
        raise KeyError("injected fault before the upgrade")

    async with connect(memory_hub, "bystander") as other:
        monkeypatch.setattr(frontdoor, "_check_upgrade", broken)
        r = await http(
            memory_hub.port,
            "GET",
            "/ws",
            headers=UPGRADE_HEADERS,
        )
        assert r.status == 500
        await _publish(memory_hub, "bystander", {"type": "alert", "payload": {}})
        assert (await receive_json(other))["type"] == "alert"
    assert metric(memory_hub, ERRORS, {"where": "connection"}) == 1


async def test_a_heartbeat_fault_closes_that_connection_with_1011(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Connection.heartbeat

    def heartbeat(self: Connection, now: float) -> None:
        if self.user_id == "victim":
            raise ZeroDivisionError("injected fault in a heartbeat")
        real(self, now)

    monkeypatch.setattr(Connection, "heartbeat", heartbeat)
    app = memory_app()
    victim_side, victim_server = trio.testing.memory_stream_pair()
    other_side, other_server = trio.testing.memory_stream_pair()
    async with running(app) as nursery:
        nursery.start_soon(frontdoor.handle, app, other_server)
        nursery.start_soon(frontdoor.handle, app, victim_server)
        other = await memory_client(nursery, other_side, "bystander")
        data = await silent_client(victim_side, "victim")
        assert route(app, "bystander", after=True) == 1
        assert json.loads(await other.get_message())["payload"] == {"after": True}
        await other.aclose()
    frames = parse_frames(data)
    assert frames[-1][0] == 0x8
    assert struct.unpack("!H", frames[-1][1][:2])[0] == 1011
    # Once a tick until the connection is gone (the close handshake takes
    # SMAPWS_WRITE_WAIT): each is counted.
    assert app.metrics.registry.get_sample_value(ERRORS, {"where": "heartbeat"}) >= 1


async def test_a_broker_fault_restarts_the_subscription_and_delivery_resumes(
    nursery: trio.Nursery, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = RedisBroker._probe_answered
    faults: list[Exception] = []

    def probe_answered(self: RedisBroker, rtt: float) -> None:
        if faults:
            raise faults.pop()
        real(self, rtt)

    # Patched before the hub starts: the broker binds its callbacks then.
    monkeypatch.setattr(RedisBroker, "_probe_answered", probe_answered)
    config = make_config(REDIS_URL=redis_server.url, SMAPWS_PROBE_INTERVAL=0.2)
    redis_hub: Server = await nursery.start(serve, config)
    await wait_ready(redis_hub)
    async with connect(redis_hub, "u1") as ws:
        await wait_connections(redis_hub, 1)
        faults.append(RuntimeError("injected fault in the broker loop"))
        with trio.fail_after(20):
            while not metric(redis_hub, ERRORS, {"where": "broker"}):
                await trio.sleep(0.05)
        await wait_ready(redis_hub, 20)
        # Resubscribed after the fault: the tab is told it may have missed
        # messages, then gets new ones.
        assert (await receive_json(ws, 10))["type"] == "resync"
        redis_server.publish("u1", {"type": "notification", "payload": {"after": True}})
        assert (await receive_json(ws, 10))["payload"] == {"after": True}
    assert redis_hub.app.broker.info()["reconnects"] >= 1


async def _publish(server: Server, user: str, message: dict[str, Any]) -> None:
    r = await http(
        server.port,
        "POST",
        "/api/publish",
        headers={"Authorization": f"Bearer {API_KEY}"},
        body=json.dumps({"user_id": user, "message": message}).encode(),
    )
    assert r.status == 202, r.body


async def test_the_demo_service_survives_a_broker_that_refuses(
    nursery: trio.Nursery, records: list[logging.LogRecord]
) -> None:
    """SMAPWS_DEMO=true on a Redis that is down: the simulated Project
    service's publishes fail (BrokerError). That used to end the hub (the
    error left the demo task and the root nursery); now each failing tick is
    one rate-limited log line and the hub goes on serving its tabs."""
    from smapws._io import demo

    from .conftest import free_port

    config = make_config(SMAPWS_DEMO="true", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    server: Server = await nursery.start(serve, config)
    user = demo.USER_PREFIX + "tab"
    async with connect(server, user):
        with trio.fail_after(10):
            while not any(r.getMessage() == "demo publish failed" for r in records):
                await trio.sleep(0.05)
            # Two more ticks: still running, still one line per interval.
            await trio.sleep(2 * demo.TICK_S)
        assert server.app.hub.connections(user)
        assert (await http(server.port, "GET", "/health")).status == 200
        async with connect(server, "someone"):  # new tabs still get in
            pass
    assert sum(r.getMessage() == "demo publish failed" for r in records) == 1


async def test_a_fault_while_registering_a_connection_leaves_nothing_behind(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault while a new connection is registered (here: while its
    current state is gathered) closes it with 1011, and it is forgotten:
    it used to stay in the hub for good, counted in active_connections,
    against SMAPWS_MAX_CONNECTIONS and its user's limit, and offered every
    message of its user."""
    server: Server = await nursery.start(
        serve, make_config(SMAPWS_MAX_CONNECTIONS_PER_USER=1, SMAPWS_MAX_CONNECTIONS=2)
    )
    real = Snapshots.for_user
    fault = True

    def for_user(self: Snapshots, user: str, now: float) -> Any:
        if user == "victim" and fault:
            raise RuntimeError("injected fault while registering")
        return real(self, user, now)

    monkeypatch.setattr(Snapshots, "for_user", for_user)
    async with connect(server, "bystander") as other:
        async with connect(server, "victim") as victim:
            assert await close_code(victim) == 1011
        await wait_connections(server, 1)
        assert not server.app.hub.connections("victim")
        fault = False
        async with connect(server, "victim") as victim:  # neither limit holds it out
            await _publish(server, "victim", {"type": "notification", "payload": {"n": 1}})
            assert (await receive_json(victim))["payload"] == {"n": 1}
        await _publish(server, "bystander", {"type": "alert", "payload": {}})
        assert (await receive_json(other))["type"] == "alert"
    assert metric(server, ERRORS, {"where": "connection"}) == 1
