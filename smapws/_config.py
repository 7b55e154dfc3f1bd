"""Configuration: environment variables and command-line flags, validated once.

Every setting has an environment variable (the names are a contract, see
docs/reference/configuration.rst) and a flag; a flag overrides the
environment. :func:`load` returns a frozen :class:`Config` or raises
:class:`ConfigError` whose message is one line
naming the variable. Secrets never appear in ``repr(config)`` or in errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import SplitResult, parse_qs, quote, urlsplit

from smapws._core.auth import MAC_ALGORITHMS, PUBLIC_KEY_ALGORITHMS, AuthConfig, usable_key
from smapws._core.envelope import DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_MESSAGE_BYTES
from smapws._core.history import HistoryLimits
from smapws._core.outbox import OutboxLimits
from smapws._core.snapshot import SnapshotLimits
from smapws._errors import SmapwsError
from smapws_publisher._messages import authority_end
from smapws_publisher._messages import redact_url as redact_url


class ConfigError(SmapwsError, ValueError):
    """A setting is missing or invalid; the message names the variable."""


def _number(v: str, kind: type[int] | type[float], expected: str) -> float:
    try:
        return kind(v.strip())
    except ValueError as exc:
        raise ValueError(expected) from exc


def _port(v: str) -> int:
    n = int(_number(v, int, "expected a port number 0-65535"))
    if not 0 <= n <= 65535:
        raise ValueError("expected a port number 0-65535")
    return n


def _positive_float(v: str) -> float:
    x = _number(v, float, "expected a positive number of seconds")
    if not math.isfinite(x) or x <= 0:
        raise ValueError("expected a positive number of seconds")
    return x


def _non_negative_float(v: str) -> float:
    x = _number(v, float, "expected a number of seconds >= 0")
    if not math.isfinite(x) or x < 0:
        raise ValueError("expected a number of seconds >= 0")
    return x


def _positive_int(v: str) -> int:
    n = int(_number(v, int, "expected a positive integer"))
    if n <= 0:
        raise ValueError("expected a positive integer")
    return n


def _non_negative_int(v: str) -> int:
    n = int(_number(v, int, "expected an integer >= 0"))
    if n < 0:
        raise ValueError("expected an integer >= 0")
    return n


#: The most worker processes ``SMAPWS_WORKERS`` takes: a typo (``80`` for
#: ``8``) should fail loudly, not start a process per possible core.
MAX_WORKERS: Final = 256


def _workers(v: str) -> int:
    """A number of workers, or ``auto``: the CPUs this process may run on
    (its affinity mask, which taskset, cgroup cpusets and systemd's
    ``CPUAffinity=`` narrow; not the machine's count)."""
    if v.strip().lower() == "auto":
        return len(os.sched_getaffinity(0))
    expected = f"expected a number of workers 1-{MAX_WORKERS} or auto"
    n = int(_number(v, int, expected))
    if not 1 <= n <= MAX_WORKERS:
        raise ValueError(expected)
    return n


def _csv(v: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in v.split(",") if p.strip())


#: An allowed origin as a browser sends its ``Origin`` header: a scheme,
#: ``://`` and a host[:port] (``*.domain`` too), no path. A bare
#: ``localhost:5173`` would never equal any browser's Origin, so every browser
#: would get 403: it is refused at start instead.
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s@]+/?")


def _origins(v: str) -> tuple[str, ...]:
    entries = _csv(v)
    for entry in entries:
        if entry not in ("*", "null") and not _ORIGIN.fullmatch(entry):
            scheme, sep, rest = entry.rpartition("//")
            scheme = scheme.rstrip(":") if sep and scheme.rstrip(":") else "http"
            host = rest.split("/", 1)[0] or "host"
            raise ValueError(
                f"expected scheme://host[:port] as a browser sends it (e.g. {scheme}://{host}), "
                "* or null"
            )
    return entries


#: The port a Sentinel listens on when ``REDIS_SENTINELS`` names none.
SENTINEL_DEFAULT_PORT: Final = 26379
#: The port a cluster node listens on when ``REDIS_CLUSTER_NODES`` names none.
REDIS_DEFAULT_PORT: Final = 6379


