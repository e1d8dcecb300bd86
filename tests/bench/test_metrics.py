"""Metric computation against hand-computed values on recorded timestamps."""

from __future__ import annotations

import math

import pytest

from breakwater.bench.metrics import SLO, Cost, RequestRecord, itls, percentile, summarize, tpot


def records() -> list[RequestRecord]:
    a = RequestRecord(0, 0.0, start_s=0.0, ttft_s=0.100, e2e_s=0.400, chunk_s=[0.1, 0.2, 0.3, 0.4])
    a.prompt_tokens, a.output_tokens = 10, 4
    b = RequestRecord(1, 1.0, start_s=1.002, ttft_s=0.300, e2e_s=0.500, chunk_s=[0.3, 0.5])
    b.prompt_tokens, b.output_tokens = 20, 2
    c = RequestRecord(2, 2.0, start_s=2.0, status=429, error="http_429", retry_after=3.0)
    return [a, b, c]


def test_per_request_definitions() -> None:
    a, b, c = records()
    assert tpot(a) == pytest.approx((0.4 - 0.1) / 3)
    assert tpot(b) == pytest.approx(0.2)
    assert tpot(c) is None
    assert itls(a) == pytest.approx([0.1, 0.1, 0.1])
    assert b.lag_s == pytest.approx(0.002)


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([5], 99.9) == 5
    assert math.isnan(percentile([], 50))


def test_summary_matches_hand_computation() -> None:
    s = summarize(
        records(), duration_s=2.0, slo=SLO.parse("ttft=200,tpot=150"), cost=Cost(gpu_hourly=3.6, gpus=1)
    )
    assert (s["num_prompts"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["errors"] == {"http_429": 1} and s["rate_limited"] == 1
    assert s["retry_after_s"] == {"min": 3.0, "max": 3.0}
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 6)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.0)
    assert s["total_token_throughput"] == pytest.approx(18.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(100 + 200 * 0.99)
    assert s["mean_tpot_ms"] == pytest.approx((100 + 200) / 2)
    # ITL over all gaps: 100, 100, 100 (a) and 200 (b)
    assert s["mean_itl_ms"] == pytest.approx(125.0)
    assert s["median_itl_ms"] == pytest.approx(100.0)
    assert s["mean_e2el_ms"] == pytest.approx(450.0)
    assert s["max_send_lag_ms"] == pytest.approx(2.0)
    # goodput: only a meets ttft <= 200 ms and tpot <= 150 ms -> 1 request in 2 s
    assert s["request_goodput"] == pytest.approx(0.5)
    # cost: $3.60/h for 2 s = $0.002 for 6 output tokens -> $0.3333 per 1k; for 36 total -> $0.0556
    assert s["cost_per_1k_output_tokens"] == pytest.approx(0.002 / 0.006)
    assert s["cost_per_1k_total_tokens"] == pytest.approx(0.002 / 0.036)


def test_slo_parsing() -> None:
    assert SLO.parse("ttft=500,e2e=9000") == SLO(ttft_ms=500, e2e_ms=9000)
    assert not SLO.parse(None).given()
    with pytest.raises(ValueError, match="bad SLO"):
        SLO.parse("latency=5")
