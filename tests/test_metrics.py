"""The hot-path metric types expose what prometheus-client's own would."""

from __future__ import annotations

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
