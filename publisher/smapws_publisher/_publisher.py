"""Publish to smapws from Python: the seed's messages, checked as the hub checks them.

For backend services (the Project service's progress callback, anything that
notifies a user). Messages go to Redis (``PUBLISH user_noti:{user_id}``, as
the seed's Go code does) or through a hub's HTTP publish API::

    from smapws_publisher import Publisher      # or: from smapws.publisher import ...

    with Publisher(redis_url="redis://redis:6379/0") as pub:
        pub.progress("user_123", project_id="proj_xyz", status="CRAWLING",
                     total=1000, done=150, errors=2)
        pub.notify("user_123", "New Comment", "Someone commented on your project")

    Publisher(api_url="http://smapws:8081", api_key=key)   # POST /api/publish

:class:`AsyncPublisher` has the same methods for asyncio (``await
pub.progress(...)``, ``async with``). Both are safe to share between threads
or tasks, connect lazily and reuse their connection.

Every message is encoded once and checked with the hub's own parser before
anything is sent, so what is published is what the hub delivers. With hubs
in Redis Cluster sharded mode (``SMAPWS_SHARDED_PUBSUB=true``) publish with
``sharded=True``: ``SPUBLISH`` to the node owning the channel's slot. A publish is
tried once, never retried (``PUBLISH`` is not idempotent): the caller decides.

Exceptions::

    ValueError
    └── InvalidMessage    the hub would drop this message; nothing was sent.
                          ``reason``: too_large, not_utf8, bad_type, ...
                          (plain ValueError for a bad argument, e.g. user_id)
    PublishError          not published, or not known to be (a timeout).
    │                     ``server`` (where, password hidden), ``reason``
    └── PublishRefused    the hub's HTTP API answered no; ``status``

No message, ``repr`` or exception ever holds a password or the API key.
"""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Mapping
from http.client import HTTPException
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException

from smapws_publisher import _messages as core
from smapws_publisher._messages import redact_url
from smapws_publisher._validate import DEFAULT_MAX_MESSAGE_BYTES, InvalidMessage

if TYPE_CHECKING:
    from smapws._config import Config

