"""The fleet's replay log in Redis, with real hubs on a real redis-server:
a tab resumes on a hub that never saw its last message, ids agree across
hubs that joined at different times, and Redis trouble is a resync, never a
silent gap."""

from __future__ import annotations

import json
import time
from typing import Any

import trio
import trio.testing
import trio_asyncio

from smapws._core.fleet import GENESIS, HEADER_LEN, encode_entry, log_key
from smapws._io.brokers.redis import PublishClient
from smapws._io.fleetlog import FleetLog
from smapws._io.server import Server, serve
from smapws.metrics import Metrics
from tests.conftest import (
    RedisServer,
    connect,
    free_port,
    make_config,
    metric,
    receive_json,
    wait_connections,
    wait_ready,
)
from tests.tcpproxy import TcpProxy


async def start(nursery: trio.Nursery, redis: RedisServer, **settings: Any) -> Server:
    server: Server = await nursery.start(serve, make_config(REDIS_URL=redis.url, **settings))
    await wait_ready(server)
    return server


def note(n: int, user: str = "f1") -> dict[str, Any]:
    return {"type": "notification", "payload": {"n": n, "user": user}}


async def receive_notes(ws: Any, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < count:
        msg = await receive_json(ws)
        got.append(msg)
    return got


#: Every outcome of an append (websocket_fleet_log_appends_total{result}).
APPEND_RESULTS = ("written", "duplicate", "off_chain", "dropped", "failed")


async def settle(server: Server, published: int) -> None:
    """Until ``server`` has routed ``published`` messages and Redis has
    answered the appends it sent for them: until their count stays the same
    for 50 ms (a hub sends none for a message the log had when it asked)."""
    with trio.fail_after(5):
        while metric(server, "websocket_broker_messages_received_total") < published:
            await trio.sleep(0.01)
        seen, still = -1.0, 0
        while still < 5:
            await trio.sleep(0.01)
            now = appended(server)
            seen, still = now, (still + 1 if now == seen else 0)


def appended(server: Server) -> float:
    """Appends ``server`` has had an answer (or a refusal) for."""
    name = "websocket_fleet_log_appends_total"
    return sum(metric(server, name, {"result": r}) for r in APPEND_RESULTS)


async def late_hub(nursery: trio.Nursery, redis: RedisServer, user: str) -> tuple[Server, str]:
    """A hub that started after ``user``'s message n0 (which another hub
    routed and appended), and that message's id."""
    a = await start(nursery, redis)
    async with connect(a, user) as tab:
        await wait_connections(a, 1)
        redis.publish(user, note(0, user))
        last = (await receive_json(tab))["id"]
    await settle(a, 1)
    return await start(nursery, redis), last


async def test_a_tab_resumes_on_a_hub_that_started_after_its_last_message(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    a = await start(nursery, own_redis)
    async with connect(a, "f1") as tab:
        await wait_connections(a, 1)
        for n in range(2):
            own_redis.publish("f1", note(n))
        first = await receive_notes(tab, 2)
    last = first[-1]["id"]
    b = await start(nursery, own_redis)  # started after the tab's last message
    for n in range(2, 5):
        own_redis.publish("f1", note(n))
    await settle(a, 5)
    await settle(b, 3)
    async with connect(b, "f1", query=f"?since={last}&since_age=0.5") as tab:
        missed = await receive_notes(tab, 3)
    assert [m["type"] for m in missed] == ["notification"] * 3
    assert [m["payload"]["n"] for m in missed] == [2, 3, 4]
    assert metric(b, "websocket_resumes_total", {"result": "fleet"}) == 1
    assert metric(b, "websocket_resync_messages_total") == 0
    # The same ids as hub a gave them: a tab of a resuming sees the same.
    async with connect(a, "f1", query=f"?since={last}&since_age=0.5") as tab:
        on_a = await receive_notes(tab, 3)
    assert [m["id"] for m in on_a] == [m["id"] for m in missed]
    # Each message is in the log once, though two hubs appended it.
    with own_redis.client() as c:
        assert c.llen(log_key(b"user_noti:f1")) == 5
        assert c.pttl(log_key(b"user_noti:f1")) > 290_000
    # Whichever hub's pipeline went first wrote it, the other's found it (n2
    # too, unless a's append was in the log when b asked it about the user).
    duplicates = {"result": "duplicate"}
    appends = "websocket_fleet_log_appends_total"
    assert metric(a, appends, duplicates) + metric(b, appends, duplicates) >= 2


async def test_a_history_ttl_past_redis_clock_still_writes_the_log(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    """SMAPWS_HISTORY_TTL=1e16 (taken: "keep it for ever") made the script's
    PEXPIRE an error, so every append failed and no tab could resume on
    another hub; the expiry is now capped at what Redis takes."""
    a = await start(nursery, own_redis, SMAPWS_HISTORY_TTL="1e16")
    async with connect(a, "f1") as tab:
        await wait_connections(a, 1)
        own_redis.publish("f1", note(0))
        await receive_json(tab)
    await settle(a, 1)
    appends = "websocket_fleet_log_appends_total"
    assert [metric(a, appends, {"result": r}) for r in ("written", "failed")] == [1, 0]
    with own_redis.client() as c:
        assert c.pttl(log_key(b"user_noti:f1")) > 10**15


async def test_identical_copies_get_the_same_ids_on_a_hub_that_joined_between_them(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    a = await start(nursery, own_redis)
    same = note(0)
    async with connect(a, "f2") as tab_a:
        await wait_connections(a, 1)
        own_redis.publish("f2", same)
        own_redis.publish("f2", same)
        early = await receive_notes(tab_a, 2)
        await settle(a, 2)
        await trio.sleep(1.1)  # beyond SUBSCRIBE_MARGIN
        b = await start(nursery, own_redis)
        async with connect(b, "f2") as tab_b:
            await wait_connections(b, 1)
            for msg in (same, note(1), same):
                own_redis.publish("f2", msg)
            on_a = await receive_notes(tab_a, 3)
            on_b = await receive_notes(tab_b, 3)
    ids = [m["id"] for m in early + on_a]
    assert len(set(ids)) == 5  # every copy its own id
    assert [m["id"] for m in on_b] == [m["id"] for m in on_a]


async def test_without_the_fleet_log_the_late_hub_answers_a_gap(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    # The same resume as above, SMAPWS_FLEET_HISTORY=off: what main did.
    a = await start(nursery, own_redis, SMAPWS_FLEET_HISTORY="off")
    async with connect(a, "f3") as tab:
        await wait_connections(a, 1)
        own_redis.publish("f3", note(0))
        last = (await receive_json(tab))["id"]
    b = await start(nursery, own_redis, SMAPWS_FLEET_HISTORY="off")
    own_redis.publish("f3", note(1))
    await settle(b, 1)
    async with connect(b, "f3", query=f"?since={last}") as tab:
        first = await receive_json(tab)
    assert first["type"] == "resync" and first["payload"]["reason"] == "history_gap"
    with own_redis.client() as c:
        assert c.exists(log_key(b"user_noti:f3")) == 0


async def test_a_redis_restart_is_a_resync_never_a_silent_gap(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    a = await start(nursery, own_redis, SMAPWS_RECONNECT_MAX=0.2)
    async with connect(a, "f4") as tab:
        await wait_connections(a, 1)
        own_redis.publish("f4", note(0))
        last = (await receive_json(tab))["id"]
        await settle(a, 1)
        own_redis.kill()  # the log goes with it
        own_redis.start()
        resync = await receive_json(tab, timeout=15)
        assert resync["type"] == "resync"
    await wait_ready(a)
    b = await start(nursery, own_redis)
    own_redis.publish("f4", note(1))
    await settle(b, 1)
    # Neither hub can vouch for what followed `last`: a cleared its window
    # when the subscription dropped, and the log is gone.
    for hub in (a, b):
        async with connect(hub, "f4", query=f"?since={last}") as tab:
            first = await receive_json(tab)
        assert first["type"] == "resync" and first["payload"]["reason"] == "history_gap"


async def test_a_foreign_key_in_the_logs_place_is_a_gap_not_a_crash(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    with own_redis.client() as c:
        c.set(log_key(b"user_noti:f5"), b"not a list")
        c.rpush(log_key(b"user_noti:f6"), b"garbage entry")
    a = await start(nursery, own_redis)
    for user in ("f5", "f6"):
        async with connect(a, user) as tab:
            await wait_connections(a, 1)
            own_redis.publish(user, note(0, user))
            msg = await receive_json(tab)
            assert msg["payload"]["user"] == user  # delivered all the same
        async with connect(a, user, query="?since=" + "0" * 16) as tab:
            first = await receive_json(tab)
            assert first["type"] == "resync"
    assert metric(a, "websocket_fleet_log_errors_total", {"op": "consult"}) >= 1
    assert metric(a, "websocket_internal_errors_total", {"where": "route"}) == 0


async def test_a_fleet_log_that_does_not_answer_costs_one_wait_then_none(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    # The subscription works, the log's client cannot reach its Redis: the
    # first user's message waits for the failed consult, then delivery goes
    # on, and for CONSULT_BACKOFF the router asks no more.
    a = await start(nursery, own_redis)
    assert a.app.fleet is not None
    a.app.fleet._client = PublishClient(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
    async with connect(a, "f7") as t7, connect(a, "f8") as t8:
        await wait_connections(a, 2)
        own_redis.publish("f7", note(0, "f7"))
        assert (await receive_json(t7))["payload"]["user"] == "f7"
        own_redis.publish("f8", note(0, "f8"))
        assert (await receive_json(t8))["payload"]["user"] == "f8"
    assert metric(a, "websocket_fleet_log_errors_total", {"op": "consult"}) == 1


async def test_a_resume_from_the_log_includes_what_this_hub_routed_before_it_read_it(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    # Hub b routed n1 but its append never reached the log (here Redis
    # refuses writes: OOM; the same holds while an append is in flight).
    # The log ends at the tab's last id, an unbroken chain of nothing: b
    # must replay n1 from its own window, not claim the tab missed nothing.
    b, last = await late_hub(nursery, own_redis, "f7")
    with own_redis.client() as c:
        c.config_set("maxmemory-policy", "noeviction")
        c.config_set("maxmemory", 1)
        own_redis.publish("f7", note(1, "f7"))
        await settle(b, 1)
        with trio.fail_after(5):
            while metric(b, "websocket_fleet_log_appends_total", {"result": "failed"}) < 1:
                await trio.sleep(0.01)
        c.config_set("maxmemory", 0)
    async with connect(b, "f7", query=f"?since={last}&since_age=0.5") as tab:
        await wait_connections(b, 1)
        own_redis.publish("f7", note(2, "f7"))
        first = await receive_json(tab)
    assert first["type"] == "notification" and first["payload"]["n"] == 1


def fleet_log(redis: RedisServer, metrics: Metrics, max_bytes: int = 1 << 24) -> FleetLog:
    """A fleet log on ``redis`` as a hub's (100 entries a user, 300 s)."""
    client = PublishClient(redis.url, timeout=5.0)
    return FleetLog(client, ttl=300.0, per_user=100, max_bytes=max_bytes, metrics=metrics)


async def test_the_append_queue_is_bounded_in_bytes_while_redis_lags(
    redis_server: RedisServer,
) -> None:
    # While Redis answers appends slower than messages arrive (here: the
    # task that sends them has not run), the queue may not hold more than
    # SMAPWS_HISTORY_MAX_BYTES of entries; 65536 entries of 64 KiB were 4 GiB.
    metrics = Metrics()
    log = fleet_log(redis_server, metrics, max_bytes=1024 * 1024)
    for n in range(64):
        entry = encode_entry(f"{n:016x}", GENESIS, 0, b"x" * (64 * 1024 - HEADER_LEN))
        log.append_nowait(b"user_noti:f8", entry)
    dropped = metrics.registry.get_sample_value(
        "websocket_fleet_log_appends_total", {"result": "dropped"}
    )
    assert dropped == 64 - 16
    await log.aclose()
    # And in entries (its queue argument).
    client = PublishClient(redis_server.url, timeout=5.0)
    log = FleetLog(client, ttl=300.0, per_user=100, max_bytes=1 << 24, metrics=metrics, queue=8)
    for n in range(10):
        log.append_nowait(b"user_noti:f8", encode_entry(f"{n:016x}", GENESIS, 0, b"{}"))
    assert log.outstanding == 8
    dropped = metrics.registry.get_sample_value(
        "websocket_fleet_log_appends_total", {"result": "dropped"}
    )
    assert dropped == 64 - 16 + 2
    await log.aclose()


async def append_all(log: FleetLog, items: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Queue ``items`` (channel, entry), run ``log`` until Redis has answered
    them all, close it, and return the channels it found off chain."""
    off: list[bytes] = []
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(log.run, off.append)
        for channel, entry in items:
            log.append_nowait(channel, entry)
        assert log.outstanding == len(items)
        with trio.fail_after(5):
            await log.flush()
        nursery.cancel_scope.cancel()
        await log.aclose()
    return off


async def test_each_append_of_a_call_has_its_own_outcome(redis_server: RedisServer) -> None:
    """The script appends many entries per call (APPEND_PER_CALL): each is
    still counted on its own, one whose key is not a log fails alone, the
    channel of one that lands off chain is reported, and a Redis that does
    not know the script (SCRIPT FLUSH: a restart) gets it again."""
    from smapws._io.fleetlog import APPEND_PER_CALL

    metrics = Metrics()
    log = fleet_log(redis_server, metrics)
    tag = b"%d" % time.monotonic_ns()
    good, foreign, off = (b"user_noti:each%s-%s" % (tag, name) for name in (b"g", b"f", b"o"))
    with redis_server.client() as c:
        c.script_flush()
        c.set(log_key(foreign), b"not a list")
    ids = [f"{n:016x}" for n in range(2 * APPEND_PER_CALL)]
    chain = [encode_entry(ids[0], GENESIS, 0, b"0")]
    chain += [encode_entry(ids[n], ids[n - 1], 0, b"%d" % n) for n in range(1, len(ids))]
    items = [(good, e) for e in chain[:APPEND_PER_CALL]]
    items += [(foreign, chain[0]), (good, chain[1]), (off, chain[1])]  # failed, duplicate, off
    items += [(good, e) for e in chain[APPEND_PER_CALL:]]
    assert await append_all(log, items) == [off]

    def appends(result: str) -> float | None:
        name = "websocket_fleet_log_appends_total"
        return metrics.registry.get_sample_value(name, {"result": result})

    assert [appends(r) for r in ("written", "duplicate", "off_chain", "failed")] == [
        2 * APPEND_PER_CALL,
        1,
        1,
        1,
    ]
    errors = metrics.registry.get_sample_value("websocket_fleet_log_errors_total", {"op": "append"})
    assert errors == 1
    with redis_server.client() as c:
        assert c.lrange(log_key(good), 0, -1) == chain[-100:]
        assert c.lrange(log_key(off), 0, -1) == [chain[1]]
        assert c.get(log_key(foreign)) == b"not a list"
        assert 0 < c.pttl(log_key(good)) <= 300_000


async def test_appends_gather_unless_a_whole_batch_waits(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """Review 6: the append task waited APPEND_GATHER before every pipeline,
    a backlog of whole batches too (after Redis lagged: 65,536 entries took
    128 waits more to catch up), which capped appends at 512 per 10 ms. The
    clock stands still here (waits for Redis are in real time, in a
    thread): whole batches go at once, a lone append right after a pipeline
    only once the clock has moved by APPEND_GATHER."""
    from smapws._io.fleetlog import APPEND_BATCH, APPEND_GATHER, HURRY_GATHER

    metrics = Metrics()
    log = fleet_log(redis_server, metrics)
    tag = b"%d" % time.monotonic_ns()

    def append(n: int) -> None:
        entry = encode_entry(f"{n:016x}", GENESIS, 0, b"e")
        log.append_nowait(b"user_noti:gather%s-%d" % (tag, n), entry)

    async def until_written(count: int) -> None:
        for _ in range(500):
            name = "websocket_fleet_log_appends_total"
            if (metrics.registry.get_sample_value(name, {"result": "written"}) or 0) >= count:
                return
            await trio.to_thread.run_sync(time.sleep, 0.01)  # (the clock does not move)
        raise AssertionError(f"fewer than {count} appends written")

    start = trio.current_time()
    async with trio_asyncio.open_loop():
        async with trio.open_nursery() as nursery:
            for n in range(2 * APPEND_BATCH):
                append(n)
            await nursery.start(log.run, lambda channel: None)
            await until_written(2 * APPEND_BATCH)
            assert trio.current_time() == start
            append(2 * APPEND_BATCH)
            await trio.to_thread.run_sync(time.sleep, 0.2)
            name = "websocket_fleet_log_appends_total"
            written = metrics.registry.get_sample_value(name, {"result": "written"})
            assert written == 2 * APPEND_BATCH  # (not the last one: it gathers)
            mock_clock.jump(APPEND_GATHER)
            await until_written(2 * APPEND_BATCH + 1)
            # After a quiet spell the first append goes at once: the clock
            # does not move (waiting would only widen the moment when a hub
            # that joins asks the log before the entry is in it).
            mock_clock.jump(APPEND_GATHER)
            append(2 * APPEND_BATCH + 1)
            await until_written(2 * APPEND_BATCH + 2)
            # Right after a pipeline an append gathers, for HURRY_GATHER
            # only once the hub hurries it (a user's last tab closed: it may
            # resume elsewhere, from the log).
            append(2 * APPEND_BATCH + 2)
            await trio.to_thread.run_sync(time.sleep, 0.2)
            written = metrics.registry.get_sample_value(name, {"result": "written"})
            assert written == 2 * APPEND_BATCH + 2
            log.hurry()
            await trio.to_thread.run_sync(time.sleep, 0.2)
            written = metrics.registry.get_sample_value(name, {"result": "written"})
            assert written == 2 * APPEND_BATCH + 2  # (the clock has not moved)
            assert HURRY_GATHER < APPEND_GATHER
            mock_clock.jump(HURRY_GATHER)  # (not enough for APPEND_GATHER)
            await until_written(2 * APPEND_BATCH + 3)
            nursery.cancel_scope.cancel()
        await log.aclose()


async def test_a_resume_reads_at_most_history_per_user_entries_of_a_longer_list(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    # A list longer than SMAPWS_HISTORY_PER_USER (a hub configured with a
    # larger one, or anyone who can write to Redis) is read from its end
    # only: a resume is one bounded LRANGE, never a whole list decoded and
    # parsed on the hub's event loop.
    from smapws._core.fleet import chain_id

    channel = b"user_noti:f9"
    prev, ids, entries = GENESIS, [], []
    for n in range(30):
        data = json.dumps(note(n, "f9")).encode()
        mid = chain_id(channel, data, prev)
        entries.append(encode_entry(mid, prev, int(time.time() * 1000), data))
        ids.append(mid)
        prev = mid
    with own_redis.client() as c:
        c.rpush(log_key(channel), *entries)
    a = await start(nursery, own_redis, SMAPWS_HISTORY_PER_USER=10)
    async with connect(a, "f9", query=f"?since={ids[0]}") as tab:
        first = await receive_json(tab)
        if first["type"] != "resync":  # read the rest, or the close waits on it
            await receive_notes(tab, 28)
    assert first["type"] == "resync"  # ids[0] is not among the last 10
    async with connect(a, "f9", query=f"?since={ids[25]}") as tab:
        missed = await receive_notes(tab, 4)
    assert [m["payload"]["n"] for m in missed] == [26, 27, 28, 29]


async def test_a_message_the_log_had_before_this_hub_routed_it_reaches_the_tab_once(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    from smapws._core.fleet import chain_id

    b, last = await late_hub(nursery, own_redis, "f10")
    # Hub a received n1 and appended it before b received it (b lags).
    channel = b"user_noti:f10"
    data = json.dumps(note(1, "f10")).encode()
    mid = chain_id(channel, data, last)
    with own_redis.client() as c:
        c.rpush(log_key(channel), encode_entry(mid, last, int(time.time() * 1000), data))
    async with connect(b, "f10", query=f"?since={last}&since_age=0.5") as tab:
        first = await receive_json(tab)
        assert first["id"] == mid  # replayed from the log
        with own_redis.client() as c:
            c.publish("user_noti:f10", data)  # now b receives n1
        own_redis.publish("f10", note(2, "f10"))
        second = await receive_json(tab)
    assert second["payload"]["n"] == 2


async def test_ids_agree_when_the_log_is_slow_to_answer_a_hubs_first_message(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    a = await start(nursery, own_redis)
    async with connect(a, "f11") as tab_a:
        await wait_connections(a, 1)
        own_redis.publish("f11", note(0, "f11"))
        await receive_json(tab_a)
        await settle(a, 1)
        b = await start(nursery, own_redis)  # its first message of f11 is next
        async with connect(b, "f11") as tab_b:
            await wait_connections(b, 1)
            with own_redis.client() as c:
                pipe = c.pipeline(transaction=False)
                # Redis runs both before it reads b's consult: scripts wait 2 s.
                pipe.publish("user_noti:f11", json.dumps(note(1, "f11")))
                pipe.execute_command("CLIENT", "PAUSE", 2000, "WRITE")
                pipe.execute()
            on_a = await receive_json(tab_a)
            on_b = await receive_json(tab_b)
    assert on_b["id"] == on_a["id"]


async def test_a_slow_consult_holds_its_users_messages_only(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    """The router waited for the log's answer about a new user with every
    other user's delivery behind it (a second per batch while Redis was
    slow). Now that user's messages wait, in order, and the others go on."""
    a = await start(nursery, own_redis)
    order: list[str] = []
    async with connect(a, "f13") as known, connect(a, "f14") as new:
        await wait_connections(a, 2)
        own_redis.publish("f13", note(0, "f13"))
        await receive_json(known)  # f13's chain is known from now on
        with own_redis.client() as c:
            pipe = c.pipeline(transaction=False)
            pipe.publish("user_noti:f14", json.dumps(note(1, "f14")))
            pipe.publish("user_noti:f14", json.dumps(note(2, "f14")))
            pipe.publish("user_noti:f13", json.dumps(note(3, "f13")))
            pipe.execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # the consult waits
            pipe.execute()

        async def read(tab: Any, count: int) -> None:
            for _ in range(count):
                msg = await receive_json(tab)
                order.append(f"{msg['payload']['user']}:{msg['payload']['n']}")

        async with trio.open_nursery() as readers:
            readers.start_soon(read, known, 1)
            readers.start_soon(read, new, 2)
    assert order == ["f13:3", "f14:1", "f14:2"]
    assert metric(a, "websocket_fleet_log_errors_total", {"op": "consult"}) == 0


async def test_more_held_than_the_queue_may_hold_is_routed_at_once(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    # The log hangs (its deadline is 30 s): what is held while it is asked
    # is bounded like the broker's queue it comes from (4 messages here);
    # past that, nobody waits for the answer.
    a = await start(nursery, own_redis, SMAPWS_INGEST_QUEUE=4, SMAPWS_REDIS_TIMEOUT=30)
    assert a.app.fleet is not None
    hang: TcpProxy = await nursery.start(TcpProxy(own_redis.port).run)
    hang.freeze()
    a.app.fleet._client = PublishClient(hang.url, timeout=30.0)
    async with connect(a, "f15") as tab:
        await wait_connections(a, 1)
        for n in range(3):
            own_redis.publish("f15", note(n, "f15"))
        with trio.fail_after(5):
            while a.app.routing.holding.messages < 3:
                await trio.sleep(0.01)
        for n in range(3, 6):
            own_redis.publish("f15", note(n, "f15"))
        got = await receive_notes(tab, 6)
    assert [m["payload"]["n"] for m in got] == list(range(6))
    assert metric(a, "websocket_fleet_log_errors_total", {"op": "consult"}) == 1
    assert metric(a, "websocket_broker_messages_dropped_total") == 0


async def test_a_user_streaming_through_the_hold_neither_starves_consults_nor_passes_its_bound(
    own_redis: RedisServer,
) -> None:
    """Review of the hold: the router's helper routed what was ready until
    nothing was, and asked the log only then. A user whose messages kept
    coming while theirs were routed (65 a batch in, 64 a chunk out) kept
    it routing: a new user's consult waited for the stream to end, and what
    was held grew past the bound with nobody waiting (so nothing gave up)."""
    from smapws._io.app import ROUTER_BATCH, App
    from smapws._io.brokers.memory import MemoryBroker

    metrics = Metrics()
    bound = 400
    config = make_config(REDIS_URL=own_redis.url, SMAPWS_INGEST_QUEUE=bound)
    fleet = fleet_log(own_redis, metrics)
    app = App(config, MemoryBroker(), metrics, fleet)
    holding = app.routing.holding
    send, receive = trio.open_memory_channel[tuple[bytes, bytes]](100_000)
    hot, cold = b"user_noti:stream-hot", b"user_noti:stream-cold"
    data = json.dumps(note(0, "hot")).encode()
    peak, cold_out = 0, None
    async with trio_asyncio.open_loop():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.router, receive)
            for _ in range(200):  # the first waits for the log, the rest behind it
                send.send_nowait((hot, data))
            with trio.fail_after(5):
                while holding.waiting or "stream-hot" not in holding:
                    await trio.lowlevel.checkpoint()
            # The log answered: from now on, a batch of hot's a round.
            for n in range(1500):
                for _ in range(ROUTER_BATCH + 1):
                    send.send_nowait((hot, data))
                if n == 10:
                    send.send_nowait((cold, data))
                await trio.lowlevel.checkpoint()
                peak = max(peak, holding.messages)
                if n > 10 and cold_out is None and "stream-cold" not in holding:
                    cold_out = n
            assert "stream-hot" in holding  # (it streamed through the hold throughout)
            nursery.cancel_scope.cancel()
        await fleet.aclose()
    assert cold_out is not None  # cold's consult did not wait for the stream to end
    errors = metrics.registry.get_sample_value(
        "websocket_fleet_log_errors_total", {"op": "consult"}
    )
    assert errors in (None, 0)  # answered, not given up on
    assert peak <= bound + ROUTER_BATCH + 1


async def test_a_log_entry_whose_id_is_not_an_id_is_not_replayed(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    # Anyone who can write to Redis can write to the list; an entry's id is
    # spliced into the frame as it stands, so one that is not 16 hex
    # characters could add fields to what the browser parses (or break it).

    since = "1" * 16
    forged = ('","evil":"' + "x" * 16)[:16]
    data = json.dumps(note(1, "f12")).encode()
    wall = int(time.time() * 1000)
    with own_redis.client() as c:
        c.rpush(
            log_key(b"user_noti:f12"),
            encode_entry(since, GENESIS, wall, json.dumps(note(0, "f12")).encode()),
            encode_entry(forged, since, wall, data),
        )
    a = await start(nursery, own_redis)
    async with connect(a, "f12", query=f"?since={since}") as tab:
        first = await receive_json(tab)
    assert "evil" not in first
    assert first["type"] == "resync"


async def test_a_hub_that_drains_sends_the_appends_it_still_holds(own_redis: RedisServer) -> None:
    """Review of the appends' 10 ms gather: a hub that stopped at the end of
    its drain dropped what it had not sent yet, uncounted, and a tab
    resuming on another hub then found the log a link short. The drain now
    waits (at most FLEET_FLUSH_S) for those appends to be answered."""
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, own_redis)
        async with connect(hub, "d1") as tab:
            await wait_connections(hub, 1)
            for n in range(20):
                own_redis.publish("d1", note(n, "d1"))
            await receive_notes(tab, 20)
            hub.drain()  # at once: the last appends are still queued or in flight
        # serve() returns once drained: the nursery ends with it.
    assert appended(hub) == 20
    with own_redis.client() as c:
        assert c.llen(log_key(b"user_noti:d1")) == 20


async def test_replies_no_redis_gives_are_failures_not_a_crash(nursery: trio.Nursery) -> None:
    """A failure of the fleet log never stops the hub, and that includes a
    reply Redis never gives: from a server that is not Redis, or a link an
    attacker tampers with, an integer where the scripts and LRANGE answer
    arrays. consult and read raised the decoders' TypeError (``for h in
    reply``), and the append task died of it (the strict zip over the
    script's statuses), taking the hub's root nursery with it. Each is now
    a counted failure: consult answers an empty log, read None, the
    appends are counted failed. The server here answers every command
    with ``:5``."""

    async def integers(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                # One reply per command: each starts a line with "*<argc>".
                count = data.count(b"\r\n*") + data.startswith(b"*")
                await stream.send_all(b":5\r\n" * count)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, integers, listeners)
    port = listeners[0].socket.getsockname()[1]
    metrics = Metrics()
    log = FleetLog(
        PublishClient(f"redis://127.0.0.1:{port}/0", timeout=5),
        ttl=60,
        per_user=10,
        max_bytes=1 << 20,
        metrics=metrics,
    )
    channel = b"user_noti:tampered"
    async with trio_asyncio.open_loop(), trio.open_nursery() as inner:
        assert await log.consult([channel]) == {channel: []}
        assert await log.read(channel) is None
        await inner.start(log.run, lambda ch: None)
        log.append_nowait(channel, encode_entry("1" * 16, GENESIS, 0, b"x"))
        with trio.fail_after(5):
            await log.flush()
        inner.cancel_scope.cancel()
        await log.aclose()
    sample = metrics.registry.get_sample_value
    assert sample("websocket_fleet_log_appends_total", {"result": "failed"}) == 1
    for op in ("consult", "read", "append"):
        assert sample("websocket_fleet_log_errors_total", {"op": op}) == 1, op
