"""The fleet's replay log in Redis: what every hub of a fleet appends and
reads, so that a tab resumes without loss on any hub (see
:mod:`smapws._core.fleet` for the ids and the entries).

Three operations, each one pipeline with a deadline:

- **append** (every routed message, batched by a task of its own, never in
  the router's way, at most one pipeline per :data:`APPEND_GATHER`, or per
  :data:`HURRY_GATHER` once a user's last tab on the hub closed): a
  script, called once for up to :data:`APPEND_PER_CALL` entries, that for
  each drops an id already in its log, pushes the entry, trims the list to
  ``SMAPWS_HISTORY_PER_USER`` entries and sets its expiry to
  ``SMAPWS_HISTORY_TTL``;
- **consult** (a hub's first message on a channel since it subscribed, or
  after its chain went stale): the headers of the log's last entries;
- **read** (a tab resumes with an id its hub does not hold): one user's
  log, its last ``SMAPWS_HISTORY_PER_USER`` entries.

A failure is counted (``websocket_fleet_log_errors_total{op}``) and logged
at most every 10 s; it never stops the hub. What it costs a resuming tab is a
``resync``, never a silent gap (:func:`smapws._core.fleet.chain_after`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import redis.exceptions
import trio

from smapws._core.fleet import (
    CONSULT_ENTRIES,
    HEADER_LEN,
    Header,
    LogEntry,
    decode_entry,
    decode_header,
    key_slot,
    log_key,
)
from smapws._io.brokers import BrokerError
from smapws._io.brokers.redis import PublishClient
from smapws._log import RateLimitedLog, fields
from smapws.metrics import Metrics

logger = logging.getLogger("smapws.fleetlog")

#: KEYS the logs; ARGV[1] max entries, ARGV[2] ttl ms, ARGV[2 + i] the entry
#: for KEYS[i] (its id and previous id are its first 32 bytes: see
#: :func:`smapws._core.fleet.encode_entry`). Returns each entry's status: 0
#: (the id was there), 1 (appended after its predecessor), 2 (appended, but
#: after another entry: this hub's chain is off the log's), or the error
#: Redis answered one with (the other entries are appended all the same).
#: One call per batch of entries rather than per entry: each call of its
#: own cost redis-py 9 arguments to pack and a reply to parse per message.
APPEND: Final = b"""
local keep = tonumber(ARGV[1])
local ttl = ARGV[2]
local function append(key, entry)
  local id = string.sub(entry, 1, 16)
  local prev = string.sub(entry, 17, 32)
  local tail = redis.call('LINDEX', key, -1)
  local status = 1
  if tail then
    local tid = string.sub(tail, 1, 16)
    if tid == id then return 0 end
    if tid ~= prev then
      local recent = redis.call('LRANGE', key, -keep, -2)
      for i = 1, #recent do
        if string.sub(recent[i], 1, 16) == id then return 0 end
      end
      status = 2
    end
  elseif prev ~= '----------------' then
    status = 2
  end
  redis.call('RPUSH', key, entry)
  redis.call('LTRIM', key, -keep, -1)
  redis.call('PEXPIRE', key, ttl)
  return status
end
local out = {}
for i = 1, #KEYS do
  local ok, status = pcall(append, KEYS[i], ARGV[i + 2])
  if ok then
    out[i] = status
  elseif type(status) == 'table' and status.err then
    out[i] = status
  else
    out[i] = redis.error_reply(tostring(status))
  end
end
return out
"""

#: KEYS[1] the log; ARGV how many. The headers of its last entries.
HEADERS: Final = (
    b"""
