"""smapws-client.js in headless Chromium against real hubs on a real Redis.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright's sync API;
the hubs are real processes; a rolling restart is SIGTERM, drain, start, behind
tests/tcpbalancer.py. Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smapws import __version__

from .browser import (
    BalancerProcess,
    HubProcess,
    PageServer,
    chromium,
    client,
    get,
    health,
    metric,
    open_test_page,
    wait_for,
)
from .conftest import RedisServer, free_port, token

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def pages() -> Iterator[PageServer]:
    server = PageServer()
    yield server
    server.close()


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[list[HubProcess]]:
    """Hub processes a test starts; all killed at the end."""
    started: list[HubProcess] = []
    yield started
    for hub in started:
        hub.kill()


def start_hub(
    hubs: list[HubProcess], tmp_path: Path, pages: PageServer | None = None, **settings: Any
) -> HubProcess:
    """A hub process; with ``pages``, one that allows the dev server's origin."""
    if pages is not None:
        settings["SMAPWS_ALLOWED_ORIGINS"] = pages.origin
    hub = HubProcess(tmp_path, **settings)
    hubs.append(hub)
    return hub.start()


def notifications(page: Any, i: int) -> list[Any]:
    return [m["payload"]["n"] for m in client(page, i, "messages") if m["type"] == "notification"]


# -- served, packaged ------------------------------------------------------------


def test_the_client_is_served_as_a_module_and_packaged(
    hubs: list[HubProcess], tmp_path: Path
) -> None:
    hub = start_hub(hubs, tmp_path)
    status, body = get(hub.port, "/smapws-client.js")
    assert status == 200
    assert body == (ROOT / "smapws/static/smapws-client.js").read_bytes()
    assert b"export class WebSocketService" in body
    package = json.loads((ROOT / "smapws/static/package.json").read_text())
    assert package["version"] == __version__
    assert package["type"] == "module"
    assert package["exports"]["."]["default"] == "./smapws-client.js"


def test_backoff_is_full_jitter_doubling_to_the_cap(
    browser: Any,
    pages: PageServer,
    redis_server: RedisServer,
    hubs: list[HubProcess],
    tmp_path: Path,
) -> None:
    hub = start_hub(hubs, tmp_path, pages, REDIS_URL=redis_server.url)
    page = open_test_page(browser, pages, hub.port, token("u1"))
    caps = page.evaluate("[0,1,2,3,4,5,6,7,50].map((a) => backoffDelay(a, 500, 20000, () => 1))")
    assert caps == [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000]
    lows = page.evaluate("[0, 6].map((a) => backoffDelay(a, 500, 20000, () => 0))")
    assert lows == [0, 0]
    page.context.close()


# -- the seed's flows ------------------------------------------------------------


