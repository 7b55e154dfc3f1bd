"""The Redis subscriber: ``PSUBSCRIBE {prefix}*`` through trio-asyncio.

The read loop runs on the asyncio side of the bridge and hands each message to
trio with ``send_nowait``: crossing the bridge once per message costs ~4x more
(DESIGN.md §1). Each bounded call across the bridge (connect, publish) has a
deadline. When the subscription fails the trio side closes the client, waits a
capped, jittered exponential backoff and connects again with a new client; it
never falls back to the in-process broker.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions
import trio
import trio_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from smapws._config import redact_url
from smapws._io.brokers import BrokerError, Item
from smapws._log import fields, logger

#: First reconnect delay; doubles per failed attempt up to ``reconnect_max``.
BACKOFF_BASE: Final = 0.5

#: Errors that mean "the Redis link failed", as opposed to a bug of ours.
_LINK_ERRORS: Final = (redis.exceptions.RedisError, OSError, EOFError, trio.TooSlowError)


def backoff_delay(attempt: int, *, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): "equal jitter",
    half fixed and half random, of ``min(cap, BACKOFF_BASE * 2**attempt)``.

    The fixed half guarantees no busy loop; the random half spreads the
    reconnects of many pods after a shared Redis restart."""
    ceiling = min(cap, BACKOFF_BASE * (2 ** min(attempt, 30)))
    return float(ceiling / 2 + rng() * ceiling / 2)


class RedisBroker:
    """Subscriber and publisher on one Redis URL."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        pattern: str,
        *,
        timeout: float,
        reconnect_max: float,
        on_reconnect: Callable[[], None] = lambda: None,
        on_drop: Callable[[], None] = lambda: None,
    ) -> None:
        self._url = url
        self._pattern = pattern
        self._timeout = timeout
        self._reconnect_max = reconnect_max
        self._on_reconnect = on_reconnect
        self._on_drop = on_drop
        self._status = "connecting"
        self._reconnects = 0
        self._last_error: str | None = None
        self._connected_at: float | None = None
        self._publisher: aioredis.Redis | None = None

    @property
    def status(self) -> str:
        return self._status

    def info(self) -> dict[str, Any]:
        up = self._connected_at
        return {
            "backend": self.backend,
            "status": self._status,
            "url": redact_url(self._url),
            "pattern": self._pattern,
            "reconnects": self._reconnects,
            "last_error": self._last_error,
            "connected_for_s": None if up is None else round(trio.current_time() - up, 3),
        }

    def _client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self._url,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )

    async def run(
        self,
        sink: trio.MemorySendChannel[Item],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        attempt = 0
        while True:
            self._status = "connecting"
            client = self._client()
            pubsub = client.pubsub()
            try:
                with trio.fail_after(self._timeout):
                    await trio_asyncio.aio_as_trio(pubsub.psubscribe)(self._pattern)
                self._status = "connected"
                self._connected_at = trio.current_time()
                self._last_error = None
                attempt = 0
                logger.info(
                    "Redis subscribed",
                    extra=fields(url=redact_url(self._url), pattern=self._pattern),
                )
                await trio_asyncio.aio_as_trio(_pump)(pubsub, sink, self._on_drop)
                self._last_error = "subscription ended"
            except _LINK_ERRORS as exc:
                self._last_error = f"{type(exc).__name__}: {_safe_error(exc, self._url)}"
            finally:
                self._status = "down"
                self._connected_at = None
                with trio.CancelScope(shield=True), trio.move_on_after(self._timeout):
                    await trio_asyncio.aio_as_trio(_close)(pubsub, client)
            delay = backoff_delay(attempt, cap=self._reconnect_max)
            attempt += 1
            self._reconnects += 1
            self._on_reconnect()
            logger.warning(
                "Redis subscription down, reconnecting",
                extra=fields(error=self._last_error, retry_in_s=round(delay, 2)),
            )
            await trio.sleep(delay)

    async def publish(self, channel: bytes, data: bytes) -> int:
        if self._publisher is None:
            self._publisher = self._client()
        try:
            with trio.fail_after(self._timeout):
                n = await trio_asyncio.aio_as_trio(self._publisher.publish)(channel, data)
        except _LINK_ERRORS as exc:
            raise BrokerError(f"Redis publish failed: {type(exc).__name__}") from None
        return int(n)

    async def aclose(self) -> None:
        """Close the publishing client (the subscriber closes its own)."""
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            with trio.CancelScope(shield=True), trio.move_on_after(self._timeout):
                await trio_asyncio.aio_as_trio(publisher.aclose)()


def _safe_error(exc: BaseException, url: str) -> str:
    """The error text with the URL's password removed, should redis-py or the
    OS ever quote the URL."""
    text = str(exc)
    return text.replace(url, redact_url(url))[:200]


async def _close(pubsub: aioredis.client.PubSub, client: aioredis.Redis) -> None:
    """asyncio side: close the subscription and its client, ignoring link
    errors (the link may be what failed)."""
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def _pump(
    pubsub: aioredis.client.PubSub,
    sink: trio.MemorySendChannel[Item],
    on_drop: Callable[[], None],
) -> None:
    """asyncio side: read pmessages and hand them to trio without waiting.
    Returns or raises when the connection fails."""
    get = pubsub.get_message
    send = sink.send_nowait
    while True:
        msg = await get(ignore_subscribe_messages=True, timeout=None)
        if msg is None or msg.get("type") != "pmessage":
            continue
        try:
            send((msg["channel"], msg["data"]))
        except trio.WouldBlock:
            on_drop()
