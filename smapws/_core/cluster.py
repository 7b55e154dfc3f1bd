"""Redis Cluster topology, sans-IO: who owns which hash slot.

:meth:`SlotMap.parse` reads the reply of ``CLUSTER SLOTS`` (Redis 3+, still
answered by 7.x), which lists, per slot range, the master first and then its
replicas, each as ``[host, port, node id, ...]``. A node that does not know
its own address answers an empty host (or ``?``); the address the question
was sent to stands in for it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Final

from smapws._errors import SmapwsError

#: Hash slots of a Redis Cluster.
SLOTS: Final = 16384

Address = tuple[str, int]


class TopologyError(SmapwsError, ValueError):
    """A ``CLUSTER SLOTS`` reply that cannot be read."""


@dataclass(frozen=True)
class SlotMap:
    """Slot ranges and their masters, sorted by first slot; and every node
    named (masters, then replicas, each once)."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    owners: tuple[Address, ...]
    nodes: tuple[Address, ...]

    @classmethod
    def parse(cls, reply: object, asked: Address) -> SlotMap:
        """Read a ``CLUSTER SLOTS`` reply (bytes or str fields). Raises
        :class:`TopologyError` for anything else."""
        if not isinstance(reply, list | tuple):
            raise TopologyError("CLUSTER SLOTS: expected an array")
        ranges: list[tuple[int, int, Address]] = []
        masters: list[Address] = []
        replicas: list[Address] = []
        for entry in reply:
            if not isinstance(entry, list | tuple) or len(entry) < 3:
                raise TopologyError("CLUSTER SLOTS: expected [start, end, master, ...]")
            start, end = _int(entry[0]), _int(entry[1])
            if not 0 <= start <= end < SLOTS:
                raise TopologyError(f"CLUSTER SLOTS: bad slot range {start}-{end}")
            master = _address(entry[2], asked)
            ranges.append((start, end, master))
            masters.append(master)
            replicas.extend(_address(node, asked) for node in entry[3:])
        ranges.sort()
        for (_, end, _), (start, _, _) in pairwise(ranges):
            if start <= end:
                raise TopologyError("CLUSTER SLOTS: overlapping slot ranges")
        nodes = tuple(dict.fromkeys([*masters, *replicas]))
        return cls(
            tuple(r[0] for r in ranges),
            tuple(r[1] for r in ranges),
            tuple(r[2] for r in ranges),
            nodes,
        )

    def owner(self, slot: int) -> Address | None:
        """The master serving ``slot``, or ``None`` when no node does."""
        i = bisect_right(self.starts, slot) - 1
        if i >= 0 and slot <= self.ends[i]:
            return self.owners[i]
        return None

    @property
    def masters(self) -> tuple[Address, ...]:
        """Every master that serves at least one slot, each once."""
        return tuple(dict.fromkeys(self.owners))

    @property
    def covered(self) -> int:
        """How many slots have a master."""
        return sum(e - s + 1 for s, e in zip(self.starts, self.ends, strict=True))


def _int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise TopologyError("CLUSTER SLOTS: expected an integer")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    raise TopologyError("CLUSTER SLOTS: expected a host name")


def _address(node: object, asked: Address) -> Address:
    if not isinstance(node, Sequence) or isinstance(node, bytes | str) or len(node) < 2:
        raise TopologyError("CLUSTER SLOTS: expected [host, port, ...]")
    host = _text(node[0])
    port = _int(node[1])
    if not 0 < port < 65536:
        raise TopologyError(f"CLUSTER SLOTS: bad port {port}")
    return (asked[0] if host in ("", "?") else host, port)