def test_seed_flows_progress_completion_notification_alert_multi_tab(
    browser: Any,
    pages: PageServer,
    redis_server: RedisServer,
    hubs: list[HubProcess],
    tmp_path: Path,
) -> None:
    hub = start_hub(hubs, tmp_path, pages, REDIS_URL=redis_server.url)
    tab1 = open_test_page(browser, pages, hub.port, token("user_123"))
    tab2 = open_test_page(browser, pages, hub.port, token("user_123"))
    other = open_test_page(browser, pages, hub.port, token("user_999"))
    for page in (tab1, tab2, other):
        page.evaluate("makeClient()")
    wait_for(lambda: health(hub.port)["websocket"]["active_connections"] == 3, 10, "3 tabs")
    progress = {
        "project_id": "proj_xyz", "status": "CRAWLING", "total": 1000, "done": 150,
        "errors": 2, "progress_percent": 15.0,
    }  # fmt: skip
    done = {**progress, "status": "DONE", "done": 1000, "progress_percent": 100.0}
    note = {"title": "New Comment", "message": "Someone commented", "level": "info"}
    alert = {"title": "Quota", "message": "80% used", "severity": "warning"}
    redis_server.publish("user_123", {"type": "project_progress", "payload": progress})
    redis_server.publish("user_123", {"type": "project_completed", "payload": done})
    redis_server.publish("user_123", {"type": "notification", "payload": note})
    redis_server.publish("user_123", {"type": "alert", "payload": alert})
    redis_server.publish("user_123", {"type": "something_new", "payload": {"x": 1}})
    for tab in (tab1, tab2):
        wait_for(lambda tab=tab: len(client(tab, 0, "messages")) == 5, 10, "5 messages")
        assert client(tab, 0, "events") == [
            ["progress", progress],
            ["completed", done],
            ["notification", note],
            ["alert", alert],
        ]
        messages = client(tab, 0, "messages")
        assert messages[4]["type"] == "something_new"
        assert all(len(m["id"]) == 16 for m in messages)
        assert client(tab, 0, "service.state") == "open"
    # Both tabs got the same ids; the other user got nothing.
    assert [m["id"] for m in client(tab1, 0, "messages")] == [
        m["id"] for m in client(tab2, 0, "messages")
    ]
    assert client(other, 0, "messages") == []
    for page in (tab1, tab2, other):
        page.context.close()


# -- recovery across a rolling restart ---------------------------------------------


def test_rolling_restart_behind_a_balancer_loses_nothing(
    browser: Any,
    pages: PageServer,
    redis_server: RedisServer,
    hubs: list[HubProcess],
    tmp_path: Path,
) -> None:
    drain = {"SMAPWS_DRAIN_TIMEOUT": 3, "SMAPWS_WRITE_WAIT": 1}
    a = start_hub(hubs, tmp_path, pages, REDIS_URL=redis_server.url, **drain)
    b = start_hub(hubs, tmp_path, pages, REDIS_URL=redis_server.url, **drain)
    balancer = BalancerProcess([a.port, b.port])
    try:
        page = open_test_page(browser, pages, balancer.port, token("roll"))
        # A fixed backoff draw (half the cap: 250 ms for the first retry), so
        # that every reconnect misses messages published every 100 ms.
        page.evaluate("Math.random = () => 0.5")
        clients = 4
        for _ in range(clients):
            page.evaluate("makeClient()")
        wait_for(
            lambda: (
                sum(health(h.port)["websocket"]["active_connections"] for h in (a, b)) == clients
            ),
            10,
            "clients connected on both hubs",
        )
        assert health(a.port)["websocket"]["active_connections"] > 0
        assert health(b.port)["websocket"]["active_connections"] > 0

        published = 0
        stop = threading.Event()

        def publisher() -> None:
            nonlocal published
            while not stop.is_set():
                redis_server.publish("roll", {"type": "notification", "payload": {"n": published}})
                published += 1
                time.sleep(0.1)

        thread = threading.Thread(target=publisher)
        thread.start()
        try:
            time.sleep(1.0)
            a.restart()  # SIGTERM: drain (1001), exit 0, start again
            time.sleep(1.0)
            b.restart()
            time.sleep(1.0)
        finally:
            stop.set()
            thread.join()
        expected = list(range(published))
        for i in range(clients):
            wait_for(
                lambda i=i: len(notifications(page, i)) >= published, 15, f"client {i} catch-up"
            )
        time.sleep(0.3)  # anything extra (a duplicate) would arrive now
        lost = duplicated = 0
        for i in range(clients):
            got = notifications(page, i)
            lost += len(set(expected) - set(got))
            duplicated += len(got) - len(set(got))
            assert got == expected, f"client {i}"
            assert client(page, i, "resyncs") == []
            states = client(page, i, "states")
            assert any(s["state"] == "reconnecting" and s.get("code") == 1001 for s in states)
            assert any(s["state"] == "open" and s.get("resumed") for s in states)
        replayed = metric(a.port, "websocket_replayed_messages_total")
        print(
            f"\nROLLING published={published} clients={clients} lost={lost} "
            f"duplicated={duplicated} replayed_by_restarted_a={replayed:.0f}"
        )
        # The clients drained from b reconnected to the restarted a, which
        # replayed what they missed during the fixed 250 ms backoff.
        assert replayed > 0
        page.context.close()
    finally:
        balancer.kill()


