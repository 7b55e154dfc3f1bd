"""Liveness probes: proving a subscription alive when Redis says nothing.

A half-open TCP link (peer gone, no RST) gives redis-py no error and no
message for as long as it lasts. So the subscribing connection also
``SUBSCRIBE``\\ s ``smapws:probe:<node id>``, and every ``probe_interval`` the
hub ``PUBLISH``\\ es a probe there (on a second connection of the same
client). A probe that has not come back through the subscription within one
``probe_interval`` of being sent, while nothing else came through either,
ends the session (:class:`ProbeLost`): a link that goes silent is dropped
within two intervals. A probe late behind a backlog of messages that are
still arriving is waited for (the link is slow, not dead; Redis's
output-buffer limit bounds that case)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import trio

from smapws._errors import SmapwsError

#: Channel namespace of the liveness probes; a node id is appended.
PROBE_CHANNEL_PREFIX: Final = "smapws:probe:"


class ProbeLost(SmapwsError):
    """A liveness probe did not come back through the subscription within
    its deadline: the link is considered dead (it may be half-open)."""


class Progress:
    """How many messages the pump has read; the pump counts, the prober
    compares (one integer increment per message)."""

    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages = 0


class ProbeTracker:
    """The trio side's view of the probes of one session.

    :meth:`seen` is called by the pump (asyncio side, same thread) with each
    message that arrives on the probe channel; the prober waits on
    :meth:`wait_answer`. Only the probe most recently sent counts: a late
    answer to an older one proves nothing about the link now."""

    def __init__(self, tag: str) -> None:
        self._tag = tag
        self._seq = 0
        self._expected: bytes | None = None
        self._answered = trio.Event()

    def next(self) -> bytes:
        """The payload of a new probe, which becomes the one awaited."""
        self._seq += 1
        self._expected = f"{self._tag}:{self._seq}".encode()
        self._answered = trio.Event()
        return self._expected

    def seen(self, data: bytes) -> None:
        """A message arrived on the probe channel."""
        if data == self._expected:
            self._answered.set()

    @property
    def answered(self) -> bool:
        return self._answered.is_set()

    async def wait_answer(self) -> None:
        """Until the probe last made by :meth:`next` has come back."""
        await self._answered.wait()


async def watch_probes(
    publish: Callable[[bytes], Awaitable[object]],
    tracker: ProbeTracker,
    *,
    interval: float,
    on_answer: Callable[[float], None],
    progress: Progress | None = None,
) -> NoReturn:
    """Prove a subscription alive, forever: every ``interval`` seconds
    ``publish`` a probe and wait for it to come back through the subscription.

    The rule: the link is dead when a probe has been outstanding for a whole
    ``interval`` during which nothing came through the subscription, neither
    the probe nor any message counted in ``progress``. While messages keep
    arriving (a backlog ahead of the probe, or a slow PUBLISH reply under
    load) the probe gets another interval; a publish cut short by its
    deadline is sent again with a new payload. ``on_answer(rtt)`` is called
    for each probe that came back.

    Raises :class:`ProbeLost` when the rule says so: a link that stops
    carrying bytes is given up between one and two intervals after it
    stopped. Errors of ``publish`` propagate. Time is read only through
    ``trio.current_time()``."""
    progress = progress or Progress()
    while True:
        sent_at = trio.current_time()
        deadline = sent_at + interval
        token = tracker.next()
        seen = progress.messages
        published = False
        while True:
            with trio.move_on_at(deadline):
                if not published:
                    await publish(token)
                    published = True
                await tracker.wait_answer()
            if tracker.answered:
                break
            if progress.messages == seen:
                what = "answered" if published else "published"
                raise ProbeLost(f"probe not {what} within {interval:g} s, and no message either")
            seen = progress.messages
            deadline += interval
            if not published:
                token = tracker.next()  # the cut-off publish may never have been sent
        on_answer(trio.current_time() - sent_at)
        await trio.sleep_until(sent_at + interval)
