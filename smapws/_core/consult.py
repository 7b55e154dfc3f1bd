"""A user's messages, held while the fleet's log is asked where they go; sans-IO.

A hub's first message of a user (since it subscribed, or after the user's
chain went stale) takes its place in the chain from the fleet's log
(docs/design/recovery.rst): the hub asks the log for the user's last
entries before it routes the message. That takes a round trip, and seconds
when Redis is slow. Waiting for it in the router held every other user's
delivery as well, and giving up after a second gave the message another id
on this hub than on the others. So that user's messages wait here, in the
order they came, while the rest of the batch goes on; the user's later
messages join them until the answer is in, and then they are routed, in
order, a chunk at a time.

:class:`Holding` is the bookkeeping alone: who waits for an answer, who has
one and is being routed, and the bound on what is held (the broker's queue
bound, of which this is the continuation). The shell asks the log and
routes; :class:`~smapws._core.router.Router` splits each batch with it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

from smapws._core.fleet import Header

#: A broker message: its channel and its data.
Item = tuple[bytes, bytes]


class Holding:
    """Messages held by user (see the module docstring), at most
    ``max_messages`` and ``max_bytes`` of data before :attr:`over` says so
    (the shell then gives up asking: :meth:`give_up`)."""

    __slots__ = (
        "_answers",
        "_held",
        "_ready",
        "_waiting",
        "bytes",
        "max_bytes",
        "max_messages",
        "messages",
    )

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        #: Messages and bytes of data held now.
        self.messages = 0
        self.bytes = 0
        #: user -> their messages not routed yet, oldest first.
        self._held: dict[str, deque[Item]] = {}
        #: The held users whose answer has not come.
        self._waiting: set[str] = set()
        #: The held users whose answer came (or who were given up on), in
        #: the order it came: :meth:`take` routes them.
        self._ready: deque[str] = deque()
        #: What the log answered of a ready user whose first message is not
        #: taken yet (absent: given up on, the hub places it alone).
        self._answers: dict[str, Sequence[Header]] = {}

    def __contains__(self, user: str) -> bool:
        """Whether ``user``'s messages are held (waiting or being routed):
        the user's next message must join them, or it would overtake them."""
        return user in self._held

    @property
    def waiting(self) -> int:
        """Users whose answer has not come."""
        return len(self._waiting)

    @property
    def ready(self) -> bool:
        """Whether :meth:`take` has messages to give."""
        return bool(self._ready)

    @property
    def over(self) -> bool:
        """Whether more is held than the bounds allow."""
        return self.messages > self.max_messages or self.bytes > self.max_bytes

    def wait(self, user: str, item: Item) -> None:
        """Hold ``item``, the first message of ``user``, whose answer is to be asked for."""
        self._held[user] = deque()
        self._waiting.add(user)
        self.hold(user, item)

    def hold(self, user: str, item: Item) -> None:
        """Hold ``item`` behind ``user``'s held messages (``user in self``)."""
        self._held[user].append(item)
        self.messages += 1
        self.bytes += len(item[1])

    def answer(self, answers: Mapping[str, Sequence[Header]]) -> None:
        """The log's last entries of each of these users (oldest first): their
        messages are ready to route, placed by it. Users no longer waiting
        (given up on meanwhile) are skipped."""
        for user, recent in answers.items():
            if user in self._waiting:
                self._waiting.discard(user)
                self._answers[user] = recent
                self._ready.append(user)

    def give_up(self, users: Sequence[str] | None = None) -> None:
        """No answer is coming for ``users`` (all who wait, by default):
        their messages are ready to route on this hub's own chain."""
        waiting = self._waiting
        for user in list(waiting) if users is None else users:
            if user in waiting:
                waiting.discard(user)
                self._ready.append(user)

    def take(self, n: int) -> tuple[list[Item], dict[str, Sequence[Header]]]:
        """Up to ``n`` ready messages, oldest first for each user, and the
        answers for the users whose first message is among them (to give
        the router before it routes them). A user stays held until their
        last message is taken; one whose messages fill a chunk goes behind
        the other ready users (whose messages keep coming must not keep
        theirs waiting)."""
        out: list[Item] = []
        answers: dict[str, Sequence[Header]] = {}
        ready, held = self._ready, self._held
        while ready and len(out) < n:
            user = ready[0]
            recent = self._answers.pop(user, None)
            if recent is not None:
                answers[user] = recent
            queue = held[user]
            while queue and len(out) < n:
                item = queue.popleft()
                out.append(item)
                self.bytes -= len(item[1])
            if not queue:
                del held[user]
                ready.popleft()
            else:  # the chunk is full: the next one starts with the next user
                ready.rotate(-1)
        self.messages -= len(out)
        return out, answers
