"""smapws.publisher: the seed's message rules, against a real redis-server and a real hub.

A redis-py subscriber (a client we did not write) checks exactly which bytes
reached Redis; hubs on port 0 serve the HTTP publish API and the WebSocket
side.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from smapws import Server, serve
from smapws._core import publish as core
from smapws._core.envelope import InvalidMessage as CoreInvalidMessage
from smapws.publisher import (
    AsyncPublisher,
    InvalidMessage,
    Publisher,
    PublishError,
    PublishRefused,
)

from .conftest import (
    API_KEY,
    RedisServer,
    connect,
    free_port,
    make_config,
    metric,
    receive_json,
    wait_connections,
    wait_ready,
)

# -- the seed's rules (sans-IO) ------------------------------------------------


@pytest.mark.parametrize(
    ("status", "total", "done", "mtype", "percent"),
    [
        ("CRAWLING", 1000, 150, "project_progress", 15.0),
        ("INITIALIZING", 0, 0, "project_progress", 0.0),  # total 0: 0, not a division
        ("PROCESSING", 3, 1, "project_progress", 33.33333333333333),  # as Go's float64
        ("DONE", 1000, 1000, "project_completed", 100.0),
        ("FAILED", 1000, 10, "project_completed", 1.0),
        ("done", 10, 10, "project_progress", 100.0),  # the seed compares exactly
    ],
)
def test_progress_rule_is_the_seeds(
    status: str, total: int, done: int, mtype: str, percent: float
) -> None:
    got = core.progress_message(
        project_id="proj_xyz", status=status, total=total, done=done, errors=2
    )
    assert got == (
        mtype,
        {
            "project_id": "proj_xyz",
            "status": status,
            "total": total,
            "done": done,
            "errors": 2,
            "progress_percent": percent,
        },
    )
    assert isinstance(got[1]["progress_percent"], float)


@pytest.mark.parametrize(
    "bad",
    [
        {"total": -1},
        {"done": True},
        {"errors": 1.5},
        {"done": "3"},
        {"project_id": ""},
        {"status": ""},
        {"status": None},
    ],
)
def test_progress_refuses_what_the_seed_cannot_mean(bad: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "project_id": "p", "status": "CRAWLING", "total": 10, "done": 1, "errors": 0, **bad
    }  # fmt: skip
    with pytest.raises(ValueError, match=next(iter(bad))):
        core.progress_message(**args)


def test_notification_and_alert_payloads() -> None:
    assert core.notification_payload("New Comment", "Someone commented", "info") == {
        "title": "New Comment",
        "message": "Someone commented",
        "level": "info",
    }
    assert core.alert_payload("Quota", "", "critical", {"link": "/billing"}) == {
        "title": "Quota",
        "message": "",
        "severity": "critical",
        "link": "/billing",
    }
    with pytest.raises(ValueError, match="'level'"):
        core.notification_payload("t", "m", "info", {"level": "x"})
    with pytest.raises(ValueError, match="title"):
        core.alert_payload("", "m", "high")


@pytest.mark.parametrize("user", ["", "x" * 257, True, None, "bad\ud800"])
def test_a_user_id_no_tab_can_have_is_refused(user: Any) -> None:
    with pytest.raises(ValueError):
        core.channel("user_noti:", user)


def test_integer_user_ids_are_the_tokens_strings() -> None:
    assert core.channel("user_noti:", 123) == b"user_noti:123"


def test_encoding_is_compact_utf8_and_keeps_the_api_body_verbatim() -> None:
    data = core.encode("notification", {"title": "Tiến độ", "n": 1})
    assert data == '{"type":"notification","payload":{"title":"Tiến độ","n":1}}'.encode()
    assert json.loads(core.api_body("u1", data)) == {"user_id": "u1", "message": json.loads(data)}


# -- what is published, seen by a Redis subscriber ------------------------------


@pytest.fixture
def subscriber(redis_server: RedisServer) -> Iterator[Callable[[], bytes | None]]:
    """Subscribed to ``user_noti:*``; each call returns the next message's
    ``channel + b" " + data``, or None when nothing comes within a second."""
    client = redis_server.client()
    pubsub = client.pubsub()
    pubsub.psubscribe("user_noti:*")
    assert pubsub.get_message(timeout=5)["type"] == "psubscribe"  # type: ignore[index]

    def next_message() -> bytes | None:
        msg = pubsub.get_message(timeout=1)
        return None if msg is None else bytes(msg["channel"] + b" " + msg["data"])

    yield next_message
    pubsub.close()
    client.close()


def test_progress_notify_alert_publish_the_seeds_bytes(
    redis_server: RedisServer, subscriber: Callable[[], bytes | None]
) -> None:
    with Publisher(redis_server.url) as pub:
        assert pub.progress(
            "user_123", project_id="proj_xyz", status="CRAWLING", total=1000, done=150, errors=2
        ) == 1  # fmt: skip
        pub.progress("user_123", project_id="proj_xyz", status="DONE", total=2, done=2)
        pub.notify("user_123", "New Comment", "Someone commented on your project")
        pub.alert("u2", "Disk", "90% full", severity="high")
        pub.publish(7, "custom_event", {"k": [1, 2]})
    assert subscriber() == (
        b'user_noti:user_123 {"type":"project_progress","payload":{"project_id":"proj_xyz",'
        b'"status":"CRAWLING","total":1000,"done":150,"errors":2,"progress_percent":15.0}}'
    )
    assert subscriber() == (
        b'user_noti:user_123 {"type":"project_completed","payload":{"project_id":"proj_xyz",'
        b'"status":"DONE","total":2,"done":2,"errors":0,"progress_percent":100.0}}'
    )
    assert subscriber() == (
        b'user_noti:user_123 {"type":"notification","payload":{"title":"New Comment",'
        b'"message":"Someone commented on your project","level":"info"}}'
    )
    assert subscriber() == (
        b'user_noti:u2 {"type":"alert","payload":{"title":"Disk","message":"90% full",'
        b'"severity":"high"}}'
    )
    assert subscriber() == b'user_noti:7 {"type":"custom_event","payload":{"k":[1,2]}}'
    assert subscriber() is None


def test_the_asyncio_flavour_publishes_the_same(
    redis_server: RedisServer, subscriber: Callable[[], bytes | None]
) -> None:
    async def main() -> list[int]:
        async with AsyncPublisher(redis_server.url) as pub:
            return [
                await pub.progress("a1", project_id="p", status="CRAWLING", total=4, done=1),
                await pub.notify("a1", "hi", "there", level="success"),
                await pub.alert("a1", "x", "y"),
            ]

    assert asyncio.run(main()) == [1, 1, 1]
    assert subscriber() == (
        b'user_noti:a1 {"type":"project_progress","payload":{"project_id":"p",'
        b'"status":"CRAWLING","total":4,"done":1,"errors":0,"progress_percent":25.0}}'
    )
    assert subscriber() == (
        b'user_noti:a1 {"type":"notification","payload":{"title":"hi","message":"there",'
        b'"level":"success"}}'
    )
    assert subscriber() == (
        b'user_noti:a1 {"type":"alert","payload":{"title":"x","message":"y","severity":"warning"}}'
    )


def test_an_existing_client_and_a_prefix(
    redis_server: RedisServer, subscriber: Callable[[], bytes | None]
) -> None:
    client = redis_server.client()
    pub = Publisher(client=client, channel_prefix="user_noti:eu:")
    assert pub.server == f"redis://localhost:{redis_server.port}/0"
    pub.notify("u1", "t", "m")
    pub.close()
    assert client.ping()  # a client we were given is not ours to close
    client.close()
    assert subscriber() == (
        b'user_noti:eu:u1 {"type":"notification","payload":{"title":"t","message":"m",'
        b'"level":"info"}}'
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"s": "lone \ud800 surrogate"}, "not_utf8"),
        ({"pad": "x" * 70_000}, "too_large"),
    ],
)
def test_a_message_the_hub_would_drop_is_not_sent(
    redis_server: RedisServer,
    subscriber: Callable[[], bytes | None],
    payload: dict[str, Any],
    reason: str,
) -> None:
    with Publisher(redis_server.url) as pub:
        with pytest.raises(InvalidMessage) as info:
            pub.publish("u1", "notification", payload)
        assert info.value.reason == reason
        with pytest.raises(InvalidMessage, match="bad_type"):
            pub.publish("u1", "", {})
        pub.publish("u1", "notification", {"after": True})
    # The first thing Redis saw is the valid message.
    assert subscriber() == b'user_noti:u1 {"type":"notification","payload":{"after":true}}'


def test_max_message_bytes_is_the_hubs_bound(redis_server: RedisServer) -> None:
    with Publisher(redis_server.url, max_message_bytes=64) as pub:
        pub.publish("u1", "n", {"x": "y" * 30})
        with pytest.raises(InvalidMessage, match="too_large"):
            pub.publish("u1", "n", {"x": "y" * 60})


#: Messages at the edge of what the hub accepts. Whatever the hub's parser
#: decides about each (today or after it becomes stricter), the publisher
#: must decide the same: the test below asks a real hub.
EDGE_PAYLOADS: list[dict[str, Any]] = [
    {"title": "Tiến độ dự án"},
    {"x": math.nan},
    {"x": math.inf},
    {"deep": json.loads("[" * 200 + "]" * 200)},
    {"s": "\ud83d"},  # half of an emoji
    {"big": "x" * 65_000},
]


async def test_the_publisher_refuses_exactly_what_the_hub_drops(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    hub: Server = await nursery.start(serve, make_config(REDIS_URL=redis_server.url))
    await wait_ready(hub)
    async with connect(hub, "edge") as ws:
        await wait_connections(hub, 1)
        with Publisher(redis_server.url) as pub:
            for payload in EDGE_PAYLOADS:
                try:
                    await trio.to_thread.run_sync(pub.publish, "edge", "notification", payload)
                except InvalidMessage as exc:
                    # Published anyway (as a careless publisher would), the
                    # hub drops it for the same reason.
                    raw = json.dumps(
                        {"type": "notification", "payload": payload},
                        separators=(",", ":"),
                        ensure_ascii=False,
                    ).encode("utf-8", "surrogatepass")
                    invalid = ("websocket_broker_messages_invalid_total", {"reason": exc.reason})
                    before = metric(hub, *invalid)
                    with redis_server.client() as c:
                        await trio.to_thread.run_sync(c.publish, "user_noti:edge", raw)
                    with trio.fail_after(5):
                        while metric(hub, *invalid) == before:
                            await trio.sleep(0.01)
                else:
                    # Accepted: the hub delivers it, unchanged.
                    got = await receive_json(ws)
                    assert json.dumps(got["payload"]) == json.dumps(payload)


# -- failures name the server and the reason, never the password -----------------


def test_unreachable_redis() -> None:
    url = f"redis://:pw-hunter2@127.0.0.1:{free_port()}/0"
    with Publisher(url) as pub, pytest.raises(PublishError) as info:
        pub.notify("u1", "t", "m")
    text = str(info.value)
    assert text.startswith(f"publish to redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]} failed: ")
    assert "ConnectionError" in text and "refused" in text
    assert "hunter2" not in text and "hunter2" not in repr(pub)
    assert "\n" not in text

    async def main() -> str:
        async with AsyncPublisher(url) as apub:
            with pytest.raises(PublishError) as info:
                await apub.notify("u1", "t", "m")
            return str(info.value)

    text = asyncio.run(main())
    assert "redis://:***@127.0.0.1" in text and "ConnectionError" in text
    assert "hunter2" not in text


@pytest.fixture
def acl_user(redis_server: RedisServer) -> Iterator[str]:
    """A Redis ACL user ``pub`` (password ``right-pass``) that may publish
    only to ``user_noti:ok*``."""
    with redis_server.client() as c:
        c.acl_setuser(
            "pub", enabled=True, passwords=["+right-pass"], channels=["user_noti:ok*"],
            commands=["+publish", "+ping", "+client", "+hello"],
        )  # fmt: skip
        try:
            yield f"127.0.0.1:{redis_server.port}/0"
        finally:
            c.acl_deluser("pub")


def test_wrong_password_and_missing_permission(
    acl_user: str, subscriber: Callable[[], bytes | None]
) -> None:
    with (
        Publisher(f"redis://pub:wrong-pass@{acl_user}") as pub,
        pytest.raises(PublishError) as info,
    ):
        pub.notify("ok1", "t", "m")
    text = str(info.value)
    assert f"redis://pub:***@{acl_user}" in text and "AuthenticationError" in text
    assert "wrong-pass" not in text
    with Publisher(f"redis://pub:right-pass@{acl_user}") as pub:
        assert pub.notify("ok1", "t", "m") == 1
        with pytest.raises(PublishError, match="NoPermissionError") as info:
            pub.notify("other", "t", "m")
        assert "right-pass" not in str(info.value)
    assert subscriber() == (
        b'user_noti:ok1 {"type":"notification","payload":{"title":"t","message":"m",'
        b'"level":"info"}}'
    )
    assert subscriber() is None


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port where connections are accepted (by the kernel) and never answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def test_a_server_that_never_answers_times_out(silent_server: int) -> None:
    with (
        Publisher(f"redis://127.0.0.1:{silent_server}/0", timeout=0.2) as pub,
        pytest.raises(PublishError, match=r"TimeoutError.*no answer within 0\.2 s"),
    ):
        pub.notify("u1", "t", "m")
    with pytest.raises(PublishError, match=r"no answer within 0\.2 s"):
        Publisher(api_url=f"http://127.0.0.1:{silent_server}", api_key="k", timeout=0.2).notify(
            "u1", "t", "m"
        )

    async def main() -> None:
        async with AsyncPublisher(f"redis://127.0.0.1:{silent_server}/0", timeout=0.2) as apub:
            await apub.notify("u1", "t", "m")

    with pytest.raises(PublishError, match=r"no answer within 0\.2 s"):
        asyncio.run(main())


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"redis_url": "redis://x", "api_url": "http://x", "api_key": "k"},
        {"api_url": "http://x"},
        {"api_url": "ftp://x", "api_key": "k"},
        {"api_url": "http://user:pw@x", "api_key": "k"},
        {"redis_url": "redis://x", "timeout": 0},
    ],
)
def test_bad_construction_is_a_value_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Publisher(**kwargs)


# -- through a hub's HTTP publish API -------------------------------------------


async def test_http_api_through_a_redis_hub(
    redis_server: RedisServer, nursery: trio.Nursery, subscriber: Callable[[], bytes | None]
) -> None:
    hub: Server = await nursery.start(serve, make_config(REDIS_URL=redis_server.url))
    await wait_ready(hub)
    url = f"http://127.0.0.1:{hub.port}"

    async def asyncio_flavour() -> int:
        async with AsyncPublisher(api_url=url, api_key=API_KEY) as apub:
            return await apub.notify("api1", "Tiến độ", "xong", level="success")

    async with connect(hub, "api1") as ws:
        await wait_connections(hub, 1)
        pub = Publisher(api_url=url + "/", api_key=API_KEY)
        assert pub.server == url
        sent = await trio.to_thread.run_sync(
            lambda: pub.progress("api1", project_id="p9", status="DONE", total=5, done=5)
        )
        assert sent == 2  # Redis's count: the hub's subscription and the test's
        assert await trio.to_thread.run_sync(asyncio.run, asyncio_flavour()) == 2
        got = [await receive_json(ws), await receive_json(ws)]
    assert [(m["type"], m["payload"]) for m in got] == [
        (
            "project_completed",
            {"project_id": "p9", "status": "DONE", "total": 5, "done": 5, "errors": 0,
             "progress_percent": 100.0},
        ),
        ("notification", {"title": "Tiến độ", "message": "xong", "level": "success"}),
    ]  # fmt: skip
    # Redis carried exactly the publisher's encoding (the hub passes it on).
    assert await trio.to_thread.run_sync(subscriber) == (
        b'user_noti:api1 {"type":"project_completed","payload":{"project_id":"p9",'
        b'"status":"DONE","total":5,"done":5,"errors":0,"progress_percent":100.0}}'
    )
    assert await trio.to_thread.run_sync(subscriber) == (
        'user_noti:api1 {"type":"notification","payload":{"title":"Tiến độ",'
        '"message":"xong","level":"success"}}'.encode()
    )


async def test_http_api_refusals(nursery: trio.Nursery) -> None:
    hub: Server = await nursery.start(serve, make_config())
    off: Server = await nursery.start(serve, make_config(SMAPWS_API_KEY=""))

    def attempt(port: int, key: str) -> PublishRefused:
        with pytest.raises(PublishRefused) as info:
            Publisher(api_url=f"http://127.0.0.1:{port}", api_key=key).notify("u1", "t", "m")
        return info.value

    bad_key = await trio.to_thread.run_sync(attempt, hub.port, "not-the-key-42")
    assert bad_key.status == 401
    assert str(bad_key) == (
        f"publish to http://127.0.0.1:{hub.port} refused: HTTP 401 bad_api_key "
        "(SMAPWS_API_KEY here is not the hub's)"
    )
    assert "not-the-key-42" not in str(bad_key)
    disabled = await trio.to_thread.run_sync(attempt, off.port, API_KEY)
    assert (disabled.status, disabled.reason) == (404, "HTTP 404 publish_api_disabled")
    assert disabled.hint == "the hub has no SMAPWS_API_KEY: set one there (the same here)"


def test_the_api_key_does_not_follow_a_redirect() -> None:
    """A 3xx from the hub's address is a refusal: urllib would follow it,
    as a GET, with the Authorization header (the API key) to whatever host
    Location names. Two HTTP servers on the loopback: one answers 302 to
    the other, which records the headers it is sent."""
    import http.server
    import socketserver
    import threading

    seen: list[str | None] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(202)
            self.end_headers()
            self.wfile.write(b'{"status": "accepted", "receivers": 1}')

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    elsewhere = socketserver.TCPServer(("127.0.0.1", 0), Elsewhere)
    target = f"http://127.0.0.1:{elsewhere.server_address[1]}/collect"

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    redirect = socketserver.TCPServer(("127.0.0.1", 0), Redirect)
    servers = (elsewhere, redirect)
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = redirect.server_address[1]
        publisher = Publisher(api_url=f"http://127.0.0.1:{port}", api_key="the-api-key-42")
        with pytest.raises(PublishRefused) as info:
            publisher.notify("u1", "t", "m")
        assert info.value.status == 302
        assert seen == []
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_http_api_unreachable() -> None:
    port = free_port()
    with pytest.raises(PublishError) as info:
        Publisher(api_url=f"http://127.0.0.1:{port}", api_key="k-secret").notify("u", "t", "m")
    assert not isinstance(info.value, PublishRefused)
    assert str(info.value).startswith(f"publish to http://127.0.0.1:{port} failed: ")
    assert "ConnectionRefusedError" in str(info.value)
    assert "k-secret" not in str(info.value)


def test_from_env_reads_the_hubs_variables(
    redis_server: RedisServer, subscriber: Callable[[], bytes | None]
) -> None:
    env = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_server.port), "REDIS_DB": "0",
           "SMAPWS_CHANNEL_PREFIX": "n:", "SMAPWS_REDIS_TIMEOUT": "2"}  # fmt: skip
    with Publisher.from_env(env) as pub:
        assert pub.transport == "redis"
        pub.publish("u1", "t", {})
    # "n:" is not under the subscriber's pattern; publish once more to see it.
    with Publisher.from_env({**env, "SMAPWS_CHANNEL_PREFIX": "user_noti:"}) as pub:
        pub.publish("u1", "t", {})
    assert subscriber() == b'user_noti:u1 {"type":"t","payload":{}}'
    api = Publisher.from_env({"SMAPWS_API_KEY": API_KEY, "SMAPWS_PORT": "9"})
    assert (api.transport, api.server) == ("api", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="SMAPWS_API_KEY"):
        Publisher.from_env({})
    with pytest.raises(ValueError, match="SMAPWS_API_KEY"):
        AsyncPublisher.from_env({"REDIS_URL": redis_server.url}, api_url="http://h:1")


def test_from_env_with_sentinel_names_the_sentinels() -> None:
    port = free_port()
    env = {"REDIS_SENTINELS": f"127.0.0.1:{port}", "REDIS_SENTINEL_MASTER": "mymaster",
           "REDIS_PASSWORD": "pw-hunter2", "SMAPWS_REDIS_TIMEOUT": "1"}  # fmt: skip
    with Publisher.from_env(env) as pub, pytest.raises(PublishError) as info:
        pub.notify("u1", "t", "m")
    assert str(info.value).startswith(f"publish to sentinel://127.0.0.1:{port}/mymaster failed:")
    assert "MasterNotFoundError" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_core_invalid_message_is_the_public_one() -> None:
    assert InvalidMessage is CoreInvalidMessage
    assert issubclass(InvalidMessage, ValueError)