# -- token expiry, disconnect, 1009, online ------------------------------------------


def test_token_expiry_closes_1008_then_on_token_expired_then_reconnect(
    browser: Any,
    pages: PageServer,
    redis_server: RedisServer,
    hubs: list[HubProcess],
    tmp_path: Path,
) -> None:
    hub = start_hub(hubs, tmp_path, pages, REDIS_URL=redis_server.url)
    # The first token expires in 3 s; the page's onTokenExpired sets a fresh
    # one (as a page would after asking its gateway to refresh the cookie).
    page = open_test_page(browser, pages, hub.port, token("exp", ttl=3), http_only=False)
    page.evaluate(f"window.freshToken = {json.dumps(token('exp'))}")
    page.evaluate("makeClient({ refresh: true })")
    wait_for(lambda: client(page, 0, "service.state") == "open", 10, "open")
    redis_server.publish("exp", {"type": "notification", "payload": {"n": 0}})
    wait_for(lambda: page.evaluate("window.refreshes") == 1, 10, "onTokenExpired")
    wait_for(lambda: [s["state"] for s in client(page, 0, "states")][-1] == "open", 10, "reopened")
    redis_server.publish("exp", {"type": "notification", "payload": {"n": 1}})
    wait_for(lambda: notifications(page, 0) == [0, 1], 10, "both notifications")
    closes = [s for s in client(page, 0, "states") if s["state"] == "reconnecting"]
    assert closes[0]["code"] == 1008
    assert page.evaluate("window.refreshes") == 1
    page.context.close()


def test_disconnect_stops_reconnecting_even_during_a_backoff(
    browser: Any,
    pages: PageServer,
    redis_server: RedisServer,
    hubs: list[HubProcess],
    tmp_path: Path,
) -> None:
    hub = start_hub(hubs, tmp_path, pages, REDIS_URL=redis_server.url)
    page = open_test_page(browser, pages, hub.port, token("dis"))
    page.evaluate("makeClient({ minDelay: 300, maxDelay: 300 })")
    wait_for(lambda: client(page, 0, "service.state") == "open", 10, "open")
    page.evaluate("window.clients[0].service.disconnect()")
    assert client(page, 0, "service.state") == "closed"
    wait_for(lambda: health(hub.port)["websocket"]["active_connections"] == 0, 5, "closed")
    time.sleep(1.0)
    assert health(hub.port)["websocket"]["active_connections"] == 0
    # Again while the client waits to retry: the hub is gone, the client
    # backs off; disconnect() then; the hub comes back; nobody connects.
    page.evaluate("window.clients[0].service.connect()")
    wait_for(lambda: health(hub.port)["websocket"]["active_connections"] == 1, 10, "open again")
    hub.stop()
    wait_for(lambda: client(page, 0, "service.state") == "reconnecting", 10, "backing off")
    page.evaluate("window.clients[0].service.disconnect()")
    hub.start()
    time.sleep(1.5)
    assert health(hub.port)["websocket"]["active_connections"] == 0
    states = [s["state"] for s in client(page, 0, "states")]
    assert states[-1] == "closed"
    page.context.close()


