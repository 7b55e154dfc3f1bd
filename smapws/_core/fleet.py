"""Chained message ids and the fleet's replay log, sans-IO.

**Ids.** A message's id commits to the id of the message before it on the
same channel, so that every hub that saw the same stream computes the same
ids, however long each has been subscribed::

    id(m) = hex(blake2b(id(previous) + "\\0" + channel + "\\0" + bytes)[:8])

with :data:`GENESIS` for the first message of a channel whose log is empty
(or has expired). Identical copies get different ids (their predecessors
differ), and a hub that has just joined learns ``id(previous)`` from the
fleet log in Redis (:func:`resolve`) instead of counting copies in a window
of its own, which made a hub that joined late number them differently.

**Log.** Each user's channel has one list in Redis, in the channel's cluster
slot (:func:`log_key`), of entries ``id | previous id | wall ms | bytes``
(:func:`encode_entry`). Every hub appends what it routes; the append script
drops an id already there, so each message is written once however many
hubs received it. A tab that resumes with an id its hub does not hold is
answered from the log (:func:`chain_after`): only a single unbroken chain
from that id to the log's end is replayed; a fork or a missing link (a hub
missed messages, an append failed) is a gap, and the tab gets ``resync``.

Nothing here reads a clock or a socket: ``now`` (monotonic) and wall times
are arguments.
"""

from __future__ import annotations

import binascii
import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Final, NamedTuple

#: The "previous id" of a channel's first message.
GENESIS: Final = "-" * 16
ID_LEN: Final = 16
#: Wall milliseconds, zero-padded: good until the year 2286.
_MS_LEN: Final = 13
_HEX: Final = frozenset("0123456789abcdef")
#: Bytes before the published message in a log entry.
HEADER_LEN: Final = 2 * ID_LEN + _MS_LEN

#: Seconds subtracted from the moment a hub (re)subscribed when it decides
#: whether a log entry can be the message it is looking at: entries appended
#: before that were published before it subscribed. The margin covers the
#: wall clocks of two hosts and the subscription's round trip; within it, two
#: identical consecutive copies of a message may be taken for one (the
#: README's "Message ids and recovery" states it).
SUBSCRIBE_MARGIN: Final = 1.0

#: Log entries a hub reads to place its first message of a channel.
CONSULT_ENTRIES: Final = 32