def _host_ports(v: str, default_port: int = SENTINEL_DEFAULT_PORT) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (``[v6]:port``; the port defaults to ``default_port``)."""
    out = []
    for item in _csv(v):
        host, port = item, str(default_port)
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError("expected host:port[,host:port...]")
            port = rest[1:] or port
        elif ":" in item:
            host, _, port = item.rpartition(":")
        if not host or (":" in host and not item.startswith("[")):
            raise ValueError("expected host:port[,host:port...]")
        try:
            n = _port(port)
        except ValueError as exc:
            raise ValueError("expected host:port[,host:port...]") from exc
        out.append((host, n))
    return tuple(out)


def _node_ports(v: str) -> tuple[tuple[str, int], ...]:
    return _host_ports(v, REDIS_DEFAULT_PORT)


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        low = v.strip().lower()
        if low not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return low

    return parse


def _str(v: str) -> str:
    return v


def _host(v: str) -> str:
    """A host name or address: a space or newline in one (a value read from a
    file, a quoted ``.env`` line) is no name the resolver finds, and Redis
    would then be retried for ever, the listening address fail with exit 1."""
    if any(c.isspace() for c in v):
        raise ValueError("expected a host name or address, without spaces or newlines")
    if v.startswith("[") and v.endswith("]"):  # an IPv6 address as a URL writes it
        v = v[1:-1]
    return v


#: The shortest ``SMAPWS_API_KEY`` taken: a key a person can type from memory
#: is one an attacker can guess; ``openssl rand -hex 32`` makes 64 characters.
MIN_API_KEY_CHARS: Final = 16


def _api_key(v: str) -> str:
    """The key without surrounding whitespace (a secret file's newline); an
    empty or short key is refused rather than turning on an API that no key,
    or any key, opens."""
    key = v.strip()
    if not key:
        raise ValueError(
            "expected a key, not whitespace (unset SMAPWS_API_KEY to turn the publish API off)"
        )
    if len(key) < MIN_API_KEY_CHARS:
        raise ValueError(
            f"expected at least {MIN_API_KEY_CHARS} characters "
            "(generate one with `openssl rand -hex 32`)"
        )
    return key


@dataclass(frozen=True)
class _Option:
    field: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def _core_default(cls: type[Any], name: str) -> Any:
    """The default of field ``name`` of the ``_core`` dataclass ``cls``: the
    settings that bound a ``_core`` object take their default from it, so that
    each default is written once (the object is then built from :class:`Config`)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


#: The settings, in the order of docs/reference/configuration.rst. ``default=None`` means unset.
#: Each default is written here (or, for a bound of a ``_core`` object, there,
#: read with :func:`_core_default`) and nowhere else: :class:`Config` reads
#: its defaults from this table.
OPTIONS: Final[tuple[_Option, ...]] = (
    _Option("host", "SMAPWS_HOST", _host, "0.0.0.0", "listening address"),
    _Option("port", "SMAPWS_PORT", _port, 8081, "listening port (0: any free port)"),
    _Option(
        "internal_port",
        "SMAPWS_INTERNAL_PORT",
        _port,
        None,
        "second port serving /metrics and /api/publish (then 404 on SMAPWS_PORT) and "
        "/health, /ready; never /ws (0: any free port; unset: all on SMAPWS_PORT)",
    ),
    _Option(
        "internal_host",
        "SMAPWS_INTERNAL_HOST",
        _host,
        None,
        "listening address of SMAPWS_INTERNAL_PORT (unset: SMAPWS_HOST)",
    ),
    _Option(
        "workers",
        "SMAPWS_WORKERS",
        _workers,
        1,
        "worker processes serving the same port(s), each a whole hub with its own "
        "subscription (auto: the CPUs this process may use); more than 1 needs Redis",
    ),
    _Option(
        "redis_url",
        "REDIS_URL",
        _str,
        None,
        "redis:// rediss:// or unix:// URL (a '/', '?', '#' or '@' in its password "
        "percent-encoded: %2F, %3F, %23, %40)",
        True,
    ),
    _Option("redis_host", "REDIS_HOST", _host, None, "Redis host (when REDIS_URL is unset)"),
    _Option("redis_port", "REDIS_PORT", _port, 6379, "Redis port"),
    _Option("redis_db", "REDIS_DB", _non_negative_int, 0, "Redis database for pub/sub"),
    _Option("redis_password", "REDIS_PASSWORD", _str, None, "Redis password", True),
    _Option(
        "redis_sentinels",
        "REDIS_SENTINELS",
        _host_ports,
        (),
        "comma list of Sentinel host:port; with REDIS_SENTINEL_MASTER, wins over "
        "REDIS_URL/REDIS_HOST (REDIS_PASSWORD and REDIS_DB apply to the master)",
    ),
    _Option(
        "redis_sentinel_master",
        "REDIS_SENTINEL_MASTER",
        _str,
        None,
        "name of the master the Sentinels monitor (needs REDIS_SENTINELS)",
    ),
    _Option(
        "redis_cluster_nodes",
        "REDIS_CLUSTER_NODES",
        _node_ports,
        (),
        "comma list of Redis Cluster seed nodes host:port (port 6379 if left out); wins "
        "over REDIS_URL/REDIS_HOST (REDIS_PASSWORD applies to every node)",
    ),
    _Option("channel_prefix", "SMAPWS_CHANNEL_PREFIX", _str, "user_noti:", "channel prefix"),
    _Option(
        "subscribe_mode",
        "SMAPWS_SUBSCRIBE_MODE",
        _choice("pattern", "user"),
        "pattern",
        "pattern: PSUBSCRIBE prefix* (every message of the system); user: SUBSCRIBE "
        "prefix+user for each user with a connection on this hub (needs Redis)",
    ),
    _Option(
        "subscribe_linger",
        "SMAPWS_SUBSCRIBE_LINGER",
        _non_negative_float,
        5.0,
        "user mode: seconds a user stays subscribed after their last connection on this "
        "hub closed (a reload within it costs no Redis command)",
    ),
    _Option(
        "sharded_pubsub",
        "SMAPWS_SHARDED_PUBSUB",
        _bool,
        False,
        "Redis Cluster sharded pub/sub: SSUBSCRIBE on the node owning each user's slot, "
        "and publish with SPUBLISH (needs REDIS_CLUSTER_NODES and SMAPWS_SUBSCRIBE_MODE=user)",
    ),
    _Option("jwt_secret", "JWT_SECRET", _str, None, "HMAC key for HS* tokens", True),
    _Option("jwt_public_key_file", "JWT_PUBLIC_KEY_FILE", _str, None, "PEM key for RS/ES/PS"),
    _Option("jwt_algorithms", "JWT_ALGORITHMS", _csv, ("HS256",), "allowed JWT algorithms"),
    _Option(
        "jwt_issuer", "JWT_ISSUER", _str, _core_default(AuthConfig, "issuer"), "required iss claim"
    ),
    _Option(
        "jwt_audience",
        "JWT_AUDIENCE",
        _str,
        _core_default(AuthConfig, "audience"),
        "required aud claim",
    ),
    _Option(
        "jwt_user_claim",
        "JWT_USER_CLAIM",
        _str,
        _core_default(AuthConfig, "user_claim"),
        "claim holding the user id",
    ),
    _Option(
        "jwt_leeway",
        "SMAPWS_JWT_LEEWAY",
        _non_negative_float,
        _core_default(AuthConfig, "leeway"),
        "clock skew allowed (s)",
    ),
    _Option(
        "close_on_token_expiry",
        "SMAPWS_CLOSE_ON_TOKEN_EXPIRY",
        _bool,
        True,
        "close a connection with 1008 when its token expires",
    ),
    _Option(
        "allowed_origins",
        "SMAPWS_ALLOWED_ORIGINS",
        _origins,
        (),
        "comma list of allowed Origin values, each scheme://host[:port] "
        "(unset: the same host only)",
    ),
    _Option("ping_interval", "SMAPWS_PING_INTERVAL", _positive_float, 54.0, "ping period (s)"),
    _Option("pong_wait", "SMAPWS_PONG_WAIT", _positive_float, 60.0, "pong deadline (s)"),
    _Option("write_wait", "SMAPWS_WRITE_WAIT", _positive_float, 10.0, "write deadline (s)"),
    _Option(
        "handshake_timeout",
        "SMAPWS_HANDSHAKE_TIMEOUT",
        _positive_float,
        10.0,
        "deadline for a request head and the upgrade (s)",
    ),
    _Option("drain_timeout", "SMAPWS_DRAIN_TIMEOUT", _positive_float, 30.0, "drain deadline (s)"),
    _Option(
        "api_key",
        "SMAPWS_API_KEY",
        _api_key,
        None,
        "bearer key for POST /api/publish (unset: the API is off)",
        True,
    ),
    _Option("max_connections", "SMAPWS_MAX_CONNECTIONS", _positive_int, 10000, "connection cap"),
    _Option(
        "max_connections_per_user",
        "SMAPWS_MAX_CONNECTIONS_PER_USER",
        _positive_int,
        64,
        "open connections one user may hold on this hub (more get 429)",
    ),
    _Option(
        "max_pending_requests",
        "SMAPWS_MAX_PENDING_REQUESTS",
        _positive_int,
        1024,
        "accepted sockets still sending their request head or lingering after their answer; "
        "at the bound the oldest linger is cut short, else no more are accepted until one "
        "is done or the oldest has been silent 2 s (then answered 408)",
    ),
    _Option(
        "max_accept_rate",
        "SMAPWS_MAX_ACCEPT_RATE",
        _non_negative_float,
        1000.0,
        "upgrades admitted per second, burst as large (0: unlimited)",
    ),
    _Option(
        "max_accept_rate_per_user",
        "SMAPWS_MAX_ACCEPT_RATE_PER_USER",
        _non_negative_float,
        10.0,
        "upgrades one user is admitted per second (burst: SMAPWS_MAX_CONNECTIONS_PER_USER), "
        "before the shared SMAPWS_MAX_ACCEPT_RATE is spent (0: unlimited)",
    ),
    _Option(
        "max_pending_per_address",
        "SMAPWS_MAX_PENDING_PER_ADDRESS",
        _non_negative_int,
        128,
        "sockets one client address may hold before its request is answered or while "
        "its answer lingers; more are answered 503 at once (0: unbounded)",
    ),
    _Option(
        "max_message_bytes",
        "SMAPWS_MAX_MESSAGE_BYTES",
        _positive_int,
        DEFAULT_MAX_MESSAGE_BYTES,
        "largest broker message delivered",
    ),
    _Option(
        "max_json_depth",
        "SMAPWS_MAX_JSON_DEPTH",
        _positive_int,
        DEFAULT_MAX_JSON_DEPTH,
        "deepest nesting of arrays/objects in a broker message or publish body",
    ),
    _Option(
        "max_client_message_bytes",
        "SMAPWS_MAX_CLIENT_MESSAGE_BYTES",
        _positive_int,
        4096,
        "largest client message accepted, its frames together (1009 beyond)",
    ),
    _Option(
        "max_client_frame_rate",
        "SMAPWS_MAX_CLIENT_FRAME_RATE",
        _non_negative_float,
        20.0,
        "frames one connection may send per second, with a burst as large (1008 beyond; "
        "0: unlimited)",
    ),
    _Option(
        "send_queue_high_water",
        "SMAPWS_SEND_QUEUE_HIGH_WATER",
        _positive_int,
        _core_default(OutboxLimits, "high_water"),
        "queued messages beyond which progress is conflated",
    ),
    _Option(
        "send_queue_messages",
        "SMAPWS_SEND_QUEUE_MESSAGES",
        _positive_int,
        _core_default(OutboxLimits, "max_messages"),
        "per-connection send queue bound (messages)",
    ),
    _Option(
        "send_queue_bytes",
        "SMAPWS_SEND_QUEUE_BYTES",
        _positive_int,
        _core_default(OutboxLimits, "max_bytes"),
        "per-connection send queue bound (bytes)",
    ),
    _Option(
        "send_queue_total_bytes",
        "SMAPWS_SEND_QUEUE_TOTAL_BYTES",
        _positive_int,
        32 * 1024 * 1024,
        "bytes queued for all connections together; past it, a connection whose queue "
        "holds more than its share is closed 1013",
    ),
    _Option(
        "snapshot_ttl",
        "SMAPWS_SNAPSHOT_TTL",
        _non_negative_float,
        _core_default(SnapshotLimits, "ttl"),
        "seconds a project's latest progress is kept for new tabs (0: off)",
    ),
    _Option(
        "snapshot_completed_ttl",
        "SMAPWS_SNAPSHOT_COMPLETED_TTL",
        _non_negative_float,
        _core_default(SnapshotLimits, "completed_ttl"),
        "seconds a completion is kept for new tabs",
    ),
    _Option(
        "snapshot_per_user",
        "SMAPWS_SNAPSHOT_PER_USER",
        _positive_int,
        _core_default(SnapshotLimits, "per_user"),
        "projects kept per user for new tabs",
    ),
    _Option(
        "snapshot_max_entries",
        "SMAPWS_SNAPSHOT_MAX_ENTRIES",
        _non_negative_int,
        _core_default(SnapshotLimits, "max_entries"),
        "projects kept in all for new tabs (0: off)",
    ),
    _Option(
        "snapshot_per_user_bytes",
        "SMAPWS_SNAPSHOT_PER_USER_BYTES",
        _positive_int,
        _core_default(SnapshotLimits, "per_user_bytes"),
        "bytes of current state kept per user for new tabs",
    ),
    _Option(
        "snapshot_max_bytes",
        "SMAPWS_SNAPSHOT_MAX_BYTES",
        _positive_int,
        _core_default(SnapshotLimits, "max_bytes"),
        "bytes of current state kept in all, least recently updated forgotten first",
    ),
    _Option(
        "history_ttl",
        "SMAPWS_HISTORY_TTL",
        _non_negative_float,
        _core_default(HistoryLimits, "ttl"),
        "seconds each message is kept for ?since= recovery (0: off)",
    ),
    _Option(
        "history_per_user",
        "SMAPWS_HISTORY_PER_USER",
        _non_negative_int,
        _core_default(HistoryLimits, "per_user"),
        "messages kept per user for ?since= recovery (0: off)",
    ),
    _Option(
        "history_max_bytes",
        "SMAPWS_HISTORY_MAX_BYTES",
        _non_negative_int,
        _core_default(HistoryLimits, "max_bytes"),
        "bytes kept in all for ?since= recovery, oldest forgotten first (0: off)",
    ),
    _Option(
        "fleet_history",
        "SMAPWS_FLEET_HISTORY",
        _bool,
        True,
        "with Redis: keep the replay window in Redis too, shared by every hub, so that "
        "a tab resumes on any hub (off: this hub's window only)",
    ),
    _Option(
        "history_per_user_bytes",
        "SMAPWS_HISTORY_PER_USER_BYTES",
        _positive_int,
        _core_default(HistoryLimits, "per_user_bytes"),
        "bytes kept per user for ?since= recovery, oldest forgotten first",
    ),
    _Option(
        "resume_max_bytes",
        "SMAPWS_RESUME_MAX_BYTES",
        _positive_int,
        256 * 1024,
        "bytes one ?since= resume may replay; beyond, resync and the current state",
    ),
    _Option(
        "demo",
        "SMAPWS_DEMO",
        _bool,
        False,
        "serve the demo page (/demo), its dev login and a simulated Project service; "
        "never in production",
    ),
    _Option(
        "ingest_queue",
        "SMAPWS_INGEST_QUEUE",
        _positive_int,
        65536,
        "broker-to-router queue bound (messages)",
    ),
    _Option(
        "ingest_queue_bytes",
        "SMAPWS_INGEST_QUEUE_BYTES",
        _positive_int,
        16 * 1024 * 1024,
        "broker-to-router queue bound (bytes)",
    ),
    _Option(
        "redis_timeout",
        "SMAPWS_REDIS_TIMEOUT",
        _positive_float,
        5.0,
        "deadline for each Redis connect/command (s)",
    ),
    _Option(
        "reconnect_max",
        "SMAPWS_RECONNECT_MAX",
        _positive_float,
        1.0,
        "cap of the Redis reconnect backoff (s): the longest wait between attempts, so "
        "the hub is back within about this long after Redis is; 1 s keeps that under "
        "the 2 s target while an outage costs a hub at most 2 attempts a second once "
        "backed off (jitter spreads the pods)",
    ),
    _Option(
        "probe_interval",
        "SMAPWS_PROBE_INTERVAL",
        _positive_float,
        5.0,
        "seconds between liveness probes through the subscription; a probe not back "
        "within one interval drops the link (a silent link is found within 2 intervals)",
    ),
    _Option(
        "log_level",
        "SMAPWS_LOG_LEVEL",
        _choice("debug", "info", "warning", "error"),
        "info",
        "log level",
    ),
    _Option("log_format", "SMAPWS_LOG_FORMAT", _choice("text", "json"), "text", "log format"),
)


def _setting(name: str) -> Any:
    """A :class:`Config` field whose default is the one :data:`OPTIONS` gives
    ``name``, kept out of ``repr`` when the setting is a secret."""
    opt = _OPTION_OF[name]
    return field(default=opt.default, repr=not opt.secret)


_OPTION_OF: Final = {opt.field: opt for opt in OPTIONS}


@dataclass(frozen=True)
class Config:
    """The validated settings. Secrets are excluded from ``repr``.

    Each field but ``auth`` (built from the ``JWT_*`` settings) is the
    setting of the same name in :data:`OPTIONS`, which gives its default;
    ``REDIS_HOST``/``REDIS_PORT`` are folded into ``redis_url``.
    """

    host: str = _setting("host")
    port: int = _setting("port")
    internal_port: int | None = _setting("internal_port")
    internal_host: str | None = _setting("internal_host")
    workers: int = _setting("workers")
    redis_url: str | None = _setting("redis_url")
    redis_sentinels: tuple[tuple[str, int], ...] = _setting("redis_sentinels")
    redis_sentinel_master: str | None = _setting("redis_sentinel_master")
    redis_password: str | None = _setting("redis_password")
    redis_db: int = _setting("redis_db")
    redis_cluster_nodes: tuple[tuple[str, int], ...] = _setting("redis_cluster_nodes")
    channel_prefix: str = _setting("channel_prefix")
    subscribe_mode: str = _setting("subscribe_mode")
    subscribe_linger: float = _setting("subscribe_linger")
    sharded_pubsub: bool = _setting("sharded_pubsub")
    auth: AuthConfig | None = None
    close_on_token_expiry: bool = _setting("close_on_token_expiry")
    allowed_origins: tuple[str, ...] = _setting("allowed_origins")
    ping_interval: float = _setting("ping_interval")
    pong_wait: float = _setting("pong_wait")
    write_wait: float = _setting("write_wait")
    handshake_timeout: float = _setting("handshake_timeout")
    drain_timeout: float = _setting("drain_timeout")
    api_key: str | None = _setting("api_key")
    max_connections: int = _setting("max_connections")
    max_connections_per_user: int = _setting("max_connections_per_user")
    max_pending_requests: int = _setting("max_pending_requests")
    max_accept_rate: float = _setting("max_accept_rate")
    max_accept_rate_per_user: float = _setting("max_accept_rate_per_user")
    max_pending_per_address: int = _setting("max_pending_per_address")
    max_message_bytes: int = _setting("max_message_bytes")
    max_json_depth: int = _setting("max_json_depth")
    max_client_message_bytes: int = _setting("max_client_message_bytes")
    max_client_frame_rate: float = _setting("max_client_frame_rate")
    send_queue_high_water: int = _setting("send_queue_high_water")
    send_queue_messages: int = _setting("send_queue_messages")
    send_queue_bytes: int = _setting("send_queue_bytes")
    send_queue_total_bytes: int = _setting("send_queue_total_bytes")
    snapshot_ttl: float = _setting("snapshot_ttl")
    snapshot_completed_ttl: float = _setting("snapshot_completed_ttl")
    snapshot_per_user: int = _setting("snapshot_per_user")
    snapshot_max_entries: int = _setting("snapshot_max_entries")
    snapshot_per_user_bytes: int = _setting("snapshot_per_user_bytes")
    snapshot_max_bytes: int = _setting("snapshot_max_bytes")
    history_ttl: float = _setting("history_ttl")
    history_per_user: int = _setting("history_per_user")
    history_max_bytes: int = _setting("history_max_bytes")
    fleet_history: bool = _setting("fleet_history")
    history_per_user_bytes: int = _setting("history_per_user_bytes")
    resume_max_bytes: int = _setting("resume_max_bytes")
    demo: bool = _setting("demo")
    ingest_queue: int = _setting("ingest_queue")
    ingest_queue_bytes: int = _setting("ingest_queue_bytes")
    redis_timeout: float = _setting("redis_timeout")
    reconnect_max: float = _setting("reconnect_max")
    probe_interval: float = _setting("probe_interval")
    log_level: str = _setting("log_level")
    log_format: str = _setting("log_format")

    @property
    def internal_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the internal listener, or ``None`` when one
        port serves everything."""
        if self.internal_port is None:
            return None
        return (self.internal_host or self.host, self.internal_port)

    @property
    def broker(self) -> str:
        """``"redis"`` or ``"memory"`` (the embedded single-node broker)."""
        return (
            "redis"
            if self.redis_url or self.redis_sentinels or self.redis_cluster_nodes
            else "memory"
        )

    @property
    def redis_url_redacted(self) -> str | None:
        """Where Redis is, safe to log: the URL without its password, or
        ``sentinel://host:port,.../master`` when Sentinel is configured,
        ``cluster://host:port,...`` for a cluster."""
        if self.redis_cluster_nodes:
            return "cluster://" + _join_hosts(self.redis_cluster_nodes)
        if self.redis_sentinels:
            hosts = _join_hosts(self.redis_sentinels)
            return f"sentinel://{hosts}/{self.redis_sentinel_master}"
        return redact_url(self.redis_url) if self.redis_url else None


def _join_hosts(hosts: tuple[tuple[str, int], ...]) -> str:
    """``host:port,[v6]:port``: how addresses are shown (no secret in them)."""
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts)


