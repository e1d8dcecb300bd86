"""Garbage-collector settings for the long-running serving processes.

Measured on the gateway with 3,000 open streams (`benchmarks/streams.py`): with CPython's defaults a
quarter of the process's CPU went to the cyclic collector, and each full collection paused the event
loop for ~200 ms (it scans every object, most of them the modules and app built at startup)."""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)


def settle_heap() -> None:
    """Call once startup is done: what exists now lives as long as the process, so it is moved out of
    the collector's reach (``gc.freeze``), and young collections run less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
