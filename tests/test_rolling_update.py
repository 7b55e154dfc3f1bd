"""A rolling update as Kubernetes does one, with the browser client in
Chromium: three hubs behind a balancer; for each, a new hub starts, becomes
ready and joins the balancer, the old one leaves it and drains (SIGTERM).
Thirty tabs of fifteen users each get a notification every 1-3 s
throughout.

Run with ``-s`` to see the figures (``ROLLING ...`` lines). The same update
with this hub's window only, as before the fleet log
(``ROLLING_FLEET_HISTORY=off``), prints its figures and then fails.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.browser import BalancerProcess, HubProcess, PageServer, client, health, wait_for
from tests.conftest import RedisServer, token
from tests.test_browser import browser, hubs, pages, start_hub  # noqa: F401 (fixtures)

USERS = 15
TABS_PER_USER = 2

#: Records every WebSocket a page opens: when it was made and when it opened
#: (the 101 waits for the replay a resuming tab gets).
TIMING_SCRIPT = """
(() => {
  const Native = window.WebSocket;
  window.sockets = [];
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      const rec = { url: String(url), made: performance.now(), open: null };
      window.sockets.push(rec);
      this.addEventListener("open", () => { rec.open = performance.now(); });
    }
  };
})();
"""


class Publisher:
    """Each user gets a notification every 1-3 s, numbered per user. What
    PUBLISH confirmed is expected; what failed (Redis down) is uncertain."""

    def __init__(self, redis_url: str, users: list[str]) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        self.users = users
        self.expected: dict[str, list[int]] = {u: [] for u in users}
        self.uncertain: dict[str, set[int]] = {u: set() for u in users}
        self.stop = threading.Event()
        self.rng = random.Random(7)
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        due = {u: time.monotonic() + self.rng.uniform(0, 1) for u in self.users}
        count = dict.fromkeys(self.users, 0)
        while not self.stop.is_set():
            user = min(due, key=due.__getitem__)
            self.stop.wait(max(0.0, due[user] - time.monotonic()))
            if self.stop.is_set():
                break
            n = count[user]
            count[user] += 1
            data = f'{{"type":"notification","payload":{{"n":{n}}}}}'
            try:
                self.client.publish(f"user_noti:{user}", data)
                self.expected[user].append(n)
            except redis.RedisError:
                self.uncertain[user].add(n)
            due[user] = time.monotonic() + self.rng.uniform(1, 3)

    def __enter__(self) -> Publisher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.client.close()


def rolling_update(
    chromium: Any,
    page_server: PageServer,
    procs: list[HubProcess],
    tmp_path: Path,
    redis_server: RedisServer,
    *,
    kill_redis: bool,
) -> dict[str, Any]:
    """Run the update; return what each tab got, for the caller to judge."""
    settings = {
        "REDIS_URL": redis_server.url,
        "SMAPWS_DRAIN_TIMEOUT": 3,
        "SMAPWS_WRITE_WAIT": 1,
        "SMAPWS_RECONNECT_MAX": 0.5,
        "SMAPWS_FLEET_HISTORY": os.environ.get("ROLLING_FLEET_HISTORY", "on"),
    }
    old = [start_hub(procs, tmp_path, page_server, **settings) for _ in range(3)]
    balancer = BalancerProcess([h.port for h in old])
    users = [f"roll{i}" for i in range(USERS)]
    tabs: list[tuple[str, Any, int]] = []
    contexts = []
    with redis_server.client() as c:
        stats_before = c.info("commandstats")
    try:
        for user in users:
            page = None
            ctx = chromium.new_context()
            ctx.add_init_script(TIMING_SCRIPT)
            ctx.add_cookies(
                [{"name": "access_token", "value": token(user), "url": page_server.origin}]
            )
            page = ctx.new_page()
            page.goto(f"{page_server.origin}/test.html?hub={balancer.port}")
            page.wait_for_function("window.ready === true")
            contexts.append(ctx)
            for _ in range(TABS_PER_USER):
                tabs.append((user, page, page.evaluate("makeClient()")))
        total = USERS * TABS_PER_USER
        wait_for(
            lambda: sum(health(h.port)["websocket"]["active_connections"] for h in old) == total,
            20,
            "every tab connected",
        )
        with Publisher(redis_server.url, users) as publisher:
            time.sleep(3)
            for step, hub in enumerate(old):
                new = start_hub(procs, tmp_path, page_server, **settings)  # returns once /ready
                balancer.add(new.port)
                time.sleep(0.3)  # the balancer's probe sees it ready
                balancer.remove(hub.port)
                assert hub.stop() == 0  # SIGTERM: drain with 1001
                if kill_redis and step == 1:
                    redis_server.kill()
                    time.sleep(3)
                    redis_server.start()
                time.sleep(2)
            time.sleep(3)
        with redis_server.client() as c:
            stats_after = c.info("commandstats")
            keys = list(c.scan_iter(match="{user_noti:*}:smapws:log"))
            log_bytes = sum(c.memory_usage(k) or 0 for k in keys)
            log_entries = sum(c.llen(k) for k in keys)

        def done() -> bool:
            for user, page, i in tabs:
                got = {
                    m["payload"]["n"]
                    for m in client(page, i, "messages")
                    if m["type"] == "notification"
                }
                want = set(publisher.expected[user])
                if not want <= got and not client(page, i, "resyncs"):
                    return False
            return True

        with contextlib.suppress(AssertionError):  # judged by the caller
            wait_for(done, 20, "every tab caught up")
        time.sleep(0.5)  # a duplicate would arrive now
        result: dict[str, Any] = {"tabs": [], "publisher": publisher}
        for user, page, i in tabs:
            got = [
                m["payload"]["n"]
                for m in client(page, i, "messages")
                if m["type"] == "notification"
            ]
            result["tabs"].append(
                {
                    "user": user,
                    "got": got,
                    "expected": publisher.expected[user],
                    "uncertain": publisher.uncertain[user],
                    "resyncs": client(page, i, "resyncs"),
                    "states": client(page, i, "states"),
                }
            )
        latencies = [
            s["open"] - s["made"]
            for ctx in contexts
            for s in ctx.pages[0].evaluate("window.sockets")
            if "since=" in s["url"] and s["open"] is not None
        ]
        published = sum(len(v) for v in publisher.expected.values())

        def calls(stats: dict[str, Any], name: str) -> int:
            return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))

        commands = sum(
            calls(stats_after, n) - calls(stats_before, n)
            for n in ("evalsha", "eval")  # what hubs send; a script's own calls are counted too
        )
        result.update(
            published=published,
            latencies=latencies,
            commands=commands,
            log_bytes=log_bytes,
            log_entries=log_entries,
        )
        return result
    finally:
        for ctx in contexts:
            ctx.close()
        balancer.kill()


def judge(result: dict[str, Any], label: str) -> tuple[int, int, int, int]:
    """Print the figures; return (tabs resynced, lost, duplicated, out of order)."""
    resynced = lost = duplicated = disorder = 0
    for tab in result["tabs"]:
        got = tab["got"]
        resynced += bool(tab["resyncs"])
        lost += len(set(tab["expected"]) - set(got))
        duplicated += len(got) - len(set(got))
        disorder += any(b <= a for a, b in itertools.pairwise(got))
    lat = sorted(result["latencies"])
    p50 = statistics.median(lat) if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    published = result["published"]
    print(
        f"\nROLLING {label} fleet={os.environ.get('ROLLING_FLEET_HISTORY', 'on')} "
        f"published={published} tabs={len(result['tabs'])} resynced_tabs={resynced} "
        f"lost={lost} duplicated={duplicated} out_of_order_tabs={disorder} "
        f"resumes={len(lat)} resume_101_p50_ms={p50:.1f} p99_ms={p99:.1f} "
        f"redis_scripts_per_message={result['commands'] / max(1, published):.2f} "
        f"log_bytes_per_entry={result['log_bytes'] / max(1, result['log_entries']):.0f}"
    )
    return resynced, lost, duplicated, disorder


@pytest.mark.parametrize("kill_redis", [False, True], ids=["plain", "redis-killed"])
def test_a_rolling_update_loses_nothing_and_hides_no_gap(
    browser: Any,  # noqa: F811
    pages: PageServer,  # noqa: F811
    hubs: list[HubProcess],  # noqa: F811
    tmp_path: Path,
    own_redis: RedisServer,
    kill_redis: bool,
) -> None:
    result = rolling_update(browser, pages, hubs, tmp_path, own_redis, kill_redis=kill_redis)
    resynced, lost, duplicated, disorder = judge(result, "redis-killed" if kill_redis else "plain")
    assert result["published"] > 100
    assert (duplicated, disorder) == (0, 0)
    for tab in result["tabs"]:
        # Every tab was drained at least once (1001) and resumed.
        assert any(s["state"] == "reconnecting" and s.get("code") == 1001 for s in tab["states"])
        if not kill_redis:  # every notification, once, in order, and no resync
            assert (tab["got"], tab["resyncs"]) == (tab["expected"], []), tab["user"]
            continue
        missing = set(tab["expected"]) - set(tab["got"])
        extra = set(tab["got"]) - set(tab["expected"]) - tab["uncertain"]
        assert not extra, tab["user"]
        # Whatever a tab lacks, it was told (a resync) that it may lack it.
        assert not missing or tab["resyncs"], (tab["user"], sorted(missing))
    if kill_redis:
        assert resynced > 0  # honest: the outage is told
    else:
        assert (resynced, lost) == (0, 0)