def shown_default(value: Any) -> str:
    """A setting's default as ``--help`` and the docs write it."""
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> None:
    """Add one flag per setting to ``parser``, but those whose field is in
    ``skip``. The parsed value is None when the flag is not given (the
    environment, then the default, apply); the help shows the default."""
    group = parser.add_argument_group("settings (each flag overrides its environment variable)")
    for opt in OPTIONS:
        if opt.field in skip:
            continue
        text = f"{opt.help} " if opt.help else ""
        text += f"(default: {shown_default(opt.default)}) [env {opt.env}]"
        group.add_argument(
            opt.flag,
            dest=opt.field,
            default=None,
            metavar=opt.env,
            help=text.replace("%", "%%"),
        )


def _raw_values(env: Mapping[str, str], flags: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = flags.get(opt.field)
        source = opt.flag
        if raw is None:
            raw = env.get(opt.env)
            source = opt.env
        if raw is None or (raw == "" and opt.default is None):
            values[opt.field] = opt.default
            continue
        if opt.parse in (_str, _host) and not raw.strip():
            # An empty SMAPWS_HOST binds every address and an empty
            # JWT_USER_CLAIM would mean "sub": neither is what was written.
            raise ConfigError(
                f"{source}: must not be empty (unset it for the default "
                f"{shown_default(opt.default)})"
            )
        try:
            values[opt.field] = opt.parse(raw)
        except ValueError as exc:
            shown = "(hidden)" if opt.secret else repr(raw)
            reason = str(exc) if "expected" in str(exc) else "invalid value"
            # A parser's error may quote the raw value (int() does): shown for a
            # plain setting, as the message shows it, and cut off for a secret.
            raise ConfigError(f"{source}: {reason}, got {shown}") from (None if opt.secret else exc)
    return values


def _redis_url(v: dict[str, Any]) -> str | None:
    url: str | None = v["redis_url"]
    if url:
        # urllib (and redis-py) end the authority at the first '/', '?' or
        # '#': one unescaped in a password makes the rest of it a path, and
        # the password no password (shown whole where the URL is shown).
        rest = url.partition("://")[2]
        if "@" in rest[authority_end(rest) :]:
            raise ConfigError(
                "REDIS_URL: an '@' after the host: percent-encode a '/', '?' or '#' in "
                "the password (%2F, %3F, %23), an '@' anywhere else (%40)"
            )
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises for a port that is no number or out of range)
        except ValueError:  # not chained: its text may quote the URL
            raise ConfigError(
                "REDIS_URL: expected host[:port] with a port of 0-65535 "
                "(an IPv6 address in [brackets])"
            ) from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("REDIS_URL: expected a redis://, rediss:// or unix:// URL")
        _check_redis_url(url, parts)
        return url
    host = v["redis_host"]
    if not host:
        return None
    auth = f":{quote(v['redis_password'], safe='')}@" if v["redis_password"] else ""
    if ":" in host:  # an IPv6 address: bracketed in a URL
        host = f"[{host}]"
    return f"redis://{auth}{host}:{v['redis_port']}/{v['redis_db']}"


