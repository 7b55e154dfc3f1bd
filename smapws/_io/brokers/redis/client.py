"""redis-py clients, and the calls that cross the trio-asyncio bridge.

- :func:`client_options` is what every client of the hub is made with;
  :func:`clients_for` makes a session's clients for a URL or a Sentinel-found
  master; an :class:`Endpoint` says which node the next session talks to
  (:func:`endpoint_for`: the target's one node, or each node of a cluster in
  turn).
- :class:`PublishClient` is the long-lived publishing client, every call
  under ``timeout``, replaced after a failure.
- The ``async`` helpers at the bottom run on the asyncio side (callers wrap
  them in :func:`bridged`, ``trio_asyncio.aio_as_trio`` without its
  reference cycles, under a deadline): one bridge crossing for a whole
  exchange.
- Every client's connections drop, when they disconnect, what a cut write
  left unsent (:class:`_DropsUnsent`), so that closing a client closes its
  sockets.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeVar, cast

import redis.asyncio as aioredis
import redis.exceptions
import trio
import trio_asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from smapws._core.cluster import Address, SlotMap
from smapws._io.brokers import BrokerError
from smapws._io.brokers.redis.targets import ClusterTarget, SentinelTarget, Target

#: Errors that mean "the Redis link failed", as opposed to a bug of ours.
LINK_ERRORS: Final = (
    redis.exceptions.RedisError,
    OSError,
    EOFError,
    trio.TooSlowError,
)


def _without_setinfo() -> dict[str, Any]:
    """The argument that keeps redis-py from sending ``CLIENT SETINFO`` on
    connect, in the redis-py installed: ``driver_info`` where it exists (8.x
    warns on the older name), else ``lib_name`` and ``lib_version``."""
    parameters = inspect.signature(aioredis.Redis.__init__).parameters
    if "driver_info" in parameters:
        return {"driver_info": None}
    if "lib_name" in parameters:
        return {"lib_name": None, "lib_version": None}
    return {}


_WITHOUT_SETINFO: Final = _without_setinfo()


def client_options(timeout: float, *, bounded: bool = False) -> dict[str, Any]:
    """What every client of the hub is made with: no retries inside redis-py
    (the reconnect policy is ours alone), raw bytes, and RESP2: with RESP3
    (redis-py's default since 8.0) every pub/sub message goes through its
    push-notification handler, which formats the whole message for a debug
    log line whether or not anyone logs: 15% of the hub's CPU at 24,000
    deliveries/s. And no ``CLIENT SETINFO`` on connect: Redis before 7.2
    (Debian 12's 7.0) answers it with an error, which redis-py swallows,
    leaving a reference cycle (the error's traceback) and a round trip per
    new connection. And the command deadline as the socket's: redis-py 8
    made its default 5 s (it was none), which cut every command at 5 s
    whatever ``SMAPWS_REDIS_TIMEOUT`` said (pub/sub's blocking reads are
    not bound by it from redis-py 8.1 on, hence the hub's pin).

    ``bounded``: every call of this client is under a trio deadline of
    ``timeout`` already (:class:`PublishClient`), so the socket has no
    timeout of its own: with one, redis-py writes each command through
    ``asyncio.wait_for`` (a task and a timer per write) and reads each
    reply under a timer: the fleet log's appends cost 0.83x the hub's CPU
    per message without it (``bench.micro_fleet --against``, 13.43 -> 11.21
    us, 120 appends a pipeline). A call cut by the trio deadline is a link
    error: the client is replaced. One cancelled by its caller is not, and
    the client is kept (the fleet log's consults and reads on a frozen
    link: their callers' deadlines come first): what keeps the next call
    from reading the cut command's reply is redis-py's disconnect of the
    cut connection on the cancellation, in its writes and reads (pinned by
    test_faults and test_cluster, for a URL, Sentinel and a cluster)."""
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": None if bounded else timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
        "protocol": 2,
        **_WITHOUT_SETINFO,
    }


def bridged(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``trio_asyncio.aio_as_trio(fn)``, minus the reference cycle each
    exception that crosses it makes.

    trio-asyncio re-raises an asyncio task's exception in a frame that holds
    the task, which holds the exception, whose traceback holds that frame:
    a cycle, and with it every frame the exception went through and their
    locals (a failed session's client, subscription, buffers; a failed
    publish's pipeline), left to the cyclic garbage collector, which the
    hub's tuning runs rarely (``tests/test_gc_cycles.py``). Each Redis
    failure and each cancelled call made one. The frames the exception has
    left are cleared here (their locals only: a traceback still prints)."""
    call = trio_asyncio.aio_as_trio(fn)

    async def crossing(*args: Any, **kwargs: Any) -> Any:
        try:
            return await call(*args, **kwargs)
        except BaseException as exc:
            _clear_frames(exc)
            raise

    return crossing


def _clear_frames(exc: BaseException) -> None:
    """Clear the finished frames of ``exc``'s traceback and of those of its
    causes, contexts and members (a group's)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # running frames are skipped
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        if isinstance(e, BaseExceptionGroup):
            todo += e.exceptions


class _DropsUnsent(AbstractConnection):
    """A redis-py connection whose disconnect drops the bytes a cut write
    left unsent, closing its socket at once.

    redis-py disconnects with ``StreamWriter.close()``, and asyncio's close
    waits until the transport's buffer is sent. After a write cut short (a
    deadline or a cancellation during a large pipeline, such as a fleet-log
    append of 512 entries, while Redis does not read: frozen, or busy sending
    a backlog), the socket and those bytes stayed open until Redis read them,
    though redis-py had forgotten the transport and no close of ours could
    reach it; at the hub's exit the socket was left to the garbage collector
    (``ResourceWarning: unclosed``). Mixed into the class redis-py chose
    (:func:`_dropping_unsent`), so TLS, Unix sockets and Sentinel keep theirs."""

    __slots__ = ()  # redis-py's connections have slots: no layout conflict

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:
        # (redis-py's arguments vary by version: ``nowait`` since 5.0.) The
        # writer is a private attribute of redis-py's (the one besides its
        # parser, in pump.py, that smapws touches): looked up defensively, so
        # that a redis-py without it disconnects as it always did.
        transport = getattr(getattr(self, "_writer", None), "transport", None)
        if transport is not None and transport.get_write_buffer_size():
            transport.abort()  # Redis gets a cut command, which it drops
        await super().disconnect(*args, **kwargs)


#: redis-py's connection classes with :class:`_DropsUnsent` mixed in, by class.
_MIXED: dict[type[AbstractConnection], type[AbstractConnection]] = {}

_C = TypeVar("_C", bound=AbstractConnection)


def _dropping_unsent(cls: type[_C]) -> type[_C]:
    """``cls`` with :class:`_DropsUnsent` mixed in (one class per ``cls``)."""
    if issubclass(cls, _DropsUnsent):
        return cls
    mixed = _MIXED.get(cls)
    if mixed is None:
        # Named as redis-py's own (its reprs, and its objects are redis-py's
        # to whoever sorts them by module: the cycle tests).
        namespace = {
            "__slots__": (),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        mixed = _MIXED[cls] = type(cls.__name__, (_DropsUnsent, cls), namespace)
    return cast(type[_C], mixed)


def _drop_unsent(client: aioredis.Redis | RedisCluster) -> None:
    """Make the connections ``client`` opens :class:`_DropsUnsent` (before
    it opens any: it is new)."""
    if isinstance(client, RedisCluster):
        nodes = client.nodes_manager
        for node in nodes.startup_nodes.values():
            node.connection_class = _dropping_unsent(node.connection_class)
        # The nodes it learns later are made with these.
        kwargs = nodes.connection_kwargs
        kwargs["connection_class"] = _dropping_unsent(kwargs["connection_class"])
    else:
        pool = client.connection_pool
        pool.connection_class = _dropping_unsent(pool.connection_class)


class Clients:
    """What one session (or the publisher) owns: a client, perhaps its
    subscription, perhaps the Sentinel client that found its master.
    Closing it closes every socket of the client and its subscription,
    even one a cut write left unsent bytes in (:class:`_DropsUnsent`)."""

    def __init__(self, client: aioredis.Redis | RedisCluster, sentinel: Sentinel | None) -> None:
        _drop_unsent(client)
        self.client = client
        self.sentinel = sentinel
        self.pubsub: aioredis.client.PubSub | None = None

    async def aclose(self) -> None:
        """Close everything, ignoring link errors (the link may be what
        failed). Callers bound it with a deadline."""
        await bridged(_close)(self.pubsub, self.client, self.sentinel)


def clients_for(target: str | SentinelTarget, timeout: float, *, bounded: bool = False) -> Clients:
    """New, unconnected clients for a URL or a Sentinel-found master
    (``bounded``: see :func:`client_options`)."""
    common = client_options(timeout, bounded=bounded)
    if isinstance(target, str):
        return Clients(aioredis.Redis.from_url(target, **common), None)
    # Asking every Sentinel in turn must fit the connect deadline.
    per_sentinel = timeout / max(1, len(target.sentinels))
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": per_sentinel,
            "socket_connect_timeout": per_sentinel,
            "retry": Retry(NoBackoff(), 0),
        },
    )
    client = sentinel.master_for(target.master, password=target.password, db=target.db, **common)
    return Clients(client, sentinel)


async def fetch_slots(client: aioredis.Redis, asked: Address) -> SlotMap:
    """``CLUSTER SLOTS`` through ``client`` (trio side; the caller bounds it)."""
    reply = await bridged(client.execute_command)("CLUSTER SLOTS")
    return SlotMap.parse(reply, asked)


class Endpoint(Protocol):
    """Which node a subscription session talks to."""

    def clients(self) -> Clients:
        """New, unconnected clients for the next session (no I/O)."""

    async def learn(self, client: aioredis.Redis) -> None:
        """The session through ``client`` is subscribed: learn what the
        next session may need (bounded by the endpoint's timeout)."""


class NodeEndpoint:
    """A URL's node, or the master Sentinel names at each session."""

    def __init__(self, target: str | SentinelTarget, timeout: float) -> None:
        self._target = target
        self._timeout = timeout

    def clients(self) -> Clients:
        return clients_for(self._target, self._timeout)

    async def learn(self, client: aioredis.Redis) -> None:
        """Nothing to learn: the next session asks the URL or Sentinel again."""


class ClusterEndpoint:
    """Any node of a cluster (a plain ``PUBLISH`` is relayed to every node):
    each new session tries the next node known; a subscribed session learns
    the others (``CLUSTER SLOTS``), so the seeds may be gone later."""

    def __init__(self, target: ClusterTarget, timeout: float) -> None:
        self._target = target
        self._timeout = timeout
        self._nodes: list[Address] = list(target.nodes)
        self._next_node = 0
        self._node: Address | None = None

    def clients(self) -> Clients:
        host, port = self._node = self._nodes[self._next_node % len(self._nodes)]
        self._next_node += 1
        client = aioredis.Redis(
            host=host, port=port, password=self._target.password, **client_options(self._timeout)
        )
        return Clients(client, None)

    async def learn(self, client: aioredis.Redis) -> None:
        """Remember every node of the cluster: the current one first, the
        next attempt goes to another."""
        current = self._node
        assert current is not None
        with trio.fail_after(self._timeout):
            slots = await fetch_slots(client, current)
        self._nodes = list(dict.fromkeys([current, *slots.nodes, *self._nodes]))
        self._next_node = 1


def endpoint_for(target: Target, timeout: float) -> Endpoint:
    """The :class:`Endpoint` of ``target``."""
    if isinstance(target, ClusterTarget):
        return ClusterEndpoint(target, timeout)
    return NodeEndpoint(target, timeout)


class PublishClient:
    """The hub's publishing client: ``PUBLISH`` (or ``SPUBLISH`` with
    ``sharded``) through one long-lived client, under ``timeout``. For a
    cluster, redis-py's cluster client, which sends ``SPUBLISH`` to the
    node owning the channel's slot and follows its redirections."""

    def __init__(
        self,
        target: Target,
        *,
        timeout: float,
        sharded: bool = False,
    ) -> None:
        self._target = target
        self._timeout = timeout
        self._command = "spublish" if sharded else "publish"
        self._clients: Clients | None = None

    @property
    def cluster(self) -> bool:
        """Whether it talks to a Redis Cluster (the keys of one command
        must then share a slot)."""
        return isinstance(self._target, ClusterTarget)

    def _new(self) -> Clients:
        target = self._target
        if not isinstance(target, ClusterTarget):
            return clients_for(target, self._timeout, bounded=True)
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            password=target.password,
            **client_options(self._timeout, bounded=True),
        )
        return Clients(client, None)

    async def publish(self, channel: bytes, data: bytes) -> int:
        """Publish; return the receivers Redis reports. Raises
        :class:`BrokerError` (no credentials in it) when Redis fails; the
        client is then replaced, so the next call reconnects (with Sentinel,
        finds the current master; with a cluster, its current topology)."""
        n = await self._call(
            "publish", lambda client: getattr(client, self._command)(channel, data)
        )
        return int(n)

    async def pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one pipeline (no transaction; a cluster's is
        split by node) and return each reply, or the error Redis answered
        it with as an exception object. Raises :class:`BrokerError` as
        :meth:`publish` does when the link fails."""
        return list(await self._call("command", lambda client: _pipeline(client, commands)))

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        clients = self._clients
        if clients is None:
            clients = self._clients = self._new()
        try:
            with trio.fail_after(self._timeout):
                return await bridged(fn)(clients.client)
        except (*LINK_ERRORS, redis.exceptions.RedisClusterException) as exc:
            if self._clients is clients:
                self._clients = None
                with trio.CancelScope(shield=True), trio.move_on_after(self._timeout):
                    await clients.aclose()
            # Not ``from exc``: the cause can quote the password. redis-py's
            # own texts name only host:port, but an error *reply* is the
            # server's text, and Redis echoes a refused command's first
            # arguments ("unknown command 'AUTH', with args beginning with:
            # '<password>'" when AUTH is renamed). Whoever logs this error
            # with its traceback must not print that; the cause's type name
            # is all it keeps.
            raise BrokerError(f"Redis {what} failed: {type(exc).__name__}") from None

    async def aclose(self) -> None:
        if self._clients is not None:
            clients, self._clients = self._clients, None
            with trio.CancelScope(shield=True), trio.move_on_after(self._timeout):
                await clients.aclose()


def address(pubsub: aioredis.client.PubSub) -> str | None:
    """``host:port`` (or the socket path) the subscription is connected to."""
    conn = pubsub.connection
    if conn is None:
        return None
    host, port = getattr(conn, "host", None), getattr(conn, "port", None)
    if host is not None:
        return f"{host}:{port}"
    path = getattr(conn, "path", None)
    return str(path) if path else None


# -- asyncio side ---------------------------------------------------------


async def subscribe(pubsub: aioredis.client.PubSub, pattern: str | None, probe: bytes) -> None:
    """Connect, PSUBSCRIBE the users' pattern (pattern mode), then SUBSCRIBE
    the probe channel (in this order: the probe's confirmation proves both)."""
    if pattern is not None:
        await pubsub.psubscribe(pattern)
    await pubsub.subscribe(probe)


async def send_batch(
    pubsub: aioredis.client.PubSub, commands: list[tuple[str, tuple[bytes, ...]]]
) -> None:
    """Send (un)subscribe commands one after the other without waiting for
    their confirmations (the read loop gets those): one round trip for all."""
    for command, channels in commands:
        await getattr(pubsub, command)(*channels)


async def _pipeline(
    client: aioredis.Redis | RedisCluster, commands: Sequence[tuple[Any, ...]]
) -> Any:
    pipe = client.pipeline() if isinstance(client, RedisCluster) else client.pipeline(False)
    for command in commands:
        pipe.execute_command(*command)
    return await pipe.execute(raise_on_error=False)


async def _close(
    pubsub: aioredis.client.PubSub | None, client: aioredis.Redis, sentinel: Sentinel | None
) -> None:
    try:
        try:
            if pubsub is not None:
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
        finally:
            try:
                await client.aclose()
            finally:
                if sentinel is not None:
                    await sentinel.aclose()
    except (redis.exceptions.RedisError, OSError):
        pass
