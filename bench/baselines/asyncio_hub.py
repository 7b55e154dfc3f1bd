"""Baseline hub: what a competent team would write without smapws.

A short asyncio program on ``websockets`` (new asyncio API) and ``redis.asyncio`` that
honours the same contract as smapws, so that ``bench/run.py`` can drive both alike:

- env ``SMAPWS_HOST``, ``SMAPWS_PORT``, ``REDIS_URL``, ``JWT_SECRET``, ``SMAPWS_LOG_LEVEL``;
- ``GET /ws`` upgrades when cookie ``access_token`` holds an HS256 JWT with ``sub`` and
  ``exp`` (401 before the upgrade otherwise);
- ``PSUBSCRIBE user_noti:*``; each valid message (a JSON object with a string ``type``)
  goes to every open connection of that user, plus a ``timestamp`` if it has none;
- ``GET /ready`` answers 200 once subscribed (503 before), ``GET /health`` a small JSON.

It is deliberately idiomatic, not tuned: library defaults (ping every 20 s, no
backlog or buffer tuning), one ``websockets.broadcast`` per message as the
``websockets`` documentation recommends for fan-out.
"""

from __future__ import annotations

import asyncio
import datetime
import http
import http.cookies
import json
import logging
import os
import signal
from typing import Any

import jwt
import redis.asyncio as redis
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

PREFIX = "user_noti:"
log = logging.getLogger("baseline")

connections: dict[str, set[ServerConnection]] = {}
subscribed = asyncio.Event()


def user_of(request: Request, secret: str) -> str | None:
    """Return the ``sub`` of a valid ``access_token`` cookie, or None."""
    cookie = http.cookies.SimpleCookie()
    try:
        cookie.load(request.headers.get("Cookie", ""))
        token = cookie["access_token"].value
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp"]})
    except (KeyError, http.cookies.CookieError, jwt.InvalidTokenError):
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and sub else None


def make_process_request(secret: str) -> Any:
    """Build the handshake hook: health endpoints, then the cookie JWT check."""

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/ready":
            if subscribed.is_set():
                return connection.respond(http.HTTPStatus.OK, "ready\n")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        if request.path == "/health":
            body = {
                "status": "ok",
                "websocket": {
                    "active_connections": sum(len(c) for c in connections.values()),
                    "active_users": len(connections),
                },
            }
            response = connection.respond(http.HTTPStatus.OK, json.dumps(body))
            response.headers["Content-Type"] = "application/json"
            return response
        if request.path != "/ws":
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        user = user_of(request, secret)
        if user is None:
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        connection.user_id = user  # type: ignore[attr-defined]
        return None

    return process_request


async def handler(connection: ServerConnection) -> None:
    """Register the connection under its user until it closes; ignore what it sends."""
    user: str = connection.user_id  # type: ignore[attr-defined]
    connections.setdefault(user, set()).add(connection)
    try:
        async for _ in connection:
            pass
    finally:
        tabs = connections.get(user)
        if tabs is not None:
            tabs.discard(connection)
            if not tabs:
                del connections[user]


async def relay(redis_url: str) -> None:
    """Forward every ``user_noti:*`` message to the user's connections."""
    client = redis.from_url(redis_url)
    async with client.pubsub() as pubsub:
        await pubsub.psubscribe(PREFIX + "*")
        subscribed.set()
        async for message in pubsub.listen():
            if message["type"] != "pmessage":
                continue
            user = message["channel"].decode()[len(PREFIX) :]
            targets = connections.get(user)
            if not targets:
                continue
            try:
                data = json.loads(message["data"])
            except ValueError:
                log.warning("dropped a message that is not JSON")
                continue
            if not isinstance(data, dict) or not isinstance(data.get("type"), str):
                log.warning("dropped a message without a type")
                continue
            if "timestamp" not in data:
                now = datetime.datetime.now(datetime.UTC)
                data["timestamp"] = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            broadcast(targets, json.dumps(data))


async def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    host = os.environ.get("SMAPWS_HOST", "0.0.0.0")
    port = int(os.environ.get("SMAPWS_PORT", "8081"))
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    secret = os.environ["JWT_SECRET"]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay_task = asyncio.create_task(relay(redis_url))
    async with serve(handler, host, port, process_request=make_process_request(secret)):
        log.warning("baseline hub listening on %s:%d", host, port)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([stopping, relay_task], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
    if relay_task.done():
        relay_task.result()  # surface a subscriber crash
    relay_task.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("SMAPWS_LOG_LEVEL", "warning").upper())
    asyncio.run(main())
