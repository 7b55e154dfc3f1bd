"""``smapws``: serve | publish | token.

Every setting is an environment variable with a matching flag (``smapws serve
--help``); flags win. Exit codes: 0 success, 1 runtime failure, 2 usage or
configuration error (one line on stderr naming the variable).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from smapws import _log
from smapws._config import Config, ConfigError, add_arguments, load
from smapws._core.auth import MAC_ALGORITHMS, mint
from smapws._core.envelope import InvalidMessage, encode_message, parse
from smapws._version import __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smapws", description="Real-time notification hub: Redis pub/sub to WebSockets."
    )
    p.add_argument("--version", action="version", version=f"smapws {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the hub (the default command)")
    add_arguments(serve)

    demo = sub.add_parser(
        "demo",
        help="the hub with a live demo page at /demo (embedded broker)",
        description="Run the hub on the embedded broker with the demo page at /demo, a dev "
        "login and a simulated Project service. Listens on 127.0.0.1 unless SMAPWS_HOST "
        "says otherwise; a random JWT_SECRET is made when none is set. Never in production.",
    )
    add_arguments(demo)

    pub = sub.add_parser(
        "publish",
        help="publish a message through the configured broker",
        description="Publish with Redis PUBLISH when Redis is configured, else through "
        "the HTTP publish API of a running hub (needs SMAPWS_API_KEY).",
    )
    pub.add_argument("--user", required=True, help="user id (channel = prefix + user)")
    pub.add_argument("--type", required=True, dest="mtype", help="message type")
    pub.add_argument("--payload", default="{}", help="payload as a JSON object")
    pub.add_argument("--url", default=None, help="hub base URL for the HTTP publish API")
    add_arguments(pub)

    tok = sub.add_parser("token", help="mint a development JWT signed with JWT_SECRET")
    tok.add_argument("--user", required=True, help="user id (sub claim)")
    tok.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    add_arguments(tok)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    flags = {k: v for k, v in vars(args).items() if v is not None}
    env: Mapping[str, str] = os.environ
    if command == "demo":
        env, flags = _demo_settings(env, flags)
    try:
        config = load(env, flags, require_auth=command != "publish")
    except ConfigError as exc:
        print(f"smapws: configuration error: {exc}", file=sys.stderr)
        return 2
    if command == "serve":
        return _serve(config)
    if command == "demo":
        return _serve(config, demo_banner=True)
    if command == "token":
        return _token(config, args.user, args.ttl)
    return _publish(config, args.user, args.mtype, args.payload, args.url)


def _demo_settings(
    env: Mapping[str, str], flags: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any]]:
    """What ``smapws demo`` changes: the embedded broker (Redis settings are
    dropped), the demo on, loopback unless a host is given, and a random
    JWT_SECRET when none is set."""
    redis = ("REDIS_", "redis_")
    env = {k: v for k, v in env.items() if not k.startswith(redis)}
    flags = {k: v for k, v in flags.items() if not k.startswith(redis)}
    env["SMAPWS_DEMO"] = "true"
    flags.pop("demo", None)
    env.setdefault("SMAPWS_HOST", "127.0.0.1")
    if not env.get("JWT_SECRET") and not env.get("JWT_PUBLIC_KEY_FILE"):
        env["JWT_SECRET"] = secrets.token_hex(32)
    return env, flags


def _serve(config: Config, *, demo_banner: bool = False) -> int:
    import trio

    from smapws._io.server import serve

    _log.configure(config.log_level, config.log_format)
    _tune_gc()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve, config, handle_signals=True))
            if demo_banner:
                host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
                print(
                    f"smapws demo: open http://{host}:{server.port}/demo (Ctrl-C stops)",
                    file=sys.stderr,
                    flush=True,
                )

    try:
        trio.run(run)
    except OSError as exc:
        print(f"smapws: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130
    return 0


#: Young-generation threshold of the cyclic garbage collector. CPython's
#: default (700 allocations) runs a collection every few messages under
#: load; the hub's per-message objects are acyclic and freed by reference
#: counting, so collections find little and cost latency.
GC_GEN0_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Make the cyclic GC cheap for a process that holds many long-lived
    objects: everything alive after start-up (modules, classes) is moved out
    of the collector's sight with ``gc.freeze()``, so full collections scan
    only what connections add, and young collections run less often."""
    import gc

    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _token(config: Config, user: str, ttl: float) -> int:
    auth = config.auth
    assert auth is not None
    alg = auth.algorithms[0]
    if alg not in MAC_ALGORITHMS:
        print(
            "smapws: configuration error: JWT_ALGORITHMS: `smapws token` signs with "
            "JWT_SECRET and needs an HS* algorithm",
            file=sys.stderr,
        )
        return 2
    extra: dict[str, Any] = {}
    if auth.issuer:
        extra["iss"] = auth.issuer
    if auth.audience:
        extra["aud"] = auth.audience
    if auth.user_claim != "sub":
        extra[auth.user_claim] = user
    print(mint(user, key=auth.key, algorithm=alg, now=time.time(), ttl=ttl, extra=extra))
    return 0


def _publish(config: Config, user: str, mtype: str, payload_text: str, url: str | None) -> int:
    try:
        payload = json.loads(payload_text)
    except ValueError:
        print("smapws: --payload: expected a JSON object", file=sys.stderr)
        return 2
    if not isinstance(payload, dict):
        print("smapws: --payload: expected a JSON object", file=sys.stderr)
        return 2
    data = encode_message(mtype, payload)
    try:
        parse(data, wall_time=0, received_at=0, max_bytes=config.max_message_bytes)
    except InvalidMessage as exc:
        print(f"smapws: invalid message: {exc}", file=sys.stderr)
        return 2
    if config.broker == "redis" and url is None:
        import redis

        client: redis.Redis
        if config.redis_sentinels:
            from redis.sentinel import Sentinel

            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(config.redis_sentinels), socket_timeout=config.redis_timeout
            )
            client = sentinel.master_for(  # type: ignore[no-untyped-call]
                str(config.redis_sentinel_master),
                password=config.redis_password,
                db=config.redis_db,
                socket_timeout=config.redis_timeout,
            )
        else:
            client = redis.Redis.from_url(
                str(config.redis_url), socket_timeout=config.redis_timeout
            )
        try:
            n = client.publish(config.channel_prefix + user, data)
        except redis.RedisError as exc:
            print(f"smapws: Redis publish failed: {type(exc).__name__}", file=sys.stderr)
            return 1
        finally:
            client.close()
        print(json.dumps({"status": "published", "receivers": n}))
        return 0
    if not config.api_key:
        print(
            "smapws: configuration error: SMAPWS_API_KEY: needed to publish through a hub's "
            "HTTP API (or set REDIS_URL to publish to Redis)",
            file=sys.stderr,
        )
        return 2
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    base = url or f"http://{host}:{config.port}"
    body = json.dumps({"user_id": user, "message": json.loads(data)}).encode()
    req = urllib.request.Request(
        base.rstrip("/") + "/api/publish",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {config.api_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=config.redis_timeout) as resp:
            print(resp.read().decode())
    except urllib.error.HTTPError as exc:
        print(f"smapws: publish refused: HTTP {exc.code} {exc.read().decode()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"smapws: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    return 0
