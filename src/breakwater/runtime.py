"""Garbage-collector settings for the long-running serving processes.

Measured on the gateway with 3,000 open streams (`benchmarks/streams.py`): with CPython's defaults a
quarter of the process's CPU went to the cyclic collector, and each full collection paused the event
loop for ~200 ms (it scans every object, most of them the modules and app built at startup).

At 10,000 open streams (~1.1 million tracked objects, ~110 per stream, nearly none in a cycle: a
collection frees almost nothing) the generations' default sizes still cost latency: with a young
collection every 10,000 allocations and CPython's 10 of them per middle one, each middle collection
scanned up to 100,000 objects (20-47 ms of stalled event loop, a dozen times a minute), and a full
one came whenever the old generation had grown by a quarter (420 ms, during the ramp). A middle
collection now follows every 2 young ones (~8-13 ms stalls, every ~0.75 s: more of them, the same
work), and a full one is considered only after 5,000 middle ones (~100 million allocations: minutes
under load), so cyclic garbage that has lived long enough to be old waits that long to be freed."""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)
MIDDLE_THRESHOLD = 2  # young collections per middle one (default 10)
OLD_THRESHOLD = 5_000  # middle collections before a full one is considered (default 10)


def settle_heap() -> None:
    """Call once startup is done: what exists now lives as long as the process, so it is moved out of
    the collector's reach (``gc.freeze``); young collections run less often, middle ones scan less
    each, and full ones come rarely."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