#: Query arguments of a ``REDIS_URL`` that redis-py passes on as text, taken
#: when the URL's connection class has a parameter of that name (the others
#: redis-py knows, it parses: ``URL_QUERY_ARGUMENT_PARSERS``).
_TEXT_QUERY_ARGUMENTS: Final = frozenset(
    {"username", "password", "client_name", "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs",
     "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_password", "ssl_ciphers"}
)  # fmt: skip


def _check_redis_url(url: str, parts: SplitResult) -> None:
    """Refuse a ``REDIS_URL`` redis-py would fail on only once the hub runs:
    a space (urllib strips a leading one, redis-py then refuses the scheme:
    a traceback at start), a query argument redis-py cannot parse (a
    traceback) or has no parameter for (``TypeError`` at every connect, the
    hub retrying forever), a path that is no database number (redis-py
    ignores it: database 0). Messages name the argument, never its value."""
    import inspect

    import redis.asyncio.connection as aconn
    import redis.connection as sconn

    scheme, path, query = parts.scheme, parts.path, parse_qs(parts.query)
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError("REDIS_URL: must not contain spaces, newlines or control characters")
    if scheme != "unix" and path.strip("/") and not path.strip("/").isdigit():
        raise ConfigError("REDIS_URL: expected a database number as the path (redis://host:6379/0)")
    try:
        kwargs = aconn.parse_url(url)
        sconn.parse_url(url)  # type: ignore[no-untyped-call, unused-ignore]
    except ValueError:  # not chained: redis-py's text may change
        name = next((n for n in query if _bad_value(n, query[n][0])), None)
        raise ConfigError(
            f"REDIS_URL: invalid value for the query argument {name!r}"
            if name
            else "REDIS_URL: redis-py cannot read it"
        ) from None
    classes = {
        "unix": (aconn.UnixDomainSocketConnection, sconn.UnixDomainSocketConnection),
        "rediss": (aconn.SSLConnection, sconn.SSLConnection),
    }.get(scheme, (aconn.Connection, sconn.Connection))
    taken = aconn.URL_QUERY_ARGUMENT_PARSERS.keys() | _TEXT_QUERY_ARGUMENTS
    for name in query:
        if name not in kwargs or name == "max_connections":  # the pool's
            continue
        known = all(
            any(name in inspect.signature(k).parameters for k in cls.__mro__[:-1])
            for cls in classes
        )
        if name not in taken or not known:
            raise ConfigError(
                f"REDIS_URL: {name!r} is not a query argument redis-py takes for a {scheme}:// URL"
            )


