"""The hot-path metric types expose what prometheus-client's own would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from smapws.metrics import LATENCY_BUCKETS, FastCounter, FastHistogram


@given(st.lists(st.floats(0, 5) | st.sampled_from(LATENCY_BUCKETS), max_size=50))
def test_fast_histogram_matches_prometheus(values: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("lat_seconds", "doc", LATENCY_BUCKETS)
    ours.register(fast)
    reference = Histogram("lat_seconds", "doc", buckets=LATENCY_BUCKETS, registry=theirs)
    for v in values:
        fast.observe(v)
        reference.observe(v)

    def samples(r: CollectorRegistry) -> list[str]:
        return [
            line
            for line in generate_latest(r).decode().splitlines()
            if "_created" not in line and "_sum" not in line
        ]

    assert samples(ours) == samples(theirs)
    assert ours.get_sample_value("lat_seconds_sum") == theirs.get_sample_value("lat_seconds_sum")


def test_fast_counter() -> None:
    registry = CollectorRegistry()
    counter = FastCounter("things", "doc")
    registry.register(counter)
    counter.inc()
    counter.inc(41)
    assert registry.get_sample_value("things_total") == 42
    reference = CollectorRegistry()
    Counter("things", "doc", registry=reference).inc(42)
    line = [x for x in generate_latest(reference).decode().splitlines() if "_created" not in x]
    assert [x for x in generate_latest(registry).decode().splitlines()] == line


def test_direct_writes_of_one_message_share_a_clock_reading_and_count_each_write() -> None:
    from smapws.metrics import SHARED_READING_MAX, DirectWrites

    registry = CollectorRegistry()
    sent = FastCounter("sent", "doc")
    latency = FastHistogram("lat_seconds", "doc", LATENCY_BUCKETS)
    registry.register(sent)
    registry.register(latency)
    readings: list[float] = []

    def clock() -> float:
        readings.append(10.0 + len(readings))  # 10.0, 11.0, 12.0, ...
        return readings[-1]

    writes = DirectWrites(sent, latency, clock)
    first, second = object(), object()
    for _ in range(3):  # one message to a user's three tabs
        writes.add(first, received_at=9.9992)
    writes.add(second, received_at=10.9998)
    # Read while the second message's write is still tallied: it is counted.
    assert registry.get_sample_value("sent_total") == 4
    assert registry.get_sample_value("lat_seconds_count") == 4
    bucket = {le: registry.get_sample_value("lat_seconds_bucket", {"le": le}) for le in
              ("0.00025", "0.0005", "0.001")}  # fmt: skip
    assert bucket == {"0.00025": 1, "0.0005": 1, "0.001": 4}  # cumulative
    assert registry.get_sample_value("lat_seconds_sum") == pytest.approx(3 * 0.0008 + 0.0002)
    assert len(readings) == 2  # one clock reading per message, not per write

    # A message written to very many sockets (a resync) re-reads the clock.
    for _ in range(SHARED_READING_MAX * 2 + 1):
        writes.add(first, received_at=0.0)
    writes.flush()
    assert len(readings) == 2 + 3
    assert registry.get_sample_value("sent_total") == 4 + SHARED_READING_MAX * 2 + 1
