"""``breakwater plan``: the fleet found by simulation, and the month's figures, by hand."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from breakwater.bench.profiles import Arrival
from breakwater.capacity.planner import HEADROOM, Demand, at_rate, p95s, plan, smallest_fleet
from breakwater.capacity.pricing import Pricing
from breakwater.capacity.service import ServiceCurve

# One sequence per replica, 10 steps of 0.1 s per request: a replica serves one request a second.
CURVE = ServiceCurve(capacity=1, decode_base_s=0.1)


def steady(n: int, every_s: float, tokens: int = 10) -> list[Arrival]:
    return [Arrival(i * every_s, 5, tokens) for i in range(n)]


def test_a_trace_is_replayed_at_the_planned_rate() -> None:
    arrivals = at_rate(steady(101, 2.0), rps=10.0)
    assert arrivals[0].t == 0 and arrivals[-1].t == pytest.approx(10.0)  # 100 gaps at 10/s
    with pytest.raises(ValueError):
        at_rate(steady(1, 1.0), 1.0)


def test_the_smallest_fleet_that_meets_the_objective() -> None:
    """10 requests a second, each a second of one replica: 10 replicas never queue (TTFT = one step);
    9 fall behind for good."""
    arrivals = steady(600, 0.1)
    assert smallest_fleet(CURVE, arrivals, slo_s=0.15) == 10
    assert smallest_fleet(CURVE, steady(600, 0.5), slo_s=0.15) == 2


def test_a_tpot_objective_can_need_more_replicas_than_ttft() -> None:
    """Steps of 50 ms + 50 ms per running sequence, up to 4 at once: a full batch streams a token
    every 250 ms, one alone every 100 ms. Two requests a second need 2 replicas for TTFT (p95 TPOT
    128 ms); a TPOT p95 under 110 ms needs 3. The bisection agrees with trying every fleet size."""
    curve = ServiceCurve(capacity=4, decode_base_s=0.05, decode_per_seq_s=0.05)
    arrivals = steady(400, 0.5)

    def first(ok: Callable[[tuple[float, float]], bool]) -> int:
        return next(n for n in range(1, 64) if ok(p95s(curve, arrivals, n)))

    ttft_only = smallest_fleet(curve, arrivals, slo_s=2.0)
    both = smallest_fleet(curve, arrivals, slo_s=2.0, tpot_slo_s=0.11)
    assert ttft_only == first(lambda p: p[0] <= 2.0)
    assert both == first(lambda p: p[0] <= 2.0 and p[1] <= 0.11)
    assert both > ttft_only
    assert p95s(curve, arrivals, both)[1] <= 0.11 < p95s(curve, arrivals, both - 1)[1]
    with pytest.raises(ValueError, match="no fleet meets that TPOT"):
        smallest_fleet(curve, arrivals, slo_s=2.0, tpot_slo_s=0.09)  # one sequence alone takes 100 ms


def test_the_months_figures_by_hand() -> None:
    prices = Pricing(gpu_hour={"x": 2.0}, vcpu_hour=0.05, redis_gb_month=100.0, redis_million_ops=1.0)
    demand = Demand(requests_per_day=432_000, peak_to_average=2.0, ttft_p95_s=0.15, result_ttl_s=3600)
    p = plan(demand, steady(600, 0.3), CURVE, prices, sku="x", gpus_per_replica=2)
    assert p.peak_rps == pytest.approx(10.0)  # 5 a second on average, twice that at the peak
    assert p.replicas_peak == 10 and p.replicas_average == 5
    assert p.peak_tokens_per_s == pytest.approx(100.0)
    assert p.gateway_cores == 1 and p.redis_primaries == 1
    assert HEADROOM == 0.7
    hours = 730.0
    assert p.gpu_monthly_usd == pytest.approx(5 * 2 * hours * 2.0)
    assert p.gateway_monthly_usd == pytest.approx(1 * hours * 0.05)
    tokens = 5 * 10 * hours * 3600  # a month at the average rate
    assert p.output_tokens_per_month == pytest.approx(tokens)
    kept_gb = 10 * 3600 * 10 * 86 / 1e9  # an hour of answers at the peak, 86 bytes a token
    assert p.redis_gb == pytest.approx(2 * kept_gb)
    assert p.redis_monthly_usd == pytest.approx(2 * kept_gb * 100.0 + tokens / 1e6 * 1.0)
    assert p.usd_per_1k_tokens == pytest.approx(p.monthly_usd / tokens * 1000)
    assert math.isclose(p.monthly_usd, p.gpu_monthly_usd + p.gateway_monthly_usd + p.redis_monthly_usd)


def breakwater_plan(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "breakwater", "plan", *args]
    env = {**os.environ, "COLUMNS": "400"}  # a usage error's box: not wrapped in the middle of a path
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def test_the_command(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = (f'{{"timestamp": {i * 300}, "input_length": 5, "output_length": 10}}\n' for i in range(300))
    trace.write_text("".join(rows))
    curve = [
        "--capacity",
        "1",
        "--decode-base-ms",
        "100",
        "--decode-per-seq-ms",
        "0",
        "--prefill-ms-per-token",
        "0",
    ]
    run = breakwater_plan(
        "--requests-per-day", "432000", "--trace", str(trace), *curve, "--slo-ttft-p95-s", "0.15"
    )
    assert run.returncode == 0, run.stderr
    assert "peak: 10.0 req/s, 100 output tokens/s" in run.stdout
    assert "10 at the peak" in run.stdout and "5 on average" in run.stdout
    bad = breakwater_plan("--requests-per-day", "1000", "--trace", str(trace), "--sku", "z")
    assert bad.returncode == 2 and "`z`" in bad.stderr


def test_a_prompt_whose_prefill_alone_misses_the_objective_meets_it_at_no_size() -> None:
    """It bisected up to 4096 replicas and blamed their number."""
    curve = ServiceCurve(capacity=8, decode_base_s=0.02, prefill_s_per_token=0.00005)
    long_prompts = [Arrival(i * 1.0, 40_000, 10) for i in range(20)]  # 2 s of prefill each
    with pytest.raises(ValueError, match=r"no fleet meets a TTFT p95 of 1 s: the prefill .* takes 2\.02 s"):
        smallest_fleet(curve, long_prompts, slo_s=1.0)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--requests-per-day", "0"), "the requests a day must be more than 0, got 0"),  # ZeroDivisionError
        (("--requests-per-day", "-5"), "the requests a day must be more than 0, got -5"),  # "4096 replicas"
        (("--peak-to-average", "0"), "the peak-to-average ratio must be at least 1, got 0"),  # ZeroDivision
        (("--slo-ttft-p95-s", "0"), "the TTFT objective must be more than 0 s, got 0"),
        (("--pricing", "{not_json}"), "pricing file {not_json}: not JSON"),  # named no file
        (("--trace", "{not_a_trace}"), "{not_a_trace}: no requests in it"),  # an IndexError
        (("--trace", "{long_prompts}"), "no fleet meets a TTFT p95 of 1 s"),  # "more than 4096 replicas"
    ],
)
def test_what_cannot_be_planned_is_said_in_a_line(tmp_path: Path, args: tuple[str, ...], said: str) -> None:
    files = {
        name: tmp_path / name for name in ("trace.jsonl", "not_json", "not_a_trace", "long_prompts.jsonl")
    }
    rows = (f'{{"timestamp": {i * 300}, "input_length": 5, "output_length": 10}}\n' for i in range(30))
    files["trace.jsonl"].write_text("".join(rows))
    files["not_json"].write_text("gpu_hour: 3\n")
    files["not_a_trace"].write_text("buildhost\n")
    long = (f'{{"timestamp": {i * 300}, "input_length": 40000, "output_length": 10}}\n' for i in range(30))
    files["long_prompts.jsonl"].write_text("".join(long))
    paths = {"not_json": str(files["not_json"]), "not_a_trace": str(files["not_a_trace"])}
    paths["long_prompts"] = str(files["long_prompts.jsonl"])
    given = [a.format(**paths) for a in args]
    trace = [] if "--trace" in given else ["--trace", str(files["trace.jsonl"])]
    run = breakwater_plan("--requests-per-day", "100000", *trace, *given)
    out = " ".join(run.stderr.replace("│", " ").split())  # a usage error's text, without rich's box
    assert run.returncode == 2, run.stderr
    assert said.format(**paths) in out and "Traceback" not in run.stderr, run.stderr