def _bad_value(name: str, value: str) -> bool:
    """Whether redis-py's parser of the query argument ``name`` refuses ``value``."""
    import redis.asyncio.connection as aconn

    parser = aconn.URL_QUERY_ARGUMENT_PARSERS.get(name)
    if parser is None:
        return False
    try:
        parser(value)
    except (TypeError, ValueError):
        return True
    return False


#: The most bytes of ``JWT_PUBLIC_KEY_FILE`` read: a PEM public key is a few
#: KB (RSA 16384 is ~3 KB); a path to a device or a log file read whole
#: ended start-up in a MemoryError traceback, or the machine out of memory.
MAX_KEY_FILE_BYTES: Final = 64 * 1024


def _auth(v: dict[str, Any]) -> AuthConfig:
    algorithms: tuple[str, ...] = v["jwt_algorithms"]
    if not algorithms:
        raise ConfigError("JWT_ALGORITHMS: expected at least one algorithm")
    unknown = [a for a in algorithms if a not in MAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS]
    if unknown:
        raise ConfigError(f"JWT_ALGORITHMS: unknown algorithm {unknown[0]!r}")
    mac = all(a in MAC_ALGORITHMS for a in algorithms)
    public = all(a in PUBLIC_KEY_ALGORITHMS for a in algorithms)
    if not (mac or public):
        raise ConfigError("JWT_ALGORITHMS: MAC (HS*) and public-key algorithms cannot be mixed")
    key: str | bytes
    if mac:
        if not v["jwt_secret"]:
            raise ConfigError("JWT_SECRET: required for HS* algorithms (set JWT_SECRET)")
        secret: str = v["jwt_secret"]
        key = secret
        # RFC 7518 §3.2: an HMAC key MUST be at least as long as the hash.
        need = max(int(a[2:]) // 8 for a in algorithms)
        if len(secret.encode()) < need:
            raise ConfigError(
                f"JWT_SECRET: too short for {'/'.join(algorithms)}: at least {need} bytes "
                "are required (RFC 7518 §3.2); generate one with `openssl rand -hex 32`"
            )
        if not usable_key(algorithms, secret):
            raise ConfigError(
                "JWT_SECRET: PyJWT refuses it as an HMAC secret (it reads as a public key, "
                "a certificate, an SSH key or a JWK); generate one with `openssl rand -hex 32`"
            )
    else:
        path = v["jwt_public_key_file"]
        if not path:
            raise ConfigError(
                "JWT_PUBLIC_KEY_FILE: required for public-key algorithms (a PEM public key)"
            )
        try:
            with Path(path).open("rb") as f:
                key = f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"JWT_PUBLIC_KEY_FILE: cannot read {path}: {exc.strerror}") from exc
        if len(key) > MAX_KEY_FILE_BYTES:
            raise ConfigError(
                f"JWT_PUBLIC_KEY_FILE: {path} is larger than a PEM public key "
                f"({MAX_KEY_FILE_BYTES} bytes at most)"
            )
        if b"PRIVATE KEY" in key:
            raise ConfigError("JWT_PUBLIC_KEY_FILE: holds a private key; give the public key")
        if not usable_key(algorithms, key):
            raise ConfigError(
                f"JWT_PUBLIC_KEY_FILE: {path} is not a PEM public key for {'/'.join(algorithms)}"
            )
    return AuthConfig(
        algorithms=algorithms,
        key=key,
        issuer=v["jwt_issuer"],
        audience=v["jwt_audience"],
        user_claim=v["jwt_user_claim"],
        leeway=v["jwt_leeway"],
    )