def test_1009_does_not_reconnect_in_a_loop(
    browser: Any,
    pages: PageServer,
    redis_server: RedisServer,
    hubs: list[HubProcess],
    tmp_path: Path,
) -> None:
    hub = start_hub(hubs, tmp_path, pages, REDIS_URL=redis_server.url)
    page = open_test_page(browser, pages, hub.port, token("big"))
    page.evaluate("makeClient({ minDelay: 50, maxDelay: 50 })")
    wait_for(lambda: client(page, 0, "service.state") == "open", 10, "open")
    page.evaluate("window.clients[0].service.ws.send('x'.repeat(10000))")
    wait_for(lambda: client(page, 0, "service.state") == "closed", 10, "closed after 1009")
    time.sleep(1.0)
    assert [s.get("code") for s in client(page, 0, "states")][-1] == 1009
    assert metric(hub.port, "websocket_connections_total") == 1
    page.context.close()


def test_online_event_reconnects_at_once(
    browser: Any,
    pages: PageServer,
    redis_server: RedisServer,
    hubs: list[HubProcess],
    tmp_path: Path,
) -> None:
    hub = start_hub(hubs, tmp_path, pages, REDIS_URL=redis_server.url)
    page = open_test_page(browser, pages, hub.port, token("net"))
    # A backoff of a minute (fixed draw), so only the online event can
    # explain a quick reconnect.
    page.evaluate("Math.random = () => 0.999")
    page.evaluate("makeClient({ minDelay: 60000, maxDelay: 60000 })")
    wait_for(lambda: client(page, 0, "service.state") == "open", 10, "open")
    hub.stop()
    wait_for(lambda: client(page, 0, "service.state") == "reconnecting", 10, "backing off")
    delay = [s for s in client(page, 0, "states") if s["state"] == "reconnecting"][-1]["delay"]
    assert delay > 50_000
    hub.start()
    time.sleep(0.5)
    assert client(page, 0, "service.state") == "reconnecting"
    page.evaluate("window.dispatchEvent(new Event('online'))")
    wait_for(lambda: client(page, 0, "service.state") == "open", 5, "open after online")
    page.context.close()


# -- the demo ------------------------------------------------------------------------


def test_a_default_hub_has_no_demo_page_and_no_login(
    hubs: list[HubProcess], tmp_path: Path
) -> None:
    hub = start_hub(hubs, tmp_path)
    assert get(hub.port, "/demo")[0] == 404
    assert get(hub.port, "/demo/login", method="POST")[0] == 404
    assert "Set-Cookie" not in str(get(hub.port, "/demo/login", method="POST"))


@pytest.mark.parametrize("internal_port", [False, True], ids=["one-port", "internal-port"])
def test_demo_page_bars_move(
    browser: Any, hubs: list[HubProcess], tmp_path: Path, internal_port: bool
) -> None:
    # With SMAPWS_INTERNAL_PORT the page and the client it imports are still
    # on the public port (the shipped ConfigMap sets an internal port).
    settings = {"SMAPWS_INTERNAL_PORT": str(free_port())} if internal_port else {}
    hub = HubProcess(tmp_path, command="demo", **settings)
    hubs.append(hub)
    hub.start()
    page = browser.new_context(viewport={"width": 960, "height": 640}).new_page()
    page.goto(f"http://127.0.0.1:{hub.port}/demo")
    page.wait_for_function("document.getElementById('state').textContent === 'open'")
    page.wait_for_selector("progress", timeout=10_000)
    assert page.inner_text("#user").startswith("logged in as demo-")

    def values() -> dict[str, float]:
        result: dict[str, float] = page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('.project')].map("
            "(r) => [r.dataset.project, r.querySelector('progress').value]))"
        )
        return result

    first = values()
    wait_for(lambda: any(values().get(k, 0) > v for k, v in first.items()), 10, "a bar moves")
    wait_for(lambda: page.inner_text("#notifications").strip() != "", 10, "a notification")
    # The cookie is HttpOnly: the page cannot read it.
    assert "access_token" not in page.evaluate("document.cookie")
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    page.context.close()