#: A fresh hash of the ids' parameters: copying it is cheaper than parsing
#: ``digest_size`` for every message.
_ID_HASH: Final = blake2b(digest_size=ID_LEN // 2)


def chain_id(channel: bytes, raw: bytes, prev: str) -> str:
    """The id of the message ``raw`` on ``channel`` that follows ``prev``."""
    h = _ID_HASH.copy()
    h.update(prev.encode("ascii") + b"\0" + channel + b"\0" + raw)
    return h.hexdigest()


def log_key(channel: bytes) -> bytes:
    """The Redis key of ``channel``'s log, in the channel's cluster slot
    (where sharded pub/sub publishes it).

    A channel without braces is the key's hash tag (``{channel}:smapws:log``).
    A user id with ``{`` or ``}`` cannot be inside a tag (the first ``}``
    would end it, or the channel's own tag would decide its slot), so its key
    is tagged with the shortest string that hashes to the channel's slot
    (:func:`slot_tag`), and names the channel after the tag."""
    if b"{" not in channel and b"}" not in channel:
        return b"{" + channel + b"}:smapws:log"
    return b"{" + slot_tag(key_slot(channel)) + b"}:smapws:log:" + channel


#: Redis Cluster's slot count (a key's slot is CRC16 of its tag, modulo this).
CLUSTER_SLOTS: Final = 16384
_TAG_ALPHABET: Final = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def key_slot(key: bytes) -> int:
    """Redis Cluster's slot for ``key`` (its hash tag rule, then CRC16 XMODEM)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % CLUSTER_SLOTS


def slot_tag(slot: int) -> bytes:
    """The first string, shortest first, of :data:`_TAG_ALPHABET` that hashes
    to ``slot``: the same on every hub. The table of all 16,384 is built in
    one pass the first time it is needed (~240,000 CRCs, a fraction of a
    second; only user ids with braces need it)."""
    return _slot_tags()[slot]


@functools.cache
def _slot_tags() -> tuple[bytes, ...]:
    tags: dict[int, bytes] = {}
    for length in itertools.count(1):
        for chars in itertools.product(_TAG_ALPHABET, repeat=length):
            tag = bytes(chars)
            tags.setdefault(binascii.crc_hqx(tag, 0) % CLUSTER_SLOTS, tag)
        if len(tags) == CLUSTER_SLOTS:
            return tuple(tags[i] for i in range(CLUSTER_SLOTS))
    raise AssertionError("unreachable")  # pragma: no cover


class Header(NamedTuple):
    mid: str
    prev: str
    wall_ms: int


class LogEntry(NamedTuple):
    mid: str
    prev: str
    wall_ms: int
    raw: bytes


_ms_cache: tuple[int, bytes] = (-1, b"")


def encode_entry(mid: str, prev: str, wall_ms: int, raw: bytes) -> bytes:
    global _ms_cache
    ms, field = _ms_cache
    if ms != wall_ms:  # (the router gives a whole batch one wall time)
        field = b"%013d" % wall_ms
        _ms_cache = (wall_ms, field)
    return (mid + prev).encode("ascii") + field + raw


def decode_header(data: bytes) -> Header:
    """Raises :class:`ValueError` for anything that is not an entry's header
    (a key written by someone else): an id that is not 16 lower-case hex
    characters (a previous id may be :data:`GENESIS`) would otherwise reach
    the browser as it stands, spliced into a frame."""
    if len(data) < HEADER_LEN:
        raise ValueError("short log entry")
    head = data[:HEADER_LEN].decode("ascii")
    mid, prev, ms = head[:ID_LEN], head[ID_LEN : 2 * ID_LEN], head[2 * ID_LEN :]
    if not _HEX.issuperset(mid) or (prev != GENESIS and not _HEX.issuperset(prev)):
        raise ValueError("bad log entry id")
    if not ms.isdigit():
        raise ValueError("bad log entry time")
    return Header(mid, prev, int(ms))


def decode_entry(data: bytes) -> LogEntry:
    h = decode_header(data)
    return LogEntry(h.mid, h.prev, h.wall_ms, data[HEADER_LEN:])


def resolve(channel: bytes, raw: bytes, recent: Sequence[Header], floor_ms: int) -> tuple[str, str]:
    """``(id, previous id)`` of a hub's first message on ``channel`` since
    it (re)subscribed, from the log's last entries ``recent`` (oldest first)
    and the wall time ``floor_ms`` before which nothing in the log can be
    this message. The earliest later entry that this message chains to is
    this message (another hub appended it first); else it follows the log's
    last entry; else it is the channel's first."""
    for h in recent:
        if h.wall_ms >= floor_ms and chain_id(channel, raw, h.prev) == h.mid:
            return h.mid, h.prev
    prev = recent[-1].mid if recent else GENESIS
    return chain_id(channel, raw, prev), prev


def chain_after(entries: Sequence[LogEntry], since: str) -> tuple[LogEntry, list[LogEntry]] | None:
    """The entry ``since`` in a user's log and what follows it, oldest
    first; None when the log cannot tell: ``since`` is not in it, or what
    follows is not one unbroken chain from it (a link is missing or the
    chain forks)."""
    start = None
    for i in range(len(entries) - 1, -1, -1):  # the newest, should ids recur
        if entries[i].mid == since:
            start = i
            break
    if start is None:
        return None
    out: list[LogEntry] = []
    expected = since
    for e in entries[start + 1 :]:
        if e.prev != expected:
            return None
        out.append(e)
        expected = e.mid
    return entries[start], out


def splice(
    fleet: Sequence[tuple[str, str]], since: str, local: Iterable[tuple[str, str]]
) -> list[int] | None:
    """Join what the log had after ``since`` (``fleet``: (id, previous id)
    pairs in order) with this hub's window of the user (``local``, in
    order): the indexes into ``local`` to replay after ``fleet``, or None
    when the two do not make one chain.

    The whole window, not only what was routed after the log was read: a
    message this hub routed before may not be in the log yet (its append is
    in flight, failed or was dropped), and the log's chain then ends early,
    unbroken. What ``local`` holds up to the last entry the log (or
    ``since``) has is behind the tab; each entry after it must follow the
    one before, the first following the log's last."""
    seen = {since, *(mid for mid, _ in fleet)}
    pairs = list(local)
    start = 0
    for i, (mid, _) in enumerate(pairs):
        if mid in seen:
            start = i + 1
    last = fleet[-1][0] if fleet else since
    keep: list[int] = []
    for i in range(start, len(pairs)):
        mid, prev = pairs[i]
        if prev != last:
            return None
        keep.append(i)
        last = mid
    return keep


@dataclass(slots=True)
class _Link:
    mid: str
    at: float


class Chains:
    """The last id of each channel's chain as this hub knows it.

    ``stale_after``: seconds after which a user's last id is no longer
    trusted (the log may have expired or moved on without this hub):
    :meth:`prev` answers None and the hub asks the log. ``None``: trusted
    until forgotten (a hub with no fleet log: the embedded broker)."""

    __slots__ = ("_floor", "_floors", "_links", "_stale_after")

    def __init__(self, stale_after: float | None, floor_wall: float) -> None:
        self._stale_after = stale_after
        self._links: dict[str, _Link] = {}
        self._floor = floor_wall
        self._floors: dict[str, float] = {}

    def prev(self, user: str, now: float) -> str | None:
        """The id the next message of ``user`` follows, or None when the hub
        must ask the log (with a fleet log) — without one, :data:`GENESIS`
        for a user it has not seen."""
        link = self._links.get(user)
        if link is None:
            return None if self._stale_after is not None else GENESIS
        if self._stale_after is not None and now - link.at > self._stale_after:
            return None
        return link.mid

    def last(self, user: str) -> str:
        """The last id of ``user``'s chain however old (:data:`GENESIS` when
        none): what a hub falls back on when the log does not answer."""
        link = self._links.get(user)
        return GENESIS if link is None else link.mid

    def advance(self, user: str, mid: str, now: float) -> bool:
        """``user``'s chain goes on with ``mid``; True when the table has
        one link more (the user had none)."""
        link = self._links.get(user)
        if link is None:
            self._links[user] = _Link(mid, now)
            return True
        link.mid, link.at = mid, now
        return False

    def floor_ms(self, user: str) -> int:
        """Wall ms before which no log entry of ``user`` can be a message
        this hub receives now (:func:`resolve`)."""
        return int((self._floors.get(user, self._floor) - SUBSCRIBE_MARGIN) * 1000)

    def reset_all(self, wall: float) -> None:
        """The subscription was down: every chain may have moved on."""
        self._links.clear()
        self._floors.clear()
        self._floor = wall

    def reset(self, user: str, wall: float) -> None:
        """``user``'s channel was (or is about to be) subscribed anew."""
        self._links.pop(user, None)
        self._floors[user] = wall

    def sweep(self, now: float, idle: float) -> None:
        """Forget the users idle for ``idle`` seconds (bounded memory)."""
        old = [u for u, link in self._links.items() if now - link.at > idle]
        for u in old:
            del self._links[u]
        if len(self._floors) > len(self._links):
            self._floors = {u: f for u, f in self._floors.items() if u in self._links}

    def trim(self, keep: Callable[[str], bool], limit: int) -> int:
        """Forget the oldest links (first seen first) of users ``keep``
        refuses until at most ``limit`` remain, or none is left to forget:
        bounded memory when messages go to many user ids nobody holds (a
        forgotten user's next message asks the log, or starts at
        :data:`GENESIS` without one). Returns how many were forgotten."""
        excess = len(self._links) - limit
        if excess <= 0:
            return 0
        drop = []
        for user in self._links:
            if not keep(user):
                drop.append(user)
                if len(drop) == excess:
                    break
        for user in drop:
            del self._links[user]
            self._floors.pop(user, None)
        return len(drop)

    def __len__(self) -> int:
        return len(self._links)