def _check_internal(v: dict[str, Any]) -> None:
    if v["internal_host"] and v["internal_port"] is None:
        raise ConfigError(
            "SMAPWS_INTERNAL_PORT: required when SMAPWS_INTERNAL_HOST is set "
            "(the port that serves /metrics and /api/publish)"
        )
    same_host = (v["internal_host"] or v["host"]) == v["host"]
    if same_host and v["port"] != 0 and v["internal_port"] == v["port"]:
        raise ConfigError(
            f"SMAPWS_INTERNAL_PORT: must differ from SMAPWS_PORT ({v['port']}); "
            "unset it to serve everything on one port"
        )


def _check_unused(v: dict[str, Any]) -> None:
    """Refuse settings that the rest of the configuration makes unused, so a
    value is never written and silently ignored."""
    if (
        v["redis_password"]
        and v["redis_url"]
        and not (v["redis_sentinels"] or v["redis_cluster_nodes"])
    ):
        raise ConfigError(
            "REDIS_PASSWORD: not used with REDIS_URL; put it in the URL "
            "(redis://:PASSWORD@host:6379/0) or use REDIS_HOST instead of REDIS_URL"
        )
    algorithms: tuple[str, ...] = v["jwt_algorithms"]
    if algorithms and all(a in PUBLIC_KEY_ALGORITHMS for a in algorithms) and v["jwt_secret"]:
        raise ConfigError(
            f"JWT_SECRET: not used with JWT_ALGORITHMS={','.join(algorithms)} (public-key "
            "algorithms verify with JWT_PUBLIC_KEY_FILE); unset one of them"
        )
    if algorithms and all(a in MAC_ALGORITHMS for a in algorithms) and v["jwt_public_key_file"]:
        raise ConfigError(
            f"JWT_PUBLIC_KEY_FILE: not used with JWT_ALGORITHMS={','.join(algorithms)} "
            "(HS* algorithms verify with JWT_SECRET); set JWT_ALGORITHMS=RS256 (or the "
            "key's algorithm) or unset JWT_PUBLIC_KEY_FILE"
        )


