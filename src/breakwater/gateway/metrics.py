"""The gateway's Prometheus metrics (DESIGN §6), on a per-app registry."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from breakwater.gateway.histogram import LoopHistogram

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    30.0,
    60.0,
)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.beside: list[CollectorRegistry] = []  # exposed with it: an embedded worker's
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total etc.: the cost model's CPU-seconds
        pid = Gauge(
            "breakwater_process_pid", "This process's id (matches the supervisor's readings)", registry=r
        )
        pid.set(os.getpid())
        self.ttft = Histogram(
            "breakwater_ttft_seconds",
            "Time to first token, as the gateway sees it",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = LoopHistogram(  # observed once per streamed token: see gateway.histogram
            "breakwater_itl_seconds",
            "Inter-token latency between streamed events",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.direct_events = Counter(
            "breakwater_stream_events_direct_total",
            "Streamed tokens written to their client from the Pub/Sub fan-in's callback, without waking "
            "the stream's task (the others go through it); counted when each stream ends",
            registry=r,
        )
        self.tpot = Histogram(
            "breakwater_tpot_seconds",
            "Time per output token after the first, per request",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "breakwater_cache_requests_total",
            "Requests by response-cache outcome: hit (an identical request's answer), miss, bypass",
            ["model", "result"],
            registry=r,
        )
        self.cache_single_flight = Counter(
            "breakwater_cache_single_flight_total",
            "Hits that followed an identical request still queued or generating",
            ["model"],
            registry=r,
        )
        self.cache_tokens_saved = Counter(
            "breakwater_cache_tokens_saved_total",
            "Completion tokens answered from the cache instead of generated",
            ["model"],
            registry=r,
        )
        self.e2e = Histogram(
            "breakwater_e2e_seconds", "End-to-end request latency", ["model"], buckets=E2E_BUCKETS, registry=r
        )
        self.requests = Counter(
            "breakwater_requests_total", "Requests by final status", ["model", "status"], registry=r
        )
        self.version_requests = Counter(
            "breakwater_alias_requests_total",
            "Requests for an alias, by the version they were queued on",
            ["alias", "version"],
            registry=r,
        )
        self.alias_weight = Gauge(
            "breakwater_alias_weight",
            "An alias's weight for each of its versions",
            ["alias", "version"],
            registry=r,
        )
        self.alias_rolled_back = Gauge(
            "breakwater_alias_rolled_back",
            "1 while a version's weight is 0 because the rollback guard took it out (until a change by hand)",
            ["alias", "version"],
            registry=r,
        )
        self.rollbacks = Counter(
            "breakwater_rollbacks_total",
            "Versions the rollback guard took out of an alias (on the gateway that judged)",
            ["alias", "version"],
            registry=r,
        )
        self.queue_timeouts = Counter(
            "breakwater_queue_timeouts_total",
            "Requests this gateway ended at their timeout while still queued (a worker's own expiries: "
            "breakwater_jobs_total{outcome=expired})",
            ["model"],
            registry=r,
        )
        self.stream_overflows = Counter(
            "breakwater_stream_overflows_total",
            "Live buffers that overflowed (a slow reader fell back to the durable stream)",
            registry=r,
        )
        self.tenant_rejections = Counter(
            "breakwater_tenant_rejections_total",
            "Requests refused by their API key's limits, by tenant (BREAKWATER_METRICS_TENANTS, else other)",
            ["tenant", "reason"],
            registry=r,
        )
        self.rejections = Counter(
            "breakwater_admission_rejections_total",
            "Requests refused at admission",
            ["model", "reason"],
            registry=r,
        )
        self.tokens = Counter(
            "breakwater_tokens_total",
            "Tokens in (prompt) and out (completion)",
            ["model", "direction"],
            registry=r,
        )
        self.active_streams = Gauge(
            "breakwater_active_streams", "Client streams open on this gateway", registry=r
        )
        self.batches_running = Gauge(
            "breakwater_batches_running",
            "Batches this gateway process runs now (holds the lease of)",
            registry=r,
        )
        self.batch_lines = Counter(
            "breakwater_batch_lines_total",
            "Batch lines answered by this gateway process: ok (2xx) or failed (an error answer)",
            ["outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "breakwater_queue_depth", "Jobs waiting in the queue", ["model", "lane"], registry=r
        )
        self.partition_queue_depth = Gauge(
            "breakwater_partition_queue_depth",
            "Jobs waiting in one partition of a hot model's queue (BREAKWATER_PARTITIONS)",
            ["model", "partition", "lane"],
            registry=r,
        )
        self.tenant_queue_depth = Gauge(
            "breakwater_tenant_queue_depth",
            "Requests waiting for their tenant's fair share (BREAKWATER_METRICS_TENANTS, else other)",
            ["model", "lane", "tenant"],
            registry=r,
        )
        self.in_flight = Gauge(
            "breakwater_jobs_in_flight",
            "Jobs claimed by workers and not yet finished",
            ["model", "lane"],
            registry=r,
        )
        self.workers = Gauge("breakwater_workers", "Live workers serving a model", ["model"], registry=r)
        self.batch_occupancy = Gauge(
            "breakwater_batch_occupancy",
            "Running sequences / engine capacity over live workers",
            ["model"],
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "breakwater_kv_cache_usage",
            "Mean engine KV-cache usage (0-1) where engines report it",
            ["model"],
            registry=r,
        )
        self.arrival_rate = Gauge(
            "breakwater_arrival_rate", "Jobs admitted per second (measured, smoothed)", ["model"], registry=r
        )
        self.desired_workers = Gauge(
            "breakwater_desired_workers",
            "Workers that would serve the arrival rate and clear the queue within the horizon",
            ["model"],
            registry=r,
        )
        self.drain_rate = Gauge(
            "breakwater_drain_rate",
            "Jobs finished per second (measured, smoothed); Retry-After = waiting / this",
            ["model"],
            registry=r,
        )

    def exposition(self) -> bytes:
        """The text format of its registry and of those ``beside`` it (their names do not overlap)."""
        return b"".join(generate_latest(r) for r in (self.registry, *self.beside))
