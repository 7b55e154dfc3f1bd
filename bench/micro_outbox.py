"""What the delivery policy costs on the hot path, against a plain bounded queue.

Both queues are driven the way the router and the writers drive them (push one
message per connection reached, the writer takes everything queued), in the
same process and run, alternating rounds so that machine noise hits both.

    .venv/bin/python -m bench.micro_outbox
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

from smapws._core.envelope import Envelope, parse
from smapws._core.outbox import Outbox, OutboxLimits


class PlainOutbox:
    """The queue before the policy: FIFO, bounded by count and bytes."""

    __slots__ = ("_bytes", "_items", "_limits")

    def __init__(self, limits: OutboxLimits) -> None:
        self._limits = limits
        self._items: list[Envelope] = []
        self._bytes = 0

    def push(self, envelope: Envelope) -> bool:
        size = len(envelope.frame)
        if (
            len(self._items) >= self._limits.max_messages
            or self._bytes + size > self._limits.max_bytes
        ):
            return False
        self._items.append(envelope)
        self._bytes += size
        return True

    def take_all(self) -> list[Envelope]:
        items = self._items
        if items:
            self._items = []
            self._bytes = 0
        return items


def _messages(n: int) -> list[Envelope]:
    out = []
    for i in range(n):
        if i % 4 == 3:
            obj = {"type": "notification", "payload": {"title": "t", "message": "m" * 120}}
        else:
            obj = {
                "type": "project_progress",
                "payload": {"project_id": f"p{i % 3}", "status": "CRAWLING", "total": 1000,
                            "done": i, "errors": 0, "progress_percent": i / 10},
            }  # fmt: skip
        out.append(parse(json.dumps(obj).encode(), wall_time=0, received_at=0))
    return out


def _run(make: Callable[[], PlainOutbox | Outbox], msgs: list[Envelope], burst: int) -> float:
    """ns per message: push every message, the writer takes after ``burst``."""
    box = make()
    push = box.push
    take = box.take_all
    start = time.perf_counter_ns()
    for i, m in enumerate(msgs):
        push(m)
        if i % burst == burst - 1:
            take()
    take()
    return (time.perf_counter_ns() - start) / len(msgs)


def main() -> None:
    limits = OutboxLimits()
    msgs = _messages(200_000)
    print("scenario                         plain ns/msg  policy ns/msg  policy/plain")
    for name, burst in [
        ("keeps up (take after each)", 1),
        ("burst of 8 below high water", 8),
        ("stalled: 200 queued, conflating", 200),
    ]:
        plain, policy = [], []
        for _ in range(7):
            plain.append(_run(lambda: PlainOutbox(limits), msgs, burst))
            policy.append(_run(lambda: Outbox(limits), msgs, burst))
        p, q = statistics.median(plain), statistics.median(policy)
        print(f"{name:32} {p:12.1f}  {q:13.1f}  {q / p:12.2f}")


if __name__ == "__main__":
    main()