local r = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
for i = 1, #r do r[i] = string.sub(r[i], 1, %d) end
return r
"""
    % HEADER_LEN
)

_APPEND_SHA: Final = hashlib.sha1(APPEND).hexdigest()
_HEADERS_SHA: Final = hashlib.sha1(HEADERS).hexdigest()

#: Appends sent in one pipeline at most.
APPEND_BATCH: Final = 512
#: Entries in one call of the script at most (:data:`APPEND`): Redis runs a
#: call whole, so a backlog's pipeline of 512 keeps other clients waiting
#: between calls, never for all 512 at once (at ~200 B, 64 entries are about
#: 13 KB to pack and a few hundred microseconds of Redis).
APPEND_PER_CALL: Final = 64
#: Seconds at least between two append pipelines: what comes meanwhile
#: gathers for the next. Sending as soon as one was queued gave pipelines of
#: one or two appends (the router queues a batch's at a time): at 3,600
#: messages/s the hub spent about a quarter of its CPU on the pipelines'
#: system calls and redis-py's layers (py-spy on the soak's hub, issue 17);
#: this makes at most 100 pipelines a second. The first append after a quiet
#: spell goes at once (waiting then would only widen the moment when a hub
#: that joins asks the log before the entry is in it: see
#: docs/design/recovery.rst), and so does a whole batch already queued (a
#: backlog after Redis lagged: waiting would cap appends at 51,200 a second).
APPEND_GATHER: Final = 0.01
#: Seconds at least between two append pipelines once :meth:`FleetLog.hurry`
#: was called (a user's last tab on this hub closed: it may be resuming on
#: another hub, from the log). Not zero: when thousands of tabs close at once
#: under load, pipelines of one router batch each would cost a quarter of the
#: hub's CPU again (see APPEND_GATHER); at most 500 a second.
HURRY_GATHER: Final = 0.002
#: Resumes reading the log at once, at most (each reads up to
#: SMAPWS_HISTORY_PER_USER messages): a thousand tabs coming back from a
#: drain wait their turn instead of holding a thousand lists in memory.
#: Each may hold SMAPWS_HISTORY_PER_USER messages of SMAPWS_MAX_MESSAGE_BYTES
#: (6.5 MB for 100 x 60 KB progress), so 4: about 26 MB at worst, and tabs of
#: one user resuming together share one read (see FleetLog.read).
CONCURRENT_READS: Final = 4
#: The longest expiry given a log (ms): ~285,000 years. Redis refuses a
#: PEXPIRE past its 64-bit clock (from ``SMAPWS_HISTORY_TTL`` = 1e16 s),
#: and every append then failed: counted, but no tab could resume on
#: another hub.
MAX_TTL_MS: Final = 2**53
#: Seconds between two log lines about the same failing operation.
_LOG_EVERY: Final = 10.0

#: The script's statuses (:data:`APPEND`), as ``websocket_fleet_log_appends_total``'s results.
_APPEND_RESULTS: Final = ("duplicate", "written", "off_chain")


def _byte_strings(reply: Any) -> list[bytes]:
    """``reply`` if it is a list of byte strings, as LRANGE and the headers
    script answer; raises the error Redis answered, or
    :class:`redis.exceptions.InvalidResponse` for anything else (a server
    that is not Redis, a tampered link), which the decoders would meet as a
    TypeError or an AttributeError and the hub as a crash."""
    if isinstance(reply, Exception):
        raise reply
    if not isinstance(reply, list) or not all(e.__class__ is bytes for e in reply):
        raise redis.exceptions.InvalidResponse("not a list of byte strings")
    return reply


class _SharedRead:
    """One read of a log, awaited by every resume of its user meanwhile."""

    __slots__ = ("done", "entries")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.entries: list[LogEntry] | None = None


class FleetLog:
    """One hub's handle on the fleet log. ``on_off_chain(channel)`` is called
    when an append found this hub's chain for ``channel`` off the log's (it
    then asks the log again before its next message there)."""

    def __init__(
        self,
        client: PublishClient,
        *,
        ttl: float,
        per_user: int,
        metrics: Metrics,
        max_bytes: int,
        queue: int = 65536,
    ) -> None:
        self._client = client
        #: Bytes of entries queued at most (``SMAPWS_HISTORY_MAX_BYTES``):
        #: while Redis lags, ``queue`` entries of the largest message would
        #: be gigabytes.
        self._max_bytes = max_bytes
        self._queued = 0
        self._ttl_ms = min(max(1, int(ttl * 1000)), MAX_TTL_MS)
        self._per_user = per_user
        self._metrics = metrics
        #: ``websocket_fleet_log_appends_total``'s series, looked up once.
        appends = metrics.fleet_appends
        self._dropped = appends.labels("dropped")
        self._failed_appends = appends.labels("failed")
        self._results = tuple(appends.labels(result) for result in _APPEND_RESULTS)
        #: What waits to be sent, (channel, entry) oldest first, at most
        #: ``queue``; a plain deque (a trio channel cost each append its
        #: checks and statistics), and a lot :meth:`run` waits in while
        #: it is empty.
        self._pending: deque[tuple[bytes, bytes]] = deque()
        self._queue = queue
        self._arrived = trio.lowlevel.ParkingLot()
        #: Appends queued or in a pipeline not answered yet (:meth:`flush`):
        #: a plain count, and a lot :meth:`flush` waits in, woken after each
        #: pipeline (an observable value cost every append its observers' walk).
        self._outstanding = 0
        self._answered = trio.lowlevel.ParkingLot()
        #: :meth:`hurry` was called: the next pipeline gathers for
        #: HURRY_GATHER only.
        self._hurried = False
        self._hurry = trio.lowlevel.ParkingLot()
        self._readers = trio.CapacityLimiter(CONCURRENT_READS)
        #: Reads in flight, by channel: a second resume of the same user
        #: waits for the first one's answer instead of reading it again
        #: (one user's burst of tabs held one copy of its log each).
        self._reading: dict[bytes, _SharedRead] = {}
        self._log = RateLimitedLog(_LOG_EVERY)

    @property
    def outstanding(self) -> int:
        """Appends queued or in a pipeline not answered yet."""
        return self._outstanding

    def append_nowait(self, channel: bytes, entry: bytes) -> None:
        """Queue an append of ``entry`` (:func:`~smapws._core.fleet.encode_entry`)
        to ``channel``'s log; a full queue (``queue`` entries or
        ``max_bytes``) drops it (counted): the log then lacks a link, which
        resuming tabs see as a gap."""
        size = len(entry)
        pending = self._pending
        if self._queued + size > self._max_bytes or len(pending) >= self._queue:
            self._dropped.inc()
            return
        pending.append((channel, entry))
        self._queued += size
        self._outstanding += 1
        if len(pending) == 1:  # run() may be waiting for it
            self._arrived.unpark_all()

    def hurry(self) -> None:
        """Send what is queued after :data:`HURRY_GATHER` rather than
        :data:`APPEND_GATHER`. The hub calls it when a user's last tab here
        closes: that tab may be resuming on another hub, which reads the log
        for what it missed, and what this hub still holds back is not in it
        (the tab would miss it without being told; docs/design/recovery.rst)."""
        self._hurried = True
        self._hurry.unpark_all()

    async def flush(self) -> None:
        """Until every append queued so far has been answered (or failed):
        a hub that stops at the end of its drain sends what it routed last
        instead of dropping it (the caller bounds the wait)."""
        while self._outstanding:
            await self._answered.park()
        await trio.lowlevel.checkpoint()

    async def run(
        self,
        on_off_chain: Callable[[bytes], object],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send the queued appends, a pipeline at a time, until cancelled."""
        task_status.started()
        pending = self._pending
        sent_at = -math.inf
        while True:
            while not pending:
                await self._arrived.park()
            while len(pending) < APPEND_BATCH:
                gather = HURRY_GATHER if self._hurried else APPEND_GATHER
                wait = sent_at + gather - trio.current_time()
                if wait <= 0:
                    break
                with trio.move_on_after(wait):
                    await self._hurry.park()  # woken early by hurry(): again
            self._hurried = False
            sent_at = trio.current_time()
            batch = [pending.popleft() for _ in range(min(len(pending), APPEND_BATCH))]
            self._queued -= sum(len(entry) for _, entry in batch)
            calls = self._calls(batch)
            try:
                replies = await self._scripted("append", [command for command, _ in calls], APPEND)
            finally:
                self._outstanding -= len(batch)
                self._answered.unpark_all()
            if replies is None:
                self._failed_appends.inc(len(batch))
                continue
            self._count(calls, replies, on_off_chain)

    def _calls(self, batch: list[tuple[bytes, bytes]]) -> list[tuple[tuple[Any, ...], list[bytes]]]:
        """The script calls that append ``batch``, each with the channel of
        each of its entries. One call per :data:`APPEND_PER_CALL` entries;
        on a cluster, per slot as well (the keys of one call must share
        one: a user's entries of a batch do)."""
        head = ("EVALSHA", _APPEND_SHA)
        tail = (self._per_user, self._ttl_ms)
        if self._client.cluster:
            groups: dict[int, list[tuple[bytes, bytes]]] = {}
            for item in batch:
                key = log_key(item[0])
                groups.setdefault(key_slot(key), []).append(item)
            parts = [
                g[i : i + APPEND_PER_CALL]
                for g in groups.values()
                for i in range(0, len(g), APPEND_PER_CALL)
            ]
        else:
            parts = [batch[i : i + APPEND_PER_CALL] for i in range(0, len(batch), APPEND_PER_CALL)]
        calls = []
        for part in parts:
            channels = [channel for channel, _ in part]
            command = (
                *head,
                len(part),
                *[log_key(channel) for channel in channels],
                *tail,
                *[entry for _, entry in part],
            )
            calls.append((command, channels))
        return calls

    def _count(
        self,
        calls: list[tuple[tuple[Any, ...], list[bytes]]],
        replies: list[Any],
        on_off_chain: Callable[[bytes], object],
    ) -> None:
        """Count each entry's answer (``websocket_fleet_log_appends_total``),
        and tell ``on_off_chain`` the channels whose append was off chain."""
        tally = [0, 0, 0]
        failed = 0
        for (_, channels), reply in zip(calls, replies, strict=True):
            if not isinstance(reply, list) or len(reply) != len(channels):
                # The whole call: an error, or what the script never answers
                # (a server that is not Redis, a tampered link): not a crash
                # of the task (the zip below is strict).
                if not isinstance(reply, Exception):
                    reply = redis.exceptions.InvalidResponse("not one status per entry")
                failed += len(channels)
                self._failed("append", reply, len(channels))
                continue
            for channel, status in zip(channels, reply, strict=True):
                if status.__class__ is int and 0 <= status <= 2:
                    tally[status] += 1
                    if status == 2:
                        on_off_chain(channel)
                else:  # an error (a foreign key of the log's name, Redis out of memory)
                    failed += 1
                    if isinstance(status, Exception):
                        self._failed("append", status)
        for series, n in zip(self._results, tally, strict=True):
            if n:
                series.inc(n)
        if failed:
            self._failed_appends.inc(failed)

    async def consult(self, channels: Sequence[bytes]) -> dict[bytes, list[Header]] | None:
        """The headers of the last :data:`CONSULT_ENTRIES` entries of each
        channel's log (oldest first); None when Redis did not answer."""
        commands = [("EVALSHA", _HEADERS_SHA, 1, log_key(ch), CONSULT_ENTRIES) for ch in channels]
        replies = await self._scripted("consult", commands, HEADERS)
        if replies is None:
            return None
        out: dict[bytes, list[Header]] = {}
        for channel, reply in zip(channels, replies, strict=True):
            try:
                out[channel] = [decode_header(h) for h in _byte_strings(reply)]
            except (ValueError, redis.exceptions.RedisError) as exc:
                # Not ours (a WRONGTYPE key of that name, a foreign entry):
                # as if the log were empty, so the chain starts afresh.
                self._failed("consult", exc)
                out[channel] = []
        return out

    async def read(self, channel: bytes) -> list[LogEntry] | None:
        """The last ``per_user`` entries of ``channel``'s log (all of it, as
        this hub trims it), oldest first; None when Redis did not answer or
        the log is not one this hub can read. Bounded: a longer list (a hub
        with a larger ``SMAPWS_HISTORY_PER_USER``, a foreign writer) is
        never read whole, let alone decoded on the event loop."""
        shared = self._reading.get(channel)
        if shared is not None:  # another tab of this user is reading it: share
            await shared.done.wait()
            return shared.entries
        shared = self._reading[channel] = _SharedRead()
        try:
            shared.entries = await self._read(channel)
        finally:
            del self._reading[channel]
            shared.done.set()
        return shared.entries

    async def _read(self, channel: bytes) -> list[LogEntry] | None:
        key = log_key(channel)
        async with self._readers:
            replies = await self._commands("read", [("LRANGE", key, -self._per_user, -1)])
        if replies is None:
            return None
        reply = replies[0]
        try:
            return [decode_entry(e) for e in _byte_strings(reply)]
        except (ValueError, redis.exceptions.RedisError) as exc:
            self._failed("read", exc)
            return None

    async def _scripted(
        self, op: str, commands: list[tuple[Any, ...]], script: bytes
    ) -> list[Any] | None:
        """Run EVALSHA ``commands``; those a node answers NOSCRIPT (it never
        saw the script: a new or restarted Redis) go again as EVAL."""
        replies = await self._commands(op, commands)
        if replies is None:
            return None
        again = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
        if again:
            retry = [("EVAL", script, *commands[i][2:]) for i in again]
            second = await self._commands(op, retry)
            if second is None:
                return None
            for i, reply in zip(again, second, strict=True):
                replies[i] = reply
        return replies

    async def _commands(self, op: str, commands: list[tuple[Any, ...]]) -> list[Any] | None:
        try:
            return await self._client.pipeline(commands)
        except (BrokerError, trio.TooSlowError) as exc:
            self._failed(op, exc)
            return None

    def _failed(self, op: str, exc: BaseException, count: int = 1) -> None:
        self._metrics.fleet_errors.labels(op).inc(count)
        suppressed = self._log.allow(op, trio.current_time())
        if suppressed is not None:
            logger.warning(
                "fleet log operation failed",
                extra=fields(op=op, error=type(exc).__name__, suppressed_since_last=suppressed),
            )

    async def aclose(self) -> None:
        await self._client.aclose()
