"""The probe's Prometheus metrics (``breakwater_probe_*``), labelled by transport (websocket | sse)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from breakwater.probe.session import Result

FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("success", "recovered", "failed")
KINDS = ("connect", "stream_broken", "timeout", "integrity", "error_event", "protocol")  # + http_<status>


class ProbeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.sessions = Counter(
            "breakwater_probe_sessions",
            "Probe sessions by outcome: success; recovered (an error, then every token exactly once); failed",
            ["transport", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "breakwater_probe_errors",
            "Errors met by probe sessions, by kind (connect, stream_broken, timeout, integrity, "
            "error_event, http_<status>)",
            ["transport", "kind"],
            registry=r,
        )
        self.up = Gauge(
            "breakwater_probe_success", "1 if the last session succeeded", ["transport"], registry=r
        )
        self.last = Gauge(
            "breakwater_probe_last_session_timestamp_seconds",
            "When the last session ended",
            ["transport"],
            registry=r,
        )
        self.connect = Histogram(
            "breakwater_probe_connect_seconds",
            "WebSocket handshake; SSE: until the response headers",
            ["transport"],
            buckets=FAST,
            registry=r,
        )
        self.ttft = Histogram(
            "breakwater_probe_ttft_seconds",
            "Request sent to first token",
            ["transport"],
            buckets=FAST,
            registry=r,
        )
        self.gap = Histogram(
            "breakwater_probe_inter_token_seconds",
            "Between consecutive tokens (resumes excluded)",
            ["transport"],
            buckets=FAST,
            registry=r,
        )
        self.resume = Histogram(
            "breakwater_probe_resume_gap_seconds",
            "Stream dropped (by the probe or a failure) to the first token after resuming",
            ["transport"],
            buckets=FAST,
            registry=r,
        )
        for transport in ("websocket", "sse"):  # every series exists from the start (dashboards, alerts)
            for outcome in OUTCOMES:
                self.sessions.labels(transport, outcome)
            for kind in KINDS:
                self.errors.labels(transport, kind)
            for histogram in (self.connect, self.ttft, self.gap, self.resume):
                histogram.labels(transport)

    def record(self, result: Result) -> None:
        t = result.transport
        self.sessions.labels(t, result.outcome).inc()
        for kind in result.errors:
            self.errors.labels(t, kind).inc()
        self.up.labels(t).set(1.0 if result.outcome == "success" else 0.0)
        self.last.labels(t).set(time.time())
        if result.connect_s is not None:
            self.connect.labels(t).observe(result.connect_s)
        if result.ttft_s is not None:
            self.ttft.labels(t).observe(result.ttft_s)
        for gap in result.gaps_s:
            self.gap.labels(t).observe(gap)
        for gap in result.resume_gaps_s:
            self.resume.labels(t).observe(gap)
