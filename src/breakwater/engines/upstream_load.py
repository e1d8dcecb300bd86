"""An upstream's own view of its load, from its Prometheus metrics (vLLM's names).

The ``openai`` engine reads it every 250 ms to pull only while the upstream has room. vLLM's whole
page is ~57 KB (every histogram's buckets): rendering it cost vLLM's API server ~14 ms of CPU and
reading it with prometheus_client's parser cost the worker ~23 ms, each scrape (docs/benchmarks.md),
i.e. ~6% and ~9% of a core at four scrapes a second for three numbers. So the engine asks for those
metrics by name (``name[]=``, which prometheus_client's exposition app honours; vLLM serves that app
at ``/metrics/``, behind its own unfiltered ``/metrics`` route), and reads a page by scanning for
their lines only.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from urllib.parse import urlencode

# vLLM's names (and the older ones); sums are taken over label sets (several models or engines).
WAITING_METRICS = ("vllm:num_requests_waiting",)
RUNNING_METRICS = ("vllm:num_requests_running",)
KV_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
NAMES = (*WAITING_METRICS, *RUNNING_METRICS, *KV_METRICS)
# A sample line of one of them: the name, then its labels or the value.
_STARTS = tuple(f"{name}{after}" for name in NAMES for after in ("{", " ", "\t"))
# Its name, labels and value: label values may hold anything quoted, "}" too, but nothing after the
# labels can, so the labels end at the line's last "}".
_SAMPLE = re.compile(r"(" + "|".join(map(re.escape, NAMES)) + r")(?:\{.*\})?[ \t]+(\S+)")


@dataclass(slots=True)
class UpstreamLoad:
    """The upstream's own view of its load, from its last metrics scrape."""

    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float | None = None
    scraped_at: float = 0.0


def metrics_urls(server: str) -> tuple[str, str]:
    """Where to look for the metrics on ``server`` (no ``/v1``), in order: the named ones alone from
    prometheus_client's app (vLLM mounts it at ``/metrics/``), then the whole ``/metrics`` page."""
    named = urlencode([("name[]", name) for name in NAMES])
    return f"{server}/metrics/?{named}", f"{server}/metrics"


def parse_load(text: str) -> UpstreamLoad | None:
    """vLLM-style load from a Prometheus (or OpenMetrics) text page; None when the page has none
    of the waiting metrics. Reads only the wanted samples' lines: ``name{labels} value [time]``."""
    sums: dict[str, float] = {}
    # Lines end at "\n" only: a label value may hold other line separators ("\x1c", "\u2028"), which
    # the format leaves unescaped. A "\r" before it is not in the value (\S+ stops at it).
    for line in text.split("\n"):
        if not line.startswith(_STARTS):
            continue
        sample = _SAMPLE.match(line)
        if sample is None:
            continue
        try:
            value = float(sample[2])  # NaN and +-Inf too, summed as prometheus_client's parser reads them
        except ValueError:
            continue
        sums[sample[1]] = sums.get(sample[1], 0.0) + value
    if not any(name in sums for name in WAITING_METRICS):
        return None
    kv = next((sums[n] for n in KV_METRICS if n in sums), None)
    return UpstreamLoad(
        waiting=sum(sums.get(n, 0.0) for n in WAITING_METRICS),
        running=sum(sums.get(n, 0.0) for n in RUNNING_METRICS),
        kv_cache_usage=kv,
        scraped_at=time.monotonic(),
    )
