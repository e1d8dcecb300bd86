"""The probe's metrics: every series dashboards and alerts query exists from the start."""

from __future__ import annotations

from prometheus_client import generate_latest

from breakwater.probe.metrics import KINDS, OUTCOMES, ProbeMetrics


def test_every_probe_series_exists_before_the_first_session() -> None:
    """Dashboards and alerts query them from the start: sessions by outcome, errors by kind and the
    histograms, per transport, all at zero."""
    text = generate_latest(ProbeMetrics().registry).decode()
    for transport in ("websocket", "sse"):
        for outcome in OUTCOMES:
            assert (
                f'breakwater_probe_sessions_total{{outcome="{outcome}",transport="{transport}"}} 0.0' in text
            )
        for kind in KINDS:
            assert f'breakwater_probe_errors_total{{kind="{kind}",transport="{transport}"}} 0.0' in text
        for name in ("connect", "ttft", "inter_token", "resume_gap"):
            assert f'breakwater_probe_{name}_seconds_count{{transport="{transport}"}} 0.0' in text
