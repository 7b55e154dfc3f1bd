"""The demo: a page at ``/demo``, a dev login, and a simulated Project service.

Only under ``smapws demo`` or ``SMAPWS_DEMO=true``: the front door knows
:data:`ROUTES` only then, and ``serve`` starts :func:`simulate` only then.
The dev login hands out a token to anyone who asks (for a made-up user
``demo-…``), which is what a demo needs and what production must never have.

The simulated Project service publishes exactly what the seed's Project
service does (``project_progress`` with ``progress_percent`` = done / total x
100, then ``project_completed`` with ``DONE`` or ``FAILED``), plus
notifications and alerts, through the hub's own broker: the messages take the
real path (broker, router, ids, replay window, snapshot, outboxes).
"""

from __future__ import annotations

import json
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Final

import trio

from smapws._core.auth import MAC_ALGORITHMS, AuthError, mint_for
from smapws._core.http import RequestHead, parse_cookies, response
from smapws._core.publish import (
    FINAL_STATUSES,
    alert_payload,
    encode,
    notification_payload,
)
from smapws._core.publish import (
    progress_message as seed_progress,
)
from smapws._io import assets
from smapws._io.app import App
from smapws._io.brokers import BrokerError
from smapws._log import RateLimitedLog, fields, logger

#: Paths that exist only in demo mode, with their methods.
ROUTES: Final = {"/demo": ("GET", "HEAD"), "/demo/login": ("POST",)}

#: Users the simulator publishes for (and the only ones the login makes).
USER_PREFIX: Final = "demo-"
#: Lifetime of a demo login token unless ``?ttl=`` says otherwise (bounds).
LOGIN_TTL_S: Final = 3600.0
MIN_TTL_S: Final = 5.0
MAX_TTL_S: Final = 86400.0

#: The simulator's step, and how long it keeps a user's projects after the
#: user's last tab closed (so that a reconnecting tab finds the run going on).
TICK_S: Final = 0.5
FORGET_AFTER_S: Final = 300.0
#: Projects running at once per user.
RUNNING: Final = 3
#: At most one "demo publish failed" line per this many seconds.
PUBLISH_ERROR_LOG_INTERVAL: Final = 10.0

_JSON: Final = "application/json"


def respond(app: App, head: RequestHead) -> bytes:
    """The response to a demo route (the front door checked the method)."""
    if head.path == "/demo":
        return response(
            200, assets.read(assets.DEMO_HTML), content_type=assets.HTML,
            head_only=head.method == "HEAD",
        )  # fmt: skip
    return _login(app, head)


def _login(app: App, head: RequestHead) -> bytes:
    """Set the ``access_token`` cookie for a demo user: the one the request's
    valid cookie names, else a new one. ``?ttl=`` (seconds) shortens the
    token, to watch an expiry."""
    auth = app.config.auth
    assert auth is not None
    if auth.algorithms[0] not in MAC_ALGORITHMS:
        refusal = {"error": "the demo login signs with JWT_SECRET (HS* only)"}
        return response(501, json.dumps(refusal).encode(), content_type=_JSON)
    try:
        ttl = min(max(float(head.query.get("ttl", LOGIN_TTL_S)), MIN_TTL_S), MAX_TTL_S)
    except ValueError:
        return response(400, b'{"error": "ttl: expected seconds"}', content_type=_JSON)
    if ttl != ttl:  # NaN
        ttl = LOGIN_TTL_S
    user = None
    cookie = parse_cookies(head.header("cookie")).get("access_token")
    if cookie:
        try:
            claims = app.tokens.verify(cookie, now=time.time())
        except AuthError:
            pass
        else:
            if claims.user_id.startswith(USER_PREFIX):
                user = claims.user_id
    user = user or USER_PREFIX + secrets.token_hex(4)
    token = mint_for(auth, user, now=time.time(), ttl=ttl)
    cookie_header = f"access_token={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(ttl)}"
    body = json.dumps({"user": user, "expires_in_s": int(ttl)}).encode()
    logger.info("demo login", extra=fields(user=user, ttl_s=int(ttl)))
    return response(200, body, content_type=_JSON, headers=(("Set-Cookie", cookie_header),))


# -- the simulated Project service ---------------------------------------------


