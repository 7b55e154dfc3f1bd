"""``smapws``: serve | demo | publish | token | listen.

Every setting is an environment variable with a matching flag of ``smapws
serve`` (``smapws serve --help``); flags win. ``publish`` and ``token`` have
only their own flags and read the settings they need from the environment.
Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error (one
line on stderr naming the variable).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Final

from smapws import _log
from smapws._config import OPTIONS, Config, ConfigError, add_arguments, ignored_variables, load
from smapws._core.auth import MAC_ALGORITHMS, mint_for
from smapws._runtime import tune_gc
from smapws._version import __version__
from smapws.publisher import Publisher, PublishError
from smapws_publisher._publisher import url_host

#: What ``publish`` reads from the environment (it has no settings flags).
_PUBLISH_ENV = """\
environment (the hub's own variables):
  Redis:  REDIS_URL, or REDIS_HOST, REDIS_PORT, REDIS_DB, REDIS_PASSWORD,
          or REDIS_SENTINELS with REDIS_SENTINEL_MASTER
  else the HTTP API of a hub: SMAPWS_API_KEY, at --url or at SMAPWS_HOST (127.0.0.1
          for 0.0.0.0) on SMAPWS_INTERNAL_PORT when set, else SMAPWS_PORT
  both:   SMAPWS_CHANNEL_PREFIX, SMAPWS_REDIS_TIMEOUT (the publish timeout),
          SMAPWS_MAX_MESSAGE_BYTES

exit status: 0 published, 1 the server failed or refused, 2 bad input or settings
"""

#: What ``listen`` reads from the environment.
_LISTEN_ENV = """\
environment (the hub's own variables):
  JWT_SECRET and the other JWT_* settings (to mint the token, unless --token),
  SMAPWS_HOST, SMAPWS_PORT (the default URL)

exit status: 0 after --count frames or a normal close (1000, 1001), 1 refused,
unreachable or another close, 2 bad settings
"""

#: What ``token`` reads from the environment.
_TOKEN_ENV = """\
environment (the hub's own variables):
  JWT_SECRET (required), JWT_ALGORITHMS (the first, an HS* one, signs),
  JWT_ISSUER, JWT_AUDIENCE, JWT_USER_CLAIM
"""


#: Settings ``smapws demo`` has no use for, so no flag: it runs on the
#: embedded broker (Redis settings are dropped), in one process, with the
#: demo on.
DEMO_IGNORES: Final = frozenset(
    {opt.field for opt in OPTIONS if opt.env.startswith("REDIS_")}
    | {
        "subscribe_mode",
        "subscribe_linger",
        "sharded_pubsub",
        "redis_timeout",
        "reconnect_max",
        "probe_interval",
        "workers",
        "demo",
    }
)


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
        "login and a simulated Project service. Listens on 127.0.0.1 only (SMAPWS_HOST is "
        "ignored) unless --public is given, and signs its tokens with a fresh random secret "
        "(JWT_* settings are ignored: the dev login must never mint a token production "
        "accepts). Never in production. Redis, subscription-mode and worker settings do not "
        "apply (the embedded broker, one process). To publish your own messages to the page, "
        "start it with SMAPWS_API_KEY set and use `smapws publish --url` (the page shows the "
        "command).",
    )
    demo.add_argument(
        "--public",
        action="store_true",
        default=None,
        help="listen on --host (default 0.0.0.0) instead of loopback only: anyone who can "
        "reach it can log in",
    )
    add_arguments(demo, skip=DEMO_IGNORES)

    pub = sub.add_parser(
        "publish",
        help="publish a message through the configured broker",
        description="Publish with Redis PUBLISH when Redis is configured, else through\n"
        "the HTTP publish API of a running hub (needs SMAPWS_API_KEY). The message\n"
        "is checked as the hub checks it before it is sent.",
        epilog=_PUBLISH_ENV,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pub.add_argument("--user", required=True, help="user id (channel = prefix + user)")
    pub.add_argument("--type", required=True, dest="mtype", help="message type")
    pub.add_argument("--payload", default="{}", help="payload as a JSON object (default: {})")
    pub.add_argument(
        "--url",
        default=None,
        help="publish through the HTTP API of the hub at this base URL, even when Redis "
        "is configured (default when Redis is not configured: the hub SMAPWS_HOST, "
        "SMAPWS_INTERNAL_PORT and SMAPWS_PORT describe, see below)",
    )

    tok = sub.add_parser(
        "token",
        help="mint a development JWT signed with JWT_SECRET",
        description="Print a JWT for USER, signed as the hub verifies it (for development\n"
        "and tests).",
        epilog=_TOKEN_ENV,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tok.add_argument("--user", required=True, help="user id (sub claim)")
    tok.add_argument(
        "--ttl", type=float, default=3600.0, help="lifetime in seconds (default: 3600)"
    )

    lis = sub.add_parser(
        "listen",
        help="open a tab as a user and print every frame the hub sends",
        description="Connect to the hub as a browser tab of USER would (the access_token\n"
        "cookie) and print every frame as one JSON line on stdout; status lines\n"
        "(open, closed with its code) go to stderr. For 'connected but not receiving\n"
        "updates': run it on the hub's host and publish to the user.",
        epilog=_LISTEN_ENV,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lis.add_argument("--user", required=True, help="user id to listen as")
    lis.add_argument(
        "--url",
        default=None,
        help="the hub's WebSocket URL (default: ws://SMAPWS_HOST:SMAPWS_PORT/ws, "
        "127.0.0.1 for 0.0.0.0)",
    )
    lis.add_argument("--since", default=None, help="resume after this message id")
    lis.add_argument(
        "--token",
        default=None,
        help="use this JWT instead of minting one with JWT_SECRET (it is never printed; "
        "the tab is then the token's user, whatever --user says)",
    )
    lis.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        help="exit 0 after this many frames, at least 1 (default: never)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    for line in ignored_variables(os.environ):
        print(f"smapws: warning: {line}", file=sys.stderr)
    if command == "publish":
        return _publish(args.user, args.mtype, args.payload, args.url)
    if command == "listen":
        return _listen(args.user, args.url, args.since, args.token, args.count)
    # serve's flags (token has no settings flags: it reads the environment).
    flags = {k: v for k, v in vars(args).items() if v is not None}
    env: Mapping[str, str] = os.environ
    public = bool(flags.pop("public", False))
    try:
        if command == "demo":
            env, flags = _demo_settings(env, flags, public=public)
        config = load(env, flags)
    except ConfigError as exc:
        print(f"smapws: configuration error: {exc}", file=sys.stderr)
        return 2
    if command == "demo":
        return _serve(config, demo_banner=True, public=public)
    if command == "token":
        return _token(config, args.user, args.ttl)
    if config.demo:
        # The demo's login hands anyone a token: under ``serve`` it would sign
        # with JWT_SECRET and listen on SMAPWS_HOST (0.0.0.0 in the image).
        print(
            "smapws: configuration error: SMAPWS_DEMO (--demo): the demo runs only as "
            "smapws demo, which signs with a secret of its own and listens on loopback",
            file=sys.stderr,
        )
        return 2
    return _serve(config)


def _demo_settings(
    env: Mapping[str, str], flags: dict[str, Any], *, public: bool = False
) -> tuple[dict[str, str], dict[str, Any]]:
    """What ``smapws demo`` changes: the embedded broker (Redis settings are
    dropped), the demo on, a fresh random HS256 secret of its own (every
    ``JWT_*`` setting is dropped, so its login never mints a token that a
    production hub sharing the environment would accept), and loopback only
    (``SMAPWS_HOST`` is dropped: the image sets it to 0.0.0.0) unless
    ``public``. Raises :class:`ConfigError` for a ``--host`` that is not
    loopback without ``--public``."""
    dropped = ("REDIS_", "redis_", "JWT_", "jwt_")
    env = {k: v for k, v in env.items() if not k.startswith(dropped) and k != "SMAPWS_HOST"}
    flags = {k: v for k, v in flags.items() if not k.startswith(dropped)}
    env["SMAPWS_DEMO"] = "true"
    flags.pop("demo", None)
    env["JWT_SECRET"] = secrets.token_hex(32)
    env["JWT_ALGORITHMS"] = "HS256"
    host = flags.get("host")
    if public:
        flags["host"] = host or "0.0.0.0"
    elif host is None:
        flags["host"] = "127.0.0.1"
    elif not _loopback(host):
        raise ConfigError(
            f"--host: {host} is not a loopback address; smapws demo listens on loopback "
            "only unless --public is given"
        )
    return env, flags


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _demo_line(config: Config, *, public: bool) -> str:
    """The demo's first log line: where it listens and what signs its tokens."""
    where = (
        f"on {config.host} (--public: anyone who can reach it can log in)"
        if public
        else f"on {config.host} only (loopback; --public listens on other interfaces)"
    )
    return (
        f"smapws demo: listening {where}; tokens signed with a fresh random secret, not JWT_SECRET"
    )


def _serve(config: Config, *, demo_banner: bool = False, public: bool = False) -> int:
    import trio

    from smapws._io.server import ListenError, serve

    if config.workers > 1:
        from smapws._io.supervisor import run_group

        _log.configure(config.log_level, config.log_format, context={"role": "supervisor"})
        try:
            return trio.run(run_group, config)
        except ListenError as exc:
            print(f"smapws: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    _log.configure(config.log_level, config.log_format)
    tune_gc()
    if demo_banner:
        _log.logger.warning(_demo_line(config, public=public))

    async def run() -> None:
        if not demo_banner:
            await serve(config, handle_signals=True)
            return
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve, config, handle_signals=True))
            host = url_host(config.host)
            print(
                f"smapws demo: open http://{host}:{server.port}/demo (Ctrl-C stops)",
                file=sys.stderr,
                flush=True,
            )

    try:
        trio.run(run)
    except (ListenError, ExceptionGroup) as exc:
        # A group when the demo's nursery wraps it: still one line.
        listen = exc if isinstance(exc, ListenError) else _leaf(exc, ListenError)
        if listen is None:
            raise
        print(f"smapws: {listen}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130
    return 0


def _leaf(group: BaseExceptionGroup[Any], kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` anywhere in ``group``."""
    for exc in group.exceptions:
        found = _leaf(exc, kind) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, kind):
            return found
    return None


def _dev_token(config: Config, user: str, ttl: float, command: str) -> str | None:
    """A token for ``user`` signed with JWT_SECRET, or None (after one
    line on stderr) when the configured algorithm is not an HS* one."""
    auth = config.auth
    assert auth is not None
    if auth.algorithms[0] not in MAC_ALGORITHMS:
        print(
            f"smapws: configuration error: JWT_ALGORITHMS: `smapws {command}` signs with "
            "JWT_SECRET and needs an HS* algorithm",
            file=sys.stderr,
        )
        return None
    return mint_for(auth, user, now=time.time(), ttl=ttl)


def _token(config: Config, user: str, ttl: float) -> int:
    minted = _dev_token(config, user, ttl, "token")
    if minted is None:
        return 2
    print(minted)
    return 0


def _publish(user: str, mtype: str, payload_text: str, url: str | None) -> int:
    try:
        payload = json.loads(payload_text)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        print("smapws: --payload: expected a JSON object", file=sys.stderr)
        return 2
    try:
        publisher = Publisher.from_env(os.environ, api_url=url)
    except ValueError as exc:  # ConfigError, or a --url or REDIS_URL the client refuses
        print(f"smapws: configuration error: {exc}", file=sys.stderr)
        return 2
    with publisher:
        try:
            hubs = publisher.publish(user, mtype, payload)
        except PublishError as exc:
            print(f"smapws: {exc}", file=sys.stderr)
            return 1
        except ValueError as exc:  # InvalidMessage, or a user id no tab can have
            print(f"smapws: invalid message: {exc}", file=sys.stderr)
            return 2
    status = "published" if publisher.transport == "redis" else "accepted"
    print(json.dumps({"status": status, "hubs": hubs, "receivers": hubs}))
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (``--count 0`` once
    connected and exited at once, having printed nothing)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text[:40]!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _listen(
    user: str, url: str | None, since: str | None, token: str | None, count: int | None
) -> int:
    import trio

    from smapws._io.listen import listen

    if url is None:
        host = url_host(os.environ.get("SMAPWS_HOST", "").strip())
        port = os.environ.get("SMAPWS_PORT", "").strip() or "8081"
        url = f"ws://{host}:{port}/ws"
    if token is None:
        try:
            config = load(os.environ, {})
        except ConfigError as exc:
            print(f"smapws: configuration error: {exc}", file=sys.stderr)
            return 2
        token = _dev_token(config, user, 3600.0, "listen")
        if token is None:
            return 2
    try:
        return trio.run(partial(listen, url, token, since=since, count=count))
    except KeyboardInterrupt:
        return 130