__all__ = [
    "AsyncPublisher",
    "InvalidMessage",
    "PublishError",
    "PublishRefused",
    "Publisher",
]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """An answer 3xx is the answer: urllib would follow it (a POST as a GET)
    with every header of the request, the ``Authorization: Bearer`` key
    included, to whatever host the ``Location`` names."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


#: How the HTTP flavour talks to a hub: urllib's defaults (proxies from the
#: environment, https) without following redirects.
_OPENER = urllib.request.build_opener(_NoRedirects)

#: Seconds one publish may take (connect, send, answer) unless told otherwise.
DEFAULT_TIMEOUT = 5.0

#: The most of an HTTP answer read: the hub's answers are a few dozen bytes.
_MAX_ANSWER_BYTES = 4096


class PublishError(Exception):
    """The message was not published, or it is not known whether it was (a
    timeout). ``server`` says where (any password replaced by ``***``),
    ``reason`` why, on one line."""

    def __init__(self, server: str, reason: str) -> None:
        self.server = server
        self.reason = reason
        super().__init__(f"publish to {server} failed: {reason}")


class PublishRefused(PublishError):
    """The hub's HTTP publish API answered with an error: ``status`` is the
    HTTP status, ``reason`` e.g. ``HTTP 401 bad_api_key``."""

    def __init__(self, server: str, reason: str, status: int) -> None:
        super().__init__(server, reason)
        self.status = status
        #: What to do about it (``""`` when nothing obvious).
        self.hint = core.api_hint(status, reason)
        hint = f" ({self.hint})" if self.hint else ""
        self.args = (f"publish to {server} refused: {reason}{hint}",)


_R = TypeVar("_R")
_C = TypeVar("_C")


class _Methods(Generic[_R, _C]):
    """What both flavours share: settings, the seed's message rules, errors.
    ``_R`` is what :meth:`publish` returns (``int``, or a coroutine of it),
    ``_C`` the redis-py client class."""

    #: ``"redis"`` or ``"api"``.
    transport: str
    #: Where messages go, safe to log.
    server: str

    #: The connections :meth:`close` closes (those this object opened).
    _owned: list[_C]
    _client: _C | None
    #: Makes the client on first use (a cluster client asks its seeds for
    #: the topology as it is made: no I/O before the first publish).
    _make: Callable[[], _C] | None = None

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        client: _C | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
        channel_prefix: str = "user_noti:",
        timeout: float = DEFAULT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        sharded: bool = False,
    ) -> None:
        if sum(x is not None for x in (redis_url, client, api_url)) != 1:
            raise ValueError("give exactly one of redis_url, client or api_url")
        if not channel_prefix:
            raise ValueError("channel_prefix: must not be empty")
        if not timeout > 0:
            raise ValueError("timeout: expected a positive number of seconds")
        if sharded and api_url is not None:
            raise ValueError("sharded: applies to Redis, not to the HTTP API (the hub knows)")
        self._prefix = channel_prefix
        self._sharded = sharded
        self._timeout = float(timeout)
        self._max_bytes = max_message_bytes
        self._secrets: tuple[str, ...] = ()
        self._owned = []
        self._endpoint = ""
        self._api_key = ""
        if api_url is not None:
            parts = urlsplit(api_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("api_url: expected an http:// or https:// URL")
            if parts.username is not None or parts.password is not None:
                raise ValueError("api_url: give the key as api_key, not in the URL")
            if not api_key:
                raise ValueError("api_key: required with api_url (the hub's SMAPWS_API_KEY)")
            self.transport = "api"
            self.server = api_url.rstrip("/")
            self._endpoint = self.server + "/api/publish"
            self._api_key = api_key
            self._secrets = (api_key,)
        else:
            self.transport = "redis"
            if redis_url is not None:
                self.server = redact_url(redis_url)
                password = urlsplit(redis_url).password
                self._secrets = (password, unquote(password)) if password else ()
            else:
                self.server = _describe(client)
        self._client = client
        if redis_url is not None:
            self._client = self._from_url(redis_url)
            self._owned.append(self._client)

    def _from_url(self, url: str) -> _C:
        """A new client for ``url`` (no I/O)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(server={self.server!r})"

    #: Whether the redis-py clients made here are ``redis.asyncio`` ones.
    _asynchronous = False

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, api_url: str | None = None
    ) -> Self:
        """A publisher configured as the hub is, from ``environ`` (default
        ``os.environ``): Redis from ``REDIS_URL``, the seed's
        ``REDIS_HOST``/``REDIS_PORT``/``REDIS_DB``/``REDIS_PASSWORD`` or
        ``REDIS_SENTINELS``/``REDIS_SENTINEL_MASTER``; else (or when
        ``api_url`` is given) the HTTP API of the hub at ``api_url`` (default
        ``SMAPWS_HOST``:``SMAPWS_PORT``) with ``SMAPWS_API_KEY``; or a
        cluster from ``REDIS_CLUSTER_NODES``, with ``SPUBLISH`` when
        ``SMAPWS_SHARDED_PUBSUB`` is true. Also reads
        ``SMAPWS_CHANNEL_PREFIX``, ``SMAPWS_REDIS_TIMEOUT`` (the publish
        timeout) and ``SMAPWS_MAX_MESSAGE_BYTES``. Raises
        :class:`smapws.ConfigError` naming the variable. No I/O here.

        The variables are read by the hub's own parser, so this needs the
        hub's package (``smapws``) installed: with ``smapws-publisher`` alone
        it raises :class:`ModuleNotFoundError` saying so; give ``redis_url``
        (or ``client``, ``api_url``) instead."""
        try:
            from smapws._config import ConfigError, load
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                "Publisher.from_env() reads the hub's variables with the hub's parser "
                "(install smapws); with smapws-publisher alone give redis_url=..."
            ) from exc
        config = load(os.environ if environ is None else environ, require_auth=False)
        common: dict[str, Any] = {
            "channel_prefix": config.channel_prefix,
            "timeout": config.redis_timeout,
            "max_message_bytes": config.max_message_bytes,
        }
        if api_url is not None or config.broker != "redis":
            if not config.api_key:
                raise ConfigError(
                    "SMAPWS_API_KEY: needed to publish through a hub's HTTP API "
                    "(or set REDIS_URL to publish to Redis)"
                )
            url = api_url if api_url is not None else _local_hub(config)
            return cls(api_url=url, api_key=config.api_key, **common)
        if config.redis_cluster_nodes:
            return cls._cluster(config, common)
        if not config.redis_sentinels:
            return cls(config.redis_url, **common)
        options = _redis_options(config.redis_timeout, asynchronous=cls._asynchronous)
        module = redis.asyncio.sentinel if cls._asynchronous else redis.sentinel
        sentinel = module.Sentinel(list(config.redis_sentinels), sentinel_kwargs=options)
        client = sentinel.master_for(
            str(config.redis_sentinel_master),
            password=config.redis_password,
            db=config.redis_db,
            **options,
        )
        pub = cls(client=client, **common)
        pub.server = str(config.redis_url_redacted)
        pub._secrets = (config.redis_password,) if config.redis_password else ()
        pub._owned = [client, *sentinel.sentinels]
        return pub

    @classmethod
    def _cluster(cls, config: Config, common: dict[str, Any]) -> Self:
        """A publisher to the cluster of ``REDIS_CLUSTER_NODES`` (made lazily)."""
        options = _redis_options(config.redis_timeout, asynchronous=cls._asynchronous)
        module: Any = redis.asyncio.cluster if cls._asynchronous else redis.cluster
        nodes = [module.ClusterNode(host, port) for host, port in config.redis_cluster_nodes]

        def make() -> Any:
            return module.RedisCluster(
                startup_nodes=nodes, password=config.redis_password, **options
            )

        pub = cls(client=_UNMADE, sharded=config.sharded_pubsub, **common)
        pub._client = None
        pub._make = make
        pub.server = str(config.redis_url_redacted)
        pub._secrets = (config.redis_password,) if config.redis_password else ()
        return pub

    def _redis_client(self) -> _C | None:
        """The Redis client (made now if it is made lazily), or ``None``
        through the HTTP API. Raises what making it raises."""
        if self._client is None and self._make is not None:
            self._client = self._make()
            self._owned.append(self._client)
        return self._client

    def _command(self) -> str:
        return "spublish" if self._sharded else "publish"

    def publish(self, user_id: str | int, type: str, payload: Mapping[str, Any]) -> _R:
        """Publish ``{"type": type, "payload": payload}`` to ``user_id``.

        Returns how many subscribers received it: with Redis the hubs
        subscribed to the channel (0: no hub listens, the message is lost);
        through the HTTP API the number the hub reports. Raises
        :class:`InvalidMessage` (nothing sent) when the hub would drop the
        message, :class:`ValueError` for a bad ``user_id``,
        :class:`TypeError` for a value JSON cannot hold,
        :class:`PublishError` when the server fails or refuses.
        """
        raise NotImplementedError

    def progress(
        self,
        user_id: str | int,
        *,
        project_id: str,
        status: str,
        total: int,
        done: int,
        errors: int = 0,
    ) -> _R:
        """The Project service's progress update, by the seed's rule:
        ``project_completed`` when ``status`` is ``DONE`` or ``FAILED``, else
        ``project_progress``; the payload holds ``project_id, status, total,
        done, errors`` and ``progress_percent = done / total * 100`` (0 when
        ``total`` is 0). Raises :class:`ValueError` for counts that are not
        integers >= 0 or an empty id or status; else as :meth:`publish`."""
        mtype, payload = core.progress_message(
            project_id=project_id, status=status, total=total, done=done, errors=errors
        )
        return self.publish(user_id, mtype, payload)

    def notify(
        self,
        user_id: str | int,
        title: str,
        message: str,
        *,
        level: str = "info",
        extra: Mapping[str, Any] | None = None,
    ) -> _R:
        """A ``notification`` with the seed's ``title, message, level``, plus
        any ``extra`` payload fields (which may not replace those three).
        Raises as :meth:`publish`."""
        return self.publish(
            user_id, "notification", core.notification_payload(title, message, level, extra)
        )

    def alert(
        self,
        user_id: str | int,
        title: str,
        message: str,
        *,
        severity: str = "warning",
        extra: Mapping[str, Any] | None = None,
    ) -> _R:
        """An ``alert`` with the seed's ``title, message, severity``, plus any
        ``extra`` payload fields. Raises as :meth:`publish`."""
        return self.publish(user_id, "alert", core.alert_payload(title, message, severity, extra))

    def _prepare(
        self, user_id: str | int, mtype: str, payload: Mapping[str, Any]
    ) -> tuple[bytes, bytes]:
        """``(channel, message)``, checked; raises before any I/O."""
        channel = core.channel(self._prefix, user_id)
        return channel, core.encode(mtype, payload, max_bytes=self._max_bytes)

    def _failed(self, exc: BaseException) -> PublishError:
        """``exc`` as a :class:`PublishError`, with no secret in its text."""
        text = str(exc)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        if isinstance(exc, TimeoutError | redis.TimeoutError):
            reason += f" (no answer within {self._timeout:g} s)"
        elif isinstance(exc, ConnectionRefusedError) and self.transport == "api":
            reason += (
                " (no hub listens there: start one, or say where it is with SMAPWS_HOST and "
                "SMAPWS_INTERNAL_PORT or SMAPWS_PORT, or --url)"
            )
        return PublishError(self.server, core.one_line(reason))

    def _post(self, user_id: str | int, data: bytes) -> int:
        """``POST /api/publish`` (blocking; the asyncio flavour runs it in a thread)."""
        request = urllib.request.Request(
            self._endpoint,
            data=core.api_body(user_id, data),
            method="POST",
            headers={
                "Authorization": f"Bearer {self._api_key}",
                "Content-Type": "application/json",
            },
        )
        try:
            try:
                with _OPENER.open(request, timeout=self._timeout) as answer:
                    status, body = answer.status, answer.read(_MAX_ANSWER_BYTES)
            except urllib.error.HTTPError as exc:
                with exc:
                    status, body = exc.code, exc.read(_MAX_ANSWER_BYTES)
        except urllib.error.URLError as exc:
            cause = exc.reason if isinstance(exc.reason, BaseException) else exc
            raise self._failed(cause) from exc
        except (OSError, HTTPException) as exc:
            raise self._failed(exc) from exc
        hubs, reason = core.api_result(status, body)
        if hubs is None:
            raise PublishRefused(self.server, reason, status)
        return hubs


