"""A Prometheus histogram for a per-token hot path: an observation is a bisect and two additions.

prometheus_client's ``Histogram.observe`` walks its buckets in Python and takes a lock twice (the
bucket's and the sum's), ~2-4 us, once per token a gateway streams. This one keeps plain counts,
written only by the event loop's thread; a scrape (from any thread) reads a copy of them. It is
exposed as the same histogram family (``_bucket``, ``_count``, ``_sum``, cumulative ``le`` buckets).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

INF = float("inf")
# How prometheus_client writes a bucket's bound ("0.001", "1.0", "+Inf"): the same series names.
go_float = cast(Callable[[float], str], floatToGoString)


class LoopHistogramChild:
    """One label set's counts."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: list[float]) -> None:
        self._bounds = bounds
        self._counts = [0] * len(bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        """Counted in the first bucket whose bound is >= ``amount`` (Prometheus's ``le``)."""
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def snapshot(self) -> tuple[list[int], float]:
        return list(self._counts), self._sum


class LoopHistogram:
    """A labelled histogram registered as a collector of ``registry``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != INF:
            bounds.append(INF)
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self._bounds = bounds
        self._children: dict[tuple[str, ...], LoopHistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopHistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes {len(self.labelnames)} label values, not {len(values)}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LoopHistogramChild(self._bounds)
        return child

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts, total = child.snapshot()
            cumulative, buckets = 0, []
            for bound, count in zip(self._bounds, counts, strict=True):
                cumulative += count
                buckets.append((go_float(bound), float(cumulative)))
            family.add_metric(list(values), buckets, total)
        yield family