@dataclass
class _Project:
    project_id: str
    total: int
    rate: int  # items per tick
    fails: bool
    done: int = 0
    errors: int = 0
    status: str = "INITIALIZING"


@dataclass
class _User:
    projects: list[_Project] = field(default_factory=list)
    seen_at: float = 0.0
    count: int = 0  # projects started


def progress_message(p: _Project) -> bytes:
    """The seed's Project-service message for ``p``'s current state, built
    by the publishers' own rule (:func:`smapws._core.publish.progress_message`),
    so the demo cannot drift from what a real service publishes."""
    mtype, payload = seed_progress(
        project_id=p.project_id, status=p.status, total=p.total, done=p.done, errors=p.errors
    )
    return encode(mtype, payload)


def _step(p: _Project, rng: random.Random) -> list[bytes]:
    """Advance ``p`` by one tick; the messages to publish."""
    out: list[bytes] = []
    if p.status == "INITIALIZING":
        p.status = "CRAWLING"
    else:
        n = min(p.rate + rng.randint(-p.rate // 2, p.rate // 2), p.total - p.done)
        p.done += n
        p.errors += sum(1 for _ in range(n) if rng.random() < 0.02)
        if p.fails and p.done >= p.total * 0.6:
            p.status = "FAILED"
        elif p.done >= p.total:
            p.status = "DONE"
        elif p.done >= p.total * 0.8:
            p.status = "PROCESSING"
    out.append(progress_message(p))
    if p.status == "DONE":
        out.append(
            encode(
                "notification",
                notification_payload(
                    "Project finished", f"{p.project_id}: {p.done} items, {p.errors} errors", "info"
                ),
            )
        )
    elif p.status == "FAILED":
        out.append(
            encode(
                "alert",
                alert_payload(
                    "Project failed", f"{p.project_id} stopped at {p.done}/{p.total}", "error"
                ),
            )
        )
    return out


async def simulate(app: App, *, seed: int | None = None) -> None:
    """Run the simulated Project service until cancelled: for every demo user
    with a tab open (or open within :data:`FORGET_AFTER_S`), keep
    :data:`RUNNING` projects going, publishing their progress every
    :data:`TICK_S` and their completion, with a notification or an alert.

    A publish the broker refuses (Redis down under ``SMAPWS_DEMO=true``, the
    router's queue full) ends that tick, with one log line at most every
    :data:`PUBLISH_ERROR_LOG_INTERVAL`; the next tick goes on. It never ends
    the hub."""
    rng = random.Random(seed)
    users: dict[str, _User] = {}
    errors = RateLimitedLog(PUBLISH_ERROR_LOG_INTERVAL)
    while True:
        await trio.sleep(TICK_S)
        try:
            await _tick(app, users, rng)
        except BrokerError as exc:
            suppressed = errors.allow("publish", trio.current_time())
            if suppressed is not None:
                logger.warning(
                    "demo publish failed",
                    extra=fields(error=str(exc), suppressed_since_last=suppressed),
                )


async def _tick(app: App, users: dict[str, _User], rng: random.Random) -> None:
    """One step of the simulated service; raises :class:`BrokerError`."""
    prefix = app.config.channel_prefix.encode()
    now = trio.current_time()
    for user_id in app.hub.users():
        if user_id.startswith(USER_PREFIX):
            users.setdefault(user_id, _User()).seen_at = now
    for user_id in [u for u, s in users.items() if now - s.seen_at > FORGET_AFTER_S]:
        del users[user_id]
    for user_id, state in users.items():
        channel = prefix + user_id.encode()
        if state.count == 0:
            welcome = notification_payload(
                "Welcome",
                f"the simulated Project service keeps {RUNNING} projects running "
                "for you, a new one in place of each that finishes",
                "info",
            )
            await app.broker.publish(channel, encode("notification", welcome))
        state.projects = [p for p in state.projects if p.status not in FINAL_STATUSES]
        while len(state.projects) < RUNNING:
            state.count += 1
            state.projects.append(
                _Project(
                    project_id=f"proj_{state.count:03d}",
                    total=rng.choice((200, 400, 600, 1000)),
                    rate=rng.choice((10, 20, 30)),
                    fails=rng.random() < 0.25,
                )
            )
        for project in state.projects:
            for data in _step(project, rng):
                await app.broker.publish(channel, data)