#: Stands for the client a cluster publisher makes on first use.
_UNMADE: Any = object()


def _describe(client: object) -> str:
    """Where a redis-py client points, for messages (no password)."""
    if client is _UNMADE:
        return ""
    if isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster):
        return "redis cluster"
    pool = getattr(client, "connection_pool", None)
    service = getattr(pool, "service_name", None)
    if service:
        return f"sentinel master {service}"
    kw: dict[str, Any] = getattr(pool, "connection_kwargs", {})
    if "path" in kw:
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def url_host(host: str) -> str:
    """``host`` as a client on the same machine writes it in a URL: the
    loopback address for a wildcard bind (``0.0.0.0``, ``::``, empty), an
    IPv6 address in brackets."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"[{host}]" if ":" in host else host


def _local_hub(config: Config) -> str:
    """The base URL of the publish API of the hub the configuration
    describes: its internal port when it has one (the API is served there
    alone), else its port."""
    host, port = config.internal_address or (config.host, config.port)
    return f"http://{url_host(host)}:{port}"


class Publisher(_Methods[int, redis.Redis | redis.cluster.RedisCluster]):
    """Publishes to smapws, blocking. Give one of:

    - ``redis_url``: ``redis://[:password@]host:port/db``, ``rediss://``,
      ``unix://`` (the client is created here and closed by :meth:`close`);
    - ``client``: a ``redis.Redis`` or ``redis.cluster.RedisCluster`` you
      made (Sentinel, cluster, your pool); it is used as is and not closed;
    - ``api_url`` and ``api_key``: a hub's base URL and its
      ``SMAPWS_API_KEY``, for services without access to Redis.

    ``channel_prefix`` must match the hubs' ``SMAPWS_CHANNEL_PREFIX``;
    ``timeout`` bounds each publish (connect, send, answer);
    ``max_message_bytes`` should match the hubs' ``SMAPWS_MAX_MESSAGE_BYTES``;
    ``sharded=True`` publishes with ``SPUBLISH`` (hubs with
    ``SMAPWS_SHARDED_PUBSUB=true``; give a cluster ``client``).
    Raises :class:`ValueError` for a bad combination. No I/O here.
    """

    def _from_url(self, url: str) -> redis.Redis:
        return redis.Redis.from_url(url, **_redis_options(self._timeout))

    def publish(self, user_id: str | int, type: str, payload: Mapping[str, Any]) -> int:
        channel, data = self._prepare(user_id, type, payload)
        if self._client is None and self._make is None:
            return self._post(user_id, data)
        try:
            client = self._redis_client()
            return int(getattr(client, self._command())(channel, data))
        except (redis.RedisError, RedisClusterException) as exc:
            raise self._failed(exc) from exc

    publish.__doc__ = _Methods.publish.__doc__

    def close(self) -> None:
        """Close the connections this publisher opened (not a ``client`` you gave)."""
        owned, self._owned = self._owned, []
        for client in owned:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncPublisher(
    _Methods[Coroutine[Any, Any, int], redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster]
):
    """:class:`Publisher` for asyncio: the same arguments (``client`` is a
    ``redis.asyncio.Redis``) and methods, awaited; ``timeout`` bounds each
    publish with ``asyncio.timeout``. Through the HTTP API each publish runs
    in a worker thread (``asyncio.to_thread``): if the awaiting task is
    cancelled, the request still completes or times out in the thread."""

    def _from_url(self, url: str) -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(url, **_redis_options(self._timeout, asynchronous=True))

    async def publish(self, user_id: str | int, type: str, payload: Mapping[str, Any]) -> int:
        channel, data = self._prepare(user_id, type, payload)
        if self._client is None and self._make is None:
            return await asyncio.to_thread(self._post, user_id, data)
        try:
            async with asyncio.timeout(self._timeout):
                client = self._redis_client()
                return int(await getattr(client, self._command())(channel, data))
        except (redis.RedisError, RedisClusterException, TimeoutError) as exc:
            raise self._failed(exc) from exc

    publish.__doc__ = _Methods.publish.__doc__

    _asynchronous = True

    async def aclose(self) -> None:
        """Close the connections this publisher opened (not a ``client`` you gave)."""
        owned, self._owned = self._owned, []
        for client in owned:
            await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _redis_options(timeout: float, *, asynchronous: bool = False) -> dict[str, Any]:
    """Client settings: every socket operation under ``timeout``, and no
    retries inside redis-py (whose default retries a failed command up to 10
    times with backoff: a publish could repeat, or fail only after long)."""
    retry_class = redis.asyncio.retry.Retry if asynchronous else redis.retry.Retry
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry_class(NoBackoff(), 0),
    }
