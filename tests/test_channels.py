"""User mode's trio side (smapws._io.brokers.channels) under MockClock: the
send loop, the linger's timing, waiters, gaps. No Redis: ``send`` records
what a link would send, and confirmations are fed by hand."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

from smapws._io.brokers.channels import EXPIRY_WINDOW, UserChannels

Batch = list[tuple[str, tuple[bytes, ...]]]


class Link:
    """Runs ``send_commands`` and records each send with its virtual time."""

    def __init__(self, channels: UserChannels) -> None:
        self.channels = channels
        self.sent: list[tuple[float, Batch]] = []

    async def send(self, batch: Batch) -> None:
        self.sent.append((trio.current_time(), batch))

    async def run(self, nursery: trio.Nursery, **kwargs: Any) -> None:
        nursery.start_soon(
            partial(self.channels.send_commands, self.send, send_timeout=1, **kwargs)
        )
        await trio.testing.wait_all_tasks_blocked()


async def test_linger_expires_on_time_and_commands_wait_for_changes(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    forgotten: list[bytes] = []
    channels = UserChannels(b"p:", reason="r", linger=5.0, on_forget=forgotten.append)
    link = Link(channels)
    await link.run(nursery)
    start = trio.current_time()
    channels.acquire("u")
    channels.acquire("v")
    await trio.testing.wait_all_tasks_blocked()
    ((at, batch),) = link.sent
    assert at == start and sorted(batch[0][1]) == [b"p:u", b"p:v"] and batch[0][0] == "subscribe"
    for ch in (b"p:u", b"p:v"):
        channels.confirmed("subscribe", ch)
    assert channels.subscribed == 2
    await trio.sleep(1.0)
    channels.release("u")
    await trio.sleep(0.5)
    channels.release("v")  # due half a second later: not gathered with u
    await trio.sleep(4.5 + EXPIRY_WINDOW - 0.001)
    assert len(link.sent) == 1  # still lingering (plus the gathering window)
    await trio.sleep(0.001)
    await trio.testing.wait_all_tasks_blocked()
    unsubscribe_u = (pytest.approx(start + 6.0 + EXPIRY_WINDOW), [("unsubscribe", (b"p:u",))])
    assert link.sent[-1] == unsubscribe_u
    await trio.sleep(1)
    unsubscribe_v = (pytest.approx(start + 6.5 + EXPIRY_WINDOW), [("unsubscribe", (b"p:v",))])
    assert link.sent[-1] == unsubscribe_v
    channels.confirmed("unsubscribe", b"p:u")
    assert forgotten == [b"p:u"] and channels.subscribed == 1


async def test_releases_of_one_moment_leave_in_one_command(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    channels = UserChannels(b"p:", reason="r", linger=5.0)
    link = Link(channels)
    await link.run(nursery)
    users = [f"u{i}" for i in range(100)]
    for user in users:
        channels.acquire(user)
    await trio.testing.wait_all_tasks_blocked()
    for user in users:
        channels.confirmed("subscribe", channels.channel(user))
    for i, user in enumerate(users):  # released over 50 ms
        channels.release(user)
        if i % 10 == 0:
            await trio.sleep(0.005)
    await trio.sleep(10)
    verbs = [(verb, len(chans)) for _, batch in link.sent for verb, chans in batch]
    assert verbs == [("subscribe", 100), ("unsubscribe", 100)]


async def test_waiters_are_woken_by_their_confirmation_or_their_link_loss(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    channels = UserChannels(b"p:", reason="r")
    channels.acquire("u")
    # A wait cut short leaves nothing behind: it did wait (no confirmation
    # yet), counted while it did, and nothing is left once it is cut.
    async with trio.open_nursery() as cutting:
        cut = trio.CancelScope()

        async def cut_short() -> None:
            with cut:
                await channels.wait_subscribed("u")

        cutting.start_soon(cut_short)
        await trio.testing.wait_all_tasks_blocked()
        assert channels._waiting == {b"p:u": 1}
        cut.cancel()
    assert cut.cancelled_caught
    assert channels._waiters == {} and channels._waiting == {}

    results: list[bool] = []

    async def wait() -> None:
        results.append(await channels.wait_subscribed("u"))

    async with trio.open_nursery() as waiters:
        waiters.start_soon(wait)
        waiters.start_soon(wait)
        await trio.sleep(1)
        channels.core.take()
        channels.confirmed("subscribe", b"p:u")
    assert results == [True, True]
    assert await channels.wait_subscribed("u") is True  # at once now

    channels.acquire("w")
    channels.core.take(where="a")
    async with trio.open_nursery() as waiters:
        waiters.start_soon(partial(channels.wait_subscribed, "w"))
        await trio.sleep(1)
        channels.lost("b")  # another link: still waiting
        await trio.sleep(1)
        assert channels._waiting == {b"p:w": 1}
        channels.lost("a")
    assert channels._waiters == {}


async def test_a_gap_is_told_once_with_its_length(
    autojump_clock: trio.testing.MockClock,
) -> None:
    told: list[tuple[str, float, bytes]] = []
    channels = UserChannels(
        b"p:", reason="subscriber_reconnected", on_resync=lambda *a: told.append(a)
    )
    channels.acquire("u")
    channels.core.take()
    channels.confirmed("subscribe", b"p:u")
    assert told == []
    channels.lost()
    await trio.sleep(2.5)
    channels.core.take()
    channels.confirmed("subscribe", b"p:u")
    assert told == [("subscriber_reconnected", 2.5, b"p:u")]
    channels.confirmed("subscribe", b"p:u")  # a repeated confirmation: no news
    assert len(told) == 1


async def test_a_send_that_hangs_fails_the_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channels = UserChannels(b"p:", reason="r")

    async def hang(batch: Batch) -> None:
        await trio.sleep_forever()

    channels.acquire("u")
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await channels.send_commands(hang, send_timeout=2.0)
    assert trio.current_time() - start == 2.0