def test_demo_page_shows_finished_bars_apart_and_how_to_send_a_message(
    browser: Any, hubs: list[HubProcess], tmp_path: Path
) -> None:
    """What a newcomer looks for on the demo page: finished bars (DONE,
    FAILED) are not the running ones' colour, "Drop connection" is only
    offered while connected, and the command the page shows for sending
    your own message works as printed."""
    hub = HubProcess(tmp_path, command="demo", SMAPWS_API_KEY="dev-key-0123456789")
    hubs.append(hub)
    hub.start()
    page = browser.new_context(viewport={"width": 960, "height": 900}).new_page()
    page.goto(f"http://127.0.0.1:{hub.port}/demo")
    page.wait_for_function("document.getElementById('state').textContent === 'open'")
    assert not page.is_disabled("#blip")

    page.wait_for_selector(
        '.project[data-status="DONE"], .project[data-status="FAILED"]', timeout=40_000
    )
    bars: list[list[str]] = page.evaluate(
        "[...document.querySelectorAll('.project')].map((r) => "
        "[r.dataset.status, getComputedStyle(r.querySelector('progress')).accentColor])"
    )
    finished = {colour for status, colour in bars if status in ("DONE", "FAILED")}
    running = {colour for status, colour in bars if status not in ("DONE", "FAILED")}
    assert finished and running and not finished & running, bars

    command = page.inner_text("#send-command")
    user = page.inner_text("#user").removeprefix("logged in as ")
    assert f"--user {user} " in command and f"--url http://127.0.0.1:{hub.port} " in command
    smapws = f"{sys.executable} -m smapws"
    sent = subprocess.run(
        ["bash", "-c", command.replace(" smapws publish ", f" {smapws} publish ", 1)],
        env={"PATH": os.environ["PATH"]},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: "Hello: sent by hand" in page.inner_text("#notifications"), 10, "it arrives")

    page.click("#toggle")
    page.wait_for_function("document.getElementById('state').textContent === 'closed'")
    assert page.is_disabled("#blip")
    page.context.close()


# -- the client's own logic, against a scripted socket -----------------------------

#: A WebSocket stand-in the page's client talks to: the test scripts what
#: "the hub" sends on each connection and sees the URLs asked for.
FAKE_SOCKET = """
window.sockets = [];
window.FakeSocket = class {
  constructor(url) {
    this.url = url;
    window.sockets.push(this);
    setTimeout(() => this.onopen(), 0);
  }
  deliver(messages) { for (const m of messages) this.onmessage({ data: JSON.stringify(m) }); }
  drop(code = 1006) { this.onclose({ code }); }
  close() {}
  send() {}
};
true;
"""


def fake_socket_page(
    browser: Any, pages: PageServer, hubs: list[HubProcess], tmp_path: Path
) -> Any:
    """The test page with :data:`FAKE_SOCKET` defined (and a hub to import from)."""
    hub = start_hub(hubs, tmp_path, pages)
    page = open_test_page(browser, pages, hub.port, token("fake"))
    page.evaluate(FAKE_SOCKET)
    return page


