"""The gateway's per-token ITL histogram exposes what prometheus_client's own would."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from breakwater.gateway.histogram import LoopHistogram
from breakwater.gateway.metrics import LATENCY_BUCKETS


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text exposition without the ``_created`` series (a time, which only the library's has)."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_it_reads_as_prometheus_clients_histogram_for_the_same_observations() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = LoopHistogram("bw_itl_seconds", "ITL", ["model"], LATENCY_BUCKETS, ours)
    reference = Histogram("bw_itl_seconds", "ITL", ["model"], buckets=LATENCY_BUCKETS, registry=theirs)
    rng = random.Random(7)
    values = [rng.choice((0.0, 0.001, 0.0025, 60.0, 61.0, 1e-9)) for _ in range(50)]  # on the bounds
    values += [rng.expovariate(5.0) for _ in range(2000)]
    for i, value in enumerate(values):
        model = ("a", "b")[i % 2]
        fast.labels(model).observe(value)
        reference.labels(model).observe(value)
    assert exposition(ours) == exposition(theirs)
    assert 'bw_itl_seconds_bucket{le="+Inf",model="a"} 1025.0' in exposition(ours)


def test_a_scrape_from_another_thread_reads_consistent_buckets() -> None:
    registry = CollectorRegistry()
    child = LoopHistogram("h_seconds", "h", ["model"], (0.1, 1.0), registry).labels("m")
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            child.observe(0.05)

    writer = threading.Thread(target=observe)
    writer.start()
    try:
        for _ in range(200):
            samples = {
                s.labels.get("le"): s.value
                for family in registry.collect()
                for s in family.samples
                if s.name == "h_seconds_bucket"
            }
            assert samples["0.1"] <= samples["1.0"] <= samples["+Inf"]
    finally:
        stop.set()
        writer.join()


def test_label_values_must_match_the_label_names() -> None:
    histogram = LoopHistogram("x_seconds", "x", ["model"], (1.0,), CollectorRegistry())
    with pytest.raises(ValueError, match="takes 1 label"):
        histogram.labels("a", "b")
