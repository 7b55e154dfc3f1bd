"""What the delivery metrics cost per direct write: one count and one latency
observation per write (a clock reading each), against :class:`DirectWrites`
(one clock reading per message, writes tallied), in one process, alternating
rounds so that machine noise hits both. Each message goes to two tabs, as in
the W1 workload.

    .venv/bin/python -m bench.micro_metrics
"""

from __future__ import annotations

import statistics
import time

import trio

from smapws.metrics import Metrics

TABS = 2
MESSAGES = 2000


async def main() -> None:
    metrics = Metrics()
    messages = [object() for _ in range(MESSAGES)]
    sent, latency, direct = metrics.messages_sent, metrics.delivery_latency, metrics.direct_writes

    def per_write() -> None:
        for _ in messages:
            for _ in range(TABS):
                sent.inc()
                latency.observe(trio.current_time() - 1.0)

    def tallied() -> None:
        for message in messages:
            for _ in range(TABS):
                direct.add(message, 1.0)

    results: dict[str, list[float]] = {"per write": [], "DirectWrites": []}
    for _ in range(15):
        for name, run in (("per write", per_write), ("DirectWrites", tallied)):
            start = time.perf_counter_ns()
            run()
            results[name].append((time.perf_counter_ns() - start) / (MESSAGES * TABS))
    base = statistics.median(results["per write"])
    for name, values in results.items():
        ns = statistics.median(values)
        print(f"{name:14} {ns:8.1f} ns per delivery  {ns / base:5.2f}x")


if __name__ == "__main__":
    trio.run(main)