def test_resuming_sends_since_and_delivers_each_message_once_in_order(
    browser: Any, pages: PageServer, hubs: list[HubProcess], tmp_path: Path
) -> None:
    page = fake_socket_page(browser, pages, hubs, tmp_path)
    page.evaluate("makeClient({ WebSocket: FakeSocket, minDelay: 10, maxDelay: 10 })")
    page.wait_for_function("window.sockets.length === 1 && window.clients[0].service.connected")
    assert "since=" not in page.evaluate("sockets[0].url")

    def note(mid: str, n: int) -> dict[str, Any]:
        return {"type": "notification", "payload": {"n": n}, "id": mid}

    ids = [f"{i:016x}" for i in range(10)]
    page.evaluate(f"sockets[0].deliver({json.dumps([note(ids[i], i) for i in range(3)])})")
    page.evaluate("sockets[0].drop(1001)")
    page.wait_for_function("window.sockets.length === 2 && window.clients[0].service.connected")
    url = page.evaluate("sockets[1].url")
    assert f"since={ids[2]}" in url and "since_age=" in url
    # A replay that repeats what was delivered (a hub that numbered a copy
    # differently) is cut to the new messages; after the first new one,
    # nothing is dropped, not even an id seen long ago (ids of identical
    # messages come back once they left every window).
    replay = [note(ids[1], 1), note(ids[2], 2), note(ids[3], 3), note(ids[4], 4), note(ids[0], 0)]
    page.evaluate(f"sockets[1].deliver({json.dumps(replay)})")
    assert notifications(page, 0) == [0, 1, 2, 3, 4, 0]
    # A resync forgets: what follows is delivered whatever it repeats.
    page.evaluate("sockets[1].drop(1013)")
    page.wait_for_function("window.sockets.length === 3 && window.clients[0].service.connected")
    assert f"since={ids[0]}" in page.evaluate("sockets[2].url")
    gap = [{"type": "resync", "payload": {"reason": "history_gap"}}, note(ids[4], 4)]
    page.evaluate(f"sockets[2].deliver({json.dumps(gap)})")
    assert client(page, 0, "resyncs") == [{"reason": "history_gap"}]
    assert notifications(page, 0) == [0, 1, 2, 3, 4, 0, 4]
    page.context.close()


def test_retain_connects_while_needed_and_leaves_an_explicit_connect_alone(
    browser: Any, pages: PageServer, hubs: list[HubProcess], tmp_path: Path
) -> None:
    # What the React hooks and the Vue composable rely on.
    page = fake_socket_page(browser, pages, hubs, tmp_path)
    seen = page.evaluate(
        """async () => {
      const hub = new URLSearchParams(location.search).get("hub");
      const { WebSocketService } = await import(`http://127.0.0.1:${hub}/smapws-client.js`);
      const tick = () => new Promise((resolve) => setTimeout(resolve, 20));
      const s = new WebSocketService({ url: "ws://127.0.0.1:9/ws", WebSocket: FakeSocket });
      const seen = [s.state];
      const first = s.retain();
      await tick();
      seen.push(s.state, sockets.length);
      // StrictMode: the release, then at once a retain: the same socket.
      first();
      const second = s.retain();
      await tick();
      seen.push(s.state, sockets.length);
      second();
      second(); // idempotent: the count does not go below zero
      await tick();
      seen.push(s.state);
      // An app that called connect() itself keeps its connection.
      s.connect();
      const third = s.retain();
      third();
      await tick();
      seen.push(s.state, sockets.length);
      return seen;
    }"""
    )
    assert seen == ["idle", "open", 1, "open", 1, "closed", "open", 2]
    page.context.close()


def test_refused_upgrades_refresh_the_token_once_then_connect(
    browser: Any, pages: PageServer, redis_server: RedisServer, hubs: list[HubProcess],
    tmp_path: Path,
) -> None:  # fmt: skip
    # The laptop slept past the token's expiry: the hub answers 401 before
    # the upgrade, which a page sees only as 1006. After two such failures
    # the client asks onTokenExpired for a fresh cookie.
    hub = start_hub(hubs, tmp_path, pages, REDIS_URL=redis_server.url)
    page = open_test_page(browser, pages, hub.port, token("slept", ttl=-60), http_only=False)
    page.evaluate(f"window.freshToken = {json.dumps(token('slept'))}")
    page.evaluate("makeClient({ refresh: true, minDelay: 50, maxDelay: 50 })")
    wait_for(lambda: client(page, 0, "service.state") == "open", 10, "open after a refresh")
    assert page.evaluate("window.refreshes") == 1
    failures = [s for s in client(page, 0, "states") if s["state"] == "reconnecting"]
    assert len(failures) >= 2 and all(s["code"] == 1006 for s in failures)
    assert metric(hub.port, "websocket_connections_total") == 1
    page.context.close()
