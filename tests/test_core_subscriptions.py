"""The per-user subscription bookkeeping (smapws._core.subscriptions), sans-IO.

A tiny model of Redis stands in for the server: each link has an ordered
queue of commands in flight; delivering one applies it and produces one
confirmation per channel, in order, as Redis does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from smapws._core.subscriptions import (
    DROPPED,
    ENDED,
    NOTHING,
    READY,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Command,
    Subscriptions,
)

LINGER = 5.0


class FakeRedis:
    """Links to a server that applies commands in order and answers each
    channel of a command with one confirmation."""

    def __init__(self) -> None:
        self.subscribed: dict[Hashable, set[bytes]] = {}
        self.queue: dict[Hashable, deque[Command]] = {}
        self.commands: list[tuple[Hashable, Command]] = []

    def send(self, where: Hashable, commands: list[Command]) -> None:
        for cmd in commands:
            self.commands.append((where, cmd))
            self.queue.setdefault(where, deque()).append(cmd)

    def deliver(self, subs: Subscriptions, where: Hashable, now: float) -> list[tuple[bytes, str]]:
        """Apply the oldest command in flight on ``where``; feed its
        confirmations to ``subs``; return (channel, outcome) pairs."""
        cmd = self.queue[where].popleft()
        server = self.subscribed.setdefault(where, set())
        out = []
        for channel in cmd.channels:
            if cmd.verb == SUBSCRIBE:
                server.add(channel)
            else:
                server.discard(channel)
            result = subs.confirm(channel, cmd.verb == SUBSCRIBE, now, where)
            out.append((channel, result.outcome))
        return out

    def deliver_all(self, subs: Subscriptions, now: float) -> None:
        for where in list(self.queue):
            while self.queue[where]:
                self.deliver(subs, where, now)

    def drop_link(self, subs: Subscriptions, where: Hashable, now: float) -> list[bytes]:
        self.queue.pop(where, None)
        self.subscribed.pop(where, None)
        return subs.lost(now, where)

    def all_subscribed(self) -> set[bytes]:
        return set().union(*self.subscribed.values()) if self.subscribed else set()


def settle(subs: Subscriptions, server: FakeRedis, now: float, where: Hashable = None) -> None:
    """Send and deliver until there is nothing left to do."""
    for _ in range(10):
        server.send(where, subs.take(where))
        server.deliver_all(subs, now)
        if not subs.pending:
            return
    raise AssertionError("did not settle")


def test_first_holder_subscribes_last_unsubscribes_after_the_linger() -> None:
    subs = Subscriptions(linger=LINGER)
    assert subs.acquire(b"u:1") is True
    assert subs.acquire(b"u:1") is False  # a second tab: nothing to send
    assert subs.take() == [Command(SUBSCRIBE, 0, (b"u:1",))]
    assert not subs.is_subscribed(b"u:1")  # asked, not confirmed
    assert subs.confirm(b"u:1", True, 0.0).outcome == READY
    assert subs.is_subscribed(b"u:1") and subs.subscribed == 1
    subs.release(b"u:1", now=10.0)
    subs.release(b"u:1", now=11.0)
    assert subs.next_expiry() == 11.0 + LINGER
    assert not subs.expire(11.0 + LINGER - 0.001)
    assert subs.take() == []  # still wanted while it lingers
    assert subs.expire(11.0 + LINGER)
    assert subs.take() == [Command(UNSUBSCRIBE, 0, (b"u:1",))]
    assert subs.confirm(b"u:1", False, 17.0).outcome == ENDED
    assert len(subs) == 0 and subs.subscribed == 0 and subs.next_expiry() is None


def test_a_reload_within_the_linger_costs_no_command() -> None:
    subs, server = Subscriptions(linger=LINGER), FakeRedis()
    subs.acquire(b"u:1")
    settle(subs, server, 0.0)
    sent = len(server.commands)
    subs.release(b"u:1", now=1.0)  # the tab closes...
    assert subs.acquire(b"u:1") is False  # ...and comes back 0.4 s later
    subs.expire(1.4 + LINGER)
    settle(subs, server, 1.4 + LINGER)
    assert len(server.commands) == sent
    assert subs.is_subscribed(b"u:1")


def test_open_and_close_before_the_subscribe_is_sent_cost_nothing() -> None:
    subs = Subscriptions(linger=0.0)
    subs.acquire(b"u:1")
    subs.release(b"u:1", now=0.0)
    subs.expire(0.0)
    assert subs.take() == []
    assert len(subs) == 0


def test_commands_are_batched_per_group_and_bounded() -> None:
    subs = Subscriptions(linger=LINGER, batch=3, group=lambda ch: ch[-1] % 2)
    channels = [b"u:%d" % i for i in range(10)]
    for ch in channels:
        subs.acquire(ch)
    cmds = subs.take()
    assert all(len(c.channels) <= 3 for c in cmds)
    for c in cmds:
        assert {ch[-1] % 2 for ch in c.channels} == {c.group}
    assert sorted(ch for c in cmds for ch in c.channels) == sorted(channels)
    assert len(cmds) == 4  # 5 channels per group: 3 + 2, twice
    assert subs.take() == []  # all in flight


def test_reacquired_while_its_unsubscribe_is_in_flight() -> None:
    subs, server = Subscriptions(linger=0.0), FakeRedis()
    subs.acquire(b"u:1")
    settle(subs, server, 0.0)
    subs.release(b"u:1", now=1.0)
    subs.expire(1.0)
    server.send(None, subs.take())  # UNSUBSCRIBE on its way
    subs.acquire(b"u:1")
    assert not subs.is_subscribed(b"u:1")
    assert subs.take() == []  # one command in flight per channel
    assert server.deliver(subs, None, 1.1) == [(b"u:1", NOTHING)]
    assert subs.take() == [Command(SUBSCRIBE, 0, (b"u:1",))]
    server.send(None, [Command(SUBSCRIBE, 0, (b"u:1",))])
    assert server.deliver(subs, None, 1.2) == [(b"u:1", READY)]
    assert server.all_subscribed() == {b"u:1"}


def test_a_lost_link_resubscribes_and_reports_the_gap() -> None:
    subs, server = Subscriptions(linger=LINGER), FakeRedis()
    for ch in (b"u:1", b"u:2"):
        subs.acquire(ch)
    subs.acquire(b"u:gone")
    settle(subs, server, 0.0)
    subs.release(b"u:gone", now=1.0)
    subs.expire(1.0 + LINGER)  # unwanted, its UNSUBSCRIBE not sent yet
    forgotten = server.drop_link(subs, None, now=10.0)
    assert forgotten == [b"u:gone"]
    assert subs.subscribed == 0 and not subs.is_subscribed(b"u:1")
    cmds = subs.take()
    assert cmds == [Command(SUBSCRIBE, 0, (b"u:1", b"u:2"))] or cmds == [
        Command(SUBSCRIBE, 0, (b"u:2", b"u:1"))
    ]
    server.send(None, cmds)
    confirmations = {}
    for ch in cmds[0].channels:
        confirmations[ch] = subs.confirm(ch, True, 12.5)
    assert {c.outcome for c in confirmations.values()} == {READY}
    assert {c.gap_s for c in confirmations.values()} == {2.5}
    # The gap is reported once.
    subs.lost(13.0)
    subs.take()
    assert subs.confirm(b"u:1", True, 13.5).gap_s == 0.5


def test_a_holder_that_started_before_the_confirmation_is_in_a_gap() -> None:
    subs = Subscriptions(linger=LINGER)
    subs.acquire(b"u:1")
    subs.mark_gap(b"u:1", now=2.0)
    subs.take()
    assert subs.confirm(b"u:1", True, 2.25).gap_s == 0.25
    subs.mark_gap(b"u:1", now=3.0)  # subscribed: no gap
    subs.release(b"u:1", 3.0)
    subs.acquire(b"u:1")
    assert subs.confirm(b"u:1", True, 4.0).gap_s is None


def test_a_server_pushed_unsubscribe_is_a_drop_with_a_gap() -> None:
    """Redis Cluster pushes ``sunsubscribe`` when a slot moves away."""
    subs = Subscriptions(linger=LINGER, group=lambda ch: 7)
    subs.acquire(b"u:1")
    subs.take(where="node-a")
    assert subs.confirm(b"u:1", True, 0.0, "node-a").outcome == READY
    assert subs.confirm(b"u:1", False, 1.0, "node-a").outcome == DROPPED
    assert not subs.is_subscribed(b"u:1")
    assert subs.take(where="node-a", accept=lambda slot: False) == []  # not its slot any more
    (cmd,) = subs.take(where="node-b", accept=lambda slot: slot == 7)
    assert cmd == Command(SUBSCRIBE, 7, (b"u:1",))
    assert subs.confirm(b"u:1", True, 1.5, "node-b").gap_s == 0.5
    # An unsubscribe from a link it is no longer on changes nothing.
    assert subs.confirm(b"u:1", False, 2.0, "node-a").outcome == NOTHING
    assert subs.is_subscribed(b"u:1") and subs.where(b"u:1") == "node-b"


def test_unsubscribe_goes_to_the_link_that_holds_it() -> None:
    subs = Subscriptions(linger=0.0)
    subs.acquire(b"u:1")
    subs.take(where="a")
    subs.confirm(b"u:1", True, 0.0, "a")
    subs.release(b"u:1", now=0.0)
    subs.expire(0.0)
    assert subs.take(where="b") == []
    assert subs.take(where="a") == [Command(UNSUBSCRIBE, 0, (b"u:1",))]


def test_unknown_confirmations_and_bad_arguments() -> None:
    subs = Subscriptions(linger=1.0)
    assert subs.confirm(b"nobody", True, 0.0).outcome == NOTHING
    subs.mark_gap(b"nobody", 0.0)
    assert len(subs) == 0
    with pytest.raises(ValueError):
        Subscriptions(linger=1.0, batch=0)
    subs.acquire(b"u:1")
    subs.release(b"u:1", 0.0)
    with pytest.raises(AssertionError):
        subs.release(b"u:1", 0.0)


# -- property: any interleaving ends with the server holding the wanted set ---

CHANNELS = [b"u:%d" % i for i in range(6)]
LINKS = ["a", "b"]


def _group(channel: bytes) -> Hashable:
    return channel[-1] % 3


class SubscriptionMachine(RuleBasedStateMachine):
    """Tabs open and close, time passes, links send, deliver and die, in any
    order; two links share the groups (as two cluster nodes share slots)."""

    def __init__(self) -> None:
        super().__init__()
        self.subs = Subscriptions(linger=LINGER, batch=2, group=_group)
        self.server = FakeRedis()
        self.now = 0.0
        self.holders: dict[bytes, int] = {}
        #: Which link owns which group (as a cluster slot map would say).
        self.owner: dict[Hashable, str] = {0: "a", 1: "a", 2: "b"}
        self.ready_since: dict[bytes, float] = {}

    def _accept(self, link: str) -> object:
        return lambda group: self.owner[group] == link

    @rule(channel=st.sampled_from(CHANNELS))
    def open_tab(self, channel: bytes) -> None:
        self.subs.acquire(channel)
        self.holders[channel] = self.holders.get(channel, 0) + 1

    @precondition(lambda self: any(self.holders.values()))
    @rule(data=st.data())
    def close_tab(self, data: st.DataObject) -> None:
        held = sorted(ch for ch, n in self.holders.items() if n)
        channel = data.draw(st.sampled_from(held))
        self.subs.release(channel, self.now)
        self.holders[channel] -= 1

    @rule(dt=st.sampled_from([0.1, 1.0, LINGER, 2 * LINGER]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.subs.expire(self.now)

    @rule(link=st.sampled_from(LINKS))
    def send(self, link: str) -> None:
        cmds = self.subs.take(link, self._accept(link))
        for cmd in cmds:
            assert len(cmd.channels) <= 2
            assert all(_group(ch) == cmd.group for ch in cmd.channels)
            if cmd.verb == UNSUBSCRIBE:
                # Never unsubscribe a channel that a tab holds.
                assert not any(self.holders.get(ch) for ch in cmd.channels)
            else:
                assert all(self.owner[cmd.group] == link for _ in cmd.channels)
        self.server.send(link, cmds)

    @rule(link=st.sampled_from(LINKS))
    def deliver(self, link: str) -> None:
        if self.server.queue.get(link):
            for channel, outcome in self.server.deliver(self.subs, link, self.now):
                if outcome == READY:
                    assert channel in self.server.subscribed[link]

    @rule(link=st.sampled_from(LINKS))
    def link_lost(self, link: str) -> None:
        self.server.drop_link(self.subs, link, self.now)

    @rule(group=st.sampled_from([0, 1, 2]))
    def slot_moves(self, group: Hashable) -> None:
        """The group changes owner; the old one pushes unsubscribes for its
        channels of that group (as Redis Cluster does)."""
        old = self.owner[group]
        new = "b" if old == "a" else "a"
        self.owner[group] = new
        server = self.server.subscribed.get(old, set())
        for channel in sorted(ch for ch in server if _group(ch) == group):
            server.discard(channel)
            self.subs.confirm(channel, False, self.now, old)

    @invariant()
    def subscribed_means_the_server_has_it(self) -> None:
        for channel in CHANNELS:
            if self.subs.is_subscribed(channel):
                where = self.subs.where(channel)
                assert channel in self.server.subscribed.get(where, set())
                queued = self.server.queue.get(where, ())
                assert not any(channel in cmd.channels for cmd in queued)
        assert self.subs.subscribed <= sum(len(s) for s in self.server.subscribed.values())

    @invariant()
    def holders_are_wanted(self) -> None:
        for channel, n in self.holders.items():
            if n:
                assert self.subs.is_wanted(channel)

    def teardown(self) -> None:
        """Settle everything: the server ends with exactly the wanted set."""
        for _ in range(20):
            for link in LINKS:
                self.server.send(link, self.subs.take(link, self._accept(link)))
            self.server.deliver_all(self.subs, self.now)
            if not self.subs.pending:
                break
        wanted = {ch for ch in CHANNELS if self.subs.is_wanted(ch)}
        assert self.server.all_subscribed() == wanted
        assert self.subs.subscribed == len(wanted)
        assert all(self.subs.is_subscribed(ch) for ch in wanted)
        # Once nothing is held and the linger has passed, nothing is left.
        for channel, n in self.holders.items():
            for _ in range(n):
                self.subs.release(channel, self.now)
        self.now += LINGER
        self.subs.expire(self.now)
        for _ in range(20):
            for link in LINKS:
                self.server.send(link, self.subs.take(link, self._accept(link)))
            self.server.deliver_all(self.subs, self.now)
        assert self.server.all_subscribed() == set()
        assert len(self.subs) == 0 and self.subs.subscribed == 0


SubscriptionMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None
)
test_any_interleaving_converges = SubscriptionMachine.TestCase
