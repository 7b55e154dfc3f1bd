"""Redis Cluster with sharded pub/sub (``SMAPWS_SHARDED_PUBSUB=true``).

A sharded channel lives on the master that owns its hash slot (``SPUBLISH``
reaches only that shard), so a hub in user mode keeps one *link* per master
(a :class:`~smapws._io.brokers.redis.RedisBroker` in the
:class:`~smapws._io.brokers.redis.ShardedLink` role: probe, read loop,
(un)subscribe commands) and each link ``SSUBSCRIBE``\\ s the channels
of the slots its master owns, one command per slot (Redis refuses
``SSUBSCRIBE`` across slots), all sent in one go::

    ShardedBroker.run (trio)               topology: CLUSTER SLOTS from any node
    └── links nursery
        ├── link 10.0.0.1:6379             RedisBroker.run, channels of its slots
        ├── link 10.0.0.2:6379
        └── link 10.0.0.3:6379

- **Topology.** The map comes from ``CLUSTER SLOTS``, asked of the nodes
  known (the last map's, then the seeds), one after the other. It is asked
  again whenever a link fails or a node drops a channel by itself (a slot
  moved away: Redis pushes ``sunsubscribe``), and every
  :data:`REFRESH_WHILE_DEGRADED` s while some master has no working link.
- **Failover.** When a master dies its link fails: its channels are back to
  "not subscribed" (each user's tabs get ``resync`` once the channel is
  subscribed again, on the new master). The link retries with the usual
  backoff until the map names the promoted replica; then the old link is
  stopped and a new one started for the new master.
- **Slot moves.** A channel dropped by its node is subscribed again on the
  slot's new owner once the map says who that is.
- **Status.** ``connected`` when every slot has a master and every master's
  link is connected; ``/ready`` is 503 otherwise (some users' messages are
  not arriving).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final
from urllib.parse import quote

import redis.asyncio as aioredis
import trio
from trio_util import AsyncValue

from smapws._core.cluster import SLOTS, Address, SlotMap, TopologyError
from smapws._io.brokers import Item
from smapws._io.brokers.channels import UserChannels
from smapws._io.brokers.redis import (
    LINK_ERRORS,
    Clients,
    ClusterTarget,
    PublishClient,
    RedisBroker,
    ShardedLink,
    backoff_delay,
    client_options,
    fetch_slots,
    safe_error,
)
from smapws._log import fields, logger

#: How often the topology is asked again while some master has no working
#: link (a failover under way): the new master is found within this much of
#: its promotion.
REFRESH_WHILE_DEGRADED: Final = 0.25

#: A node that dropped the channels of a slot (it lost the slot) is given
#: none of that slot again until the map names another owner, or this long
#: has passed: the map, asked of a node that has not heard the news yet, may
#: still name it for a moment.
DROP_HOLD: Final = 5.0


@dataclass
class _Link:
    broker: RedisBroker
    scope: trio.CancelScope


class ShardedBroker:
    """User mode on a Redis Cluster with sharded pub/sub (see the module
    docstring). ``channels`` is the hub's :class:`UserChannels` (grouped by
    slot, sharded verbs); callbacks as :class:`RedisBroker`'s."""

    backend = "redis"

    def __init__(
        self,
        target: ClusterTarget,
        *,
        channels: UserChannels,
        timeout: float,
        reconnect_max: float,
        probe_interval: float = 5.0,
        on_reconnect: Callable[[], None] = lambda: None,
        on_drop: Callable[[], None] = lambda: None,
        on_error: Callable[[BaseException], object] = lambda exc: None,
        **link_options: Any,
    ) -> None:
        """``link_options`` go to each link's :class:`RedisBroker` as they
        are (``max_message_bytes``, ``on_too_large``, ``on_disconnect``,
        ``queued``)."""
        assert channels.sharded, "sharded pub/sub needs sharded channels"
        self._link_options = link_options
        self._target = target
        self.channels = channels
        self._timeout = timeout
        self._reconnect_max = reconnect_max
        self._probe_interval = probe_interval
        self._on_reconnect = on_reconnect
        self._on_drop = on_drop
        self._on_error = on_error
        self.node_id = secrets.token_hex(6)
        self._links: dict[Address, _Link] = {}
        self._serial = 0
        self._slots: SlotMap | None = None
        self._known: list[Address] = list(target.nodes)
        self._refresh = trio.Event()
        self._refreshes = 0
        self._last_error: str | None = None
        self._publisher = PublishClient(target, timeout=timeout, sharded=True)
        #: Slots whose channels a node dropped: slot -> (node, when).
        self._dropped: dict[int, tuple[Address, float]] = {}
        channels.on_drop = self._slot_dropped
        #: ``connected`` only while every master's link is; observable.
        self.status_value: AsyncValue[str] = AsyncValue("connecting")

    # -- state ---------------------------------------------------------------

    @property
    def status(self) -> str:
        return str(self.status_value.value)

    def _update_status(self) -> None:
        """Recompute :attr:`status_value` from the map and the links (called
        whenever either changes, so that watchers of the value need not
        poll)."""
        self.status_value.value = self._compute_status()

    def _compute_status(self) -> str:
        slots = self._slots
        if slots is None:
            return "connecting"
        statuses = {self._links[m].broker.status for m in slots.masters if m in self._links}
        if slots.covered < SLOTS or "down" in statuses:
            return "down"
        if "connecting" in statuses or len(statuses) == 0:
            return "connecting"
        return "connected"

    def info(self) -> dict[str, Any]:
        """The ``subscriber`` object of ``/health``; never holds a password."""
        slots = self._slots
        nodes = []
        for address, link in sorted(self._links.items()):
            sub = link.broker.info()
            nodes.append(
                {
                    "node": f"{address[0]}:{address[1]}",
                    "slots": self._slot_count(address),
                    **{
                        k: sub[k]
                        for k in (
                            "status",
                            "reconnects",
                            "last_error",
                            "probe_rtt_ms",
                            "down_for_s",
                        )
                    },
                }
            )
        errors = [n["last_error"] for n in nodes if n["last_error"]]
        return {
            "backend": self.backend,
            "status": self.status,
            "url": self._target.display,
            "mode": "user",
            "sharded": True,
            "subscribed_channels": self.channels.subscribed,
            "slots_covered": None if slots is None else slots.covered,
            "reconnects": sum(int(n["reconnects"]) for n in nodes),
            "topology_refreshes": self._refreshes,
            "last_error": errors[0] if errors else self._last_error,
            "probe_interval_s": self._probe_interval,
            "nodes": nodes,
        }

    def _slot_count(self, address: Address) -> int:
        slots = self._slots
        if slots is None:
            return 0
        return sum(
            e - s + 1
            for s, e, o in zip(slots.starts, slots.ends, slots.owners, strict=True)
            if o == address
        )

    def _safe_error(self, exc: BaseException) -> str:
        return safe_error(self._target, exc)

    def _slot_dropped(self, where: Hashable, group: Hashable) -> None:
        """A node dropped a wanted channel by itself: it lost the slot."""
        if isinstance(group, int) and isinstance(where, tuple):
            self._dropped[group] = (where, trio.current_time())
        self._refresh.set()

    def _accepts(self, address: Address, slot: Hashable) -> bool:
        """Whether the link to ``address`` should subscribe ``slot``'s channels."""
        slots = self._slots
        if slots is None or not isinstance(slot, int) or slots.owner(slot) != address:
            return False
        held = self._dropped.get(slot)
        return held is None or held[0] != address or trio.current_time() - held[1] >= DROP_HOLD

    # -- running ---------------------------------------------------------------

    async def run(
        self,
        sink: trio.MemorySendChannel[Item],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep one link per master, following the topology, until
        cancelled. Reports started at once. Never raises but for
        cancellation: topology errors are retried with backoff, and so is
        anything unexpected, after ``on_error(exc)`` (a barrier, as each
        link's own loop is)."""
        task_status.started()
        attempt = 0
        async with trio.open_nursery() as links:
            while True:
                self._refresh = trio.Event()
                try:
                    slots = await self._discover()
                except Exception as exc:
                    if isinstance(exc, (*LINK_ERRORS, TopologyError)):
                        self._last_error = f"{type(exc).__name__}: {self._safe_error(exc)}"
                    else:
                        self._last_error = f"internal error: {type(exc).__name__}"
                        self._on_error(exc)
                    delay = backoff_delay(attempt, cap=self._reconnect_max)
                    attempt += 1
                    logger.warning(
                        "Redis Cluster topology unknown, retrying",
                        extra=fields(error=self._last_error, retry_in_s=round(delay, 3)),
                    )
                    await trio.sleep(delay)
                    continue
                attempt = 0
                self._last_error = None
                self._apply(slots, links, sink)
                degraded = self.status != "connected" or bool(self._dropped)
                with trio.move_on_after(REFRESH_WHILE_DEGRADED if degraded else math.inf):
                    await self._refresh.wait()

    async def _discover(self) -> SlotMap:
        """The current map, from the first node that answers. Raises the
        last node's error when none does."""
        error: BaseException | None = None
        # Try every known node within about the timeout, but give each a
        # fair chance even in a large cluster.
        per_node = min(self._timeout, max(self._timeout / max(1, len(self._known)), 0.5))
        for host, port in list(self._known):
            client = aioredis.Redis(
                host=host,
                port=port,
                password=self._target.password,
                **{
                    **client_options(self._timeout),
                    "socket_connect_timeout": per_node,
                    "socket_timeout": per_node,
                },
            )
            clients = Clients(client, None)  # before it connects (see Clients)
            try:
                with trio.fail_after(per_node * 2):
                    slots = await fetch_slots(client, (host, port))
            except (*LINK_ERRORS, TopologyError) as exc:
                error = exc
                continue
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(self._timeout):
                    await clients.aclose()
            if slots.covered == 0:
                error = TopologyError(f"{host}:{port} knows no slot owner")
                continue
            self._refreshes += 1
            self._known = list(dict.fromkeys([*slots.nodes, *self._known, *self._target.nodes]))
            return slots
        assert error is not None
        raise error

    def _apply(
        self, slots: SlotMap, nursery: trio.Nursery, sink: trio.MemorySendChannel[Item]
    ) -> None:
        """Links for the map's masters, and none for anything else."""
        old = self._slots
        self._slots = slots
        now = trio.current_time()
        self._dropped = {
            slot: (node, when)
            for slot, (node, when) in self._dropped.items()
            if slots.owner(slot) == node and now - when < DROP_HOLD
        }
        masters = set(slots.masters)
        for address in [a for a in self._links if a not in masters]:
            logger.info(
                "Redis Cluster node no longer a master, link stopped",
                extra=fields(node=f"{address[0]}:{address[1]}"),
            )
            self._links.pop(address).scope.cancel()
        for address in slots.masters:
            if address not in self._links:
                self._start(address, nursery, sink)
        if old != slots:
            logger.info(
                "Redis Cluster topology",
                extra=fields(
                    masters=",".join(f"{h}:{p}" for h, p in slots.masters),
                    slots_covered=slots.covered,
                ),
            )
        self._update_status()
        self.channels.wake()  # slots may have changed hands

    def _start(
        self, address: Address, nursery: trio.Nursery, sink: trio.MemorySendChannel[Item]
    ) -> None:
        host, port = address
        auth = f":{quote(self._target.password, safe='')}@" if self._target.password else ""
        self._serial += 1

        def failed() -> None:
            self._on_reconnect()
            self._refresh.set()

        broker = RedisBroker(
            f"redis://{auth}{host}:{port}/0",
            ShardedLink(self.channels, address=address, accept=partial(self._accepts, address)),
            timeout=self._timeout,
            reconnect_max=self._reconnect_max,
            probe_interval=self._probe_interval,
            on_reconnect=failed,
            on_drop=self._on_drop,
            on_error=self._on_error,
            node_id=f"{self.node_id}.{self._serial}",
            **self._link_options,
        )
        scope = trio.CancelScope()
        self._links[address] = _Link(broker, scope)

        async def follow() -> None:
            async for _ in broker.status_value.eventual_values():
                self._update_status()

        async def run() -> None:
            with scope:
                async with trio.open_nursery() as link:
                    link.start_soon(follow)
                    await broker.run(sink)

        nursery.start_soon(run)

    # -- publishing ------------------------------------------------------------

    async def publish(self, channel: bytes, data: bytes) -> int:
        """``SPUBLISH`` to the node owning ``channel``'s slot (see
        :class:`PublishClient`)."""
        return await self._publisher.publish(channel, data)

    async def aclose(self) -> None:
        await self._publisher.aclose()
