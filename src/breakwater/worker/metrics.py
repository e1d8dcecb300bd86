"""The worker's Prometheus metrics."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from breakwater.gateway.metrics import LATENCY_BUCKETS


class WorkerMetrics:
    def __init__(self, *, process: bool = True) -> None:
        """``process``: with the process's own series (CPU, memory, pid); a worker embedded in a
        gateway leaves them to the gateway's registry, which its series are exposed beside."""
        self.registry = CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)  # process_cpu_seconds_total etc.: the cost model's CPU-seconds
            pid = Gauge(
                "breakwater_process_pid", "This process's id (matches the supervisor's readings)", registry=r
            )
            pid.set(os.getpid())
        self.batch_occupancy = Gauge(
            "breakwater_worker_batch_occupancy", "Running sequences / capacity", ["model"], registry=r
        )
        self.running = Gauge("breakwater_worker_running", "Sequences in the engine", ["model"], registry=r)
        self.rated = Gauge(
            "breakwater_worker_rated_jobs_per_second",
            "Jobs per second this worker would finish with its slots full: its fitted step cost for"
            " its recent jobs' lengths (0 until known; engines.stepcost)",
            ["model"],
            registry=r,
        )
        self.tokens = Counter(
            "breakwater_worker_tokens_total", "Completion tokens generated", ["model"], registry=r
        )
        self.jobs = Counter(
            "breakwater_worker_jobs_total", "Jobs by outcome", ["model", "outcome"], registry=r
        )
        self.retries = Counter(
            "breakwater_retries_total", "Jobs continued after a previous attempt", ["model"], registry=r
        )
        self.preemptions = Counter(
            "breakwater_worker_preemptions_total",
            "Sequences paused for a less-served tenant (continued when a slot frees)",
            ["model"],
            registry=r,
        )
        self.dead_letters = Counter(
            "breakwater_dead_letters_total", "Jobs dead-lettered", ["model"], registry=r
        )
        self.queue_wait = Histogram(
            "breakwater_queue_wait_seconds",
            "Time from admission to a worker starting the job",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_busy = Counter(
            "breakwater_engine_busy_seconds_total",
            "Time in engine steps that began with sequences running: the accelerator's busy seconds",
            ["model"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "breakwater_engine_step_seconds",
            "Time to publish one engine step's tokens (after the step)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.hourly_cost = Gauge(
            "breakwater_worker_hourly_cost_dollars",
            "What this worker costs per hour (BREAKWATER_HOURLY_COST_USD), for cost per 1k tokens",
            ["model"],
            registry=r,
        )
        self.tenant_requests = Counter(
            "breakwater_tenant_requests_total",
            "Requests metered when they ended, by tenant (BREAKWATER_METRICS_TENANTS, else other)",
            ["tenant", "outcome"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "breakwater_tenant_tokens_total", "Tokens metered, by tenant", ["tenant", "kind"], registry=r
        )
        self.kv_cache_usage = Gauge(
            "breakwater_worker_kv_cache_usage", "Engine KV-cache usage (0-1)", ["model"], registry=r
        )