def _check_modes(v: dict[str, Any]) -> None:
    if v["redis_cluster_nodes"] and v["redis_sentinels"]:
        raise ConfigError(
            "REDIS_CLUSTER_NODES: cannot be combined with REDIS_SENTINELS "
            "(a cluster fails over by itself)"
        )
    has_redis = bool(
        v["redis_url"] or v["redis_host"] or v["redis_sentinels"] or v["redis_cluster_nodes"]
    )
    if v["subscribe_mode"] == "user" and not has_redis:
        raise ConfigError(
            "SMAPWS_SUBSCRIBE_MODE: user needs Redis (REDIS_URL, REDIS_HOST, "
            "REDIS_SENTINELS or REDIS_CLUSTER_NODES); the in-process broker has no channels"
        )
    if v["sharded_pubsub"] and not (v["redis_cluster_nodes"] and v["subscribe_mode"] == "user"):
        raise ConfigError(
            "SMAPWS_SHARDED_PUBSUB: needs REDIS_CLUSTER_NODES and SMAPWS_SUBSCRIBE_MODE=user "
            "(sharded channels are subscribed one by one, on the node that owns them)"
        )


def load(
    env: Mapping[str, str],
    flags: Mapping[str, Any] | None = None,
    *,
    require_auth: bool = True,
) -> Config:
    """Build a :class:`Config` from ``env`` and ``flags`` (flags win).

    ``require_auth=False`` lets commands that verify no token (``publish``)
    run without a JWT key. Raises :class:`ConfigError`.
    """
    v = _raw_values(env, flags or {})
    auth = _auth(v) if require_auth or v["jwt_secret"] or v["jwt_public_key_file"] else None
    if v["pong_wait"] <= 0 or v["ping_interval"] <= 0:  # pragma: no cover - parsers forbid
        raise ConfigError("SMAPWS_PING_INTERVAL: expected a positive number of seconds")
    if v["send_queue_high_water"] > v["send_queue_messages"]:
        raise ConfigError(
            "SMAPWS_SEND_QUEUE_HIGH_WATER: must not exceed SMAPWS_SEND_QUEUE_MESSAGES"
        )
    if v["send_queue_total_bytes"] < v["send_queue_bytes"]:
        raise ConfigError(
            "SMAPWS_SEND_QUEUE_TOTAL_BYTES: must not be less than SMAPWS_SEND_QUEUE_BYTES"
        )
    if not v["channel_prefix"]:
        raise ConfigError("SMAPWS_CHANNEL_PREFIX: must not be empty")
    if any(c in v["channel_prefix"] for c in "*?[]"):
        raise ConfigError("SMAPWS_CHANNEL_PREFIX: must not contain glob characters *?[]")
    if v["redis_sentinels"] and not v["redis_sentinel_master"]:
        raise ConfigError(
            "REDIS_SENTINEL_MASTER: required when REDIS_SENTINELS is set "
            "(the master name the Sentinels monitor)"
        )
    if v["redis_sentinel_master"] and not v["redis_sentinels"]:
        raise ConfigError(
            "REDIS_SENTINELS: required when REDIS_SENTINEL_MASTER is set "
            "(comma list of Sentinel host:port)"
        )
    _check_internal(v)
    _check_unused(v)
    _check_modes(v)
    fields = {f for f in Config.__dataclass_fields__}
    kwargs = {k: val for k, val in v.items() if k in fields}
    # Sentinel (or a cluster) wins: the addresses come from there, never a URL.
    pinned = v["redis_sentinels"] or v["redis_cluster_nodes"]
    kwargs["redis_url"] = None if pinned else _redis_url(v)
    kwargs["auth"] = auth
    config = Config(**kwargs)
    if config.workers > 1 and config.broker == "memory":
        raise ConfigError(
            f"SMAPWS_WORKERS: {config.workers} workers need Redis (REDIS_URL, REDIS_HOST, "
            "REDIS_SENTINELS or REDIS_CLUSTER_NODES): the in-process broker cannot reach "
            "the other workers' tabs"
        )
    return config


def option_names() -> Sequence[str]:
    """Every environment variable name smapws reads."""
    return [opt.env for opt in OPTIONS]


#: ``SMAPWS_*`` names read by the tools around the hub (the test suite), not
#: settings: no warning for them.
TOOL_VARIABLES: Final = ("SMAPWS_PYTHON2", "SMAPWS_AUTOBAHN_CACHE", "SMAPWS_FUZZ_SEED")


def ignored_variables(env: Mapping[str, str]) -> list[str]:
    """One warning line for each variable in ``env`` that is ignored: a
    ``SMAPWS_*`` variable that is no setting (a misspelt ``SMAPWS_PROT=9000``
    would otherwise be ignored without a word), naming the closest setting
    when one is close; and ``REDIS_HOST``, ``REDIS_PORT`` or ``REDIS_DB``
    beside a ``REDIS_URL``, which wins over them (``REDIS_PASSWORD`` there is
    refused: it is a secret that would go unused). Values are never shown
    (the variable may hold a secret)."""
    known = option_names()
    lines = []
    for name in sorted(env):
        if not name.startswith("SMAPWS_") or name in known or name in TOOL_VARIABLES:
            continue
        # Compared without the prefix every name shares (it would make any
        # SMAPWS_X look close to every setting).
        suffixes = {k.removeprefix("SMAPWS_"): k for k in known}
        close = difflib.get_close_matches(name.removeprefix("SMAPWS_"), suffixes, n=1)
        hint = (
            f"did you mean {suffixes[close[0]]}?"
            if close
            else "`smapws serve --help` lists the settings"
        )
        lines.append(f"{name} is not a setting and is ignored ({hint})")
    if env.get("REDIS_URL", "").strip():
        lines.extend(
            f"{name} is ignored: REDIS_URL is set, and wins over it"
            for name in ("REDIS_HOST", "REDIS_PORT", "REDIS_DB")
            if env.get(name, "").strip()
        )
    return lines
