"""``breakwater bench`` end to end: against the Breakwater stack and a plain OpenAI-compatible server."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from breakwater.redis_server import RedisServer, free_port
from tests.helpers import StackProcs, breakwater_cli, start_sim_server

PNG = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, out: Path) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    proc = subprocess.run(
        [sys.executable, "-m", "breakwater", "bench", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (out / "result.json").exists(), proc.stdout + proc.stderr
    result = orjson.loads((out / "result.json").read_bytes())
    rows = [orjson.loads(line) for line in (out / "requests.jsonl").read_bytes().splitlines()]
    return proc.returncode, result, rows


def test_bench_against_the_stack(stack: StackProcs, tmp_path: Path) -> None:
    url = stack.gateways[0][1]
    code, result, rows = bench(
        *("--url", url, "--model", "sim", "--profile", "constant", "--rate", "20", "--duration", "2"),
        *("--input-tokens", "16", "--output-tokens", "12", "--slo", "ttft=2000", "--cpu-hourly", "0.05"),
        "--cpus",
        "2",
        out=tmp_path,
    )
    assert code == 0
    assert result["num_prompts"] == result["completed"] == 40 == len(rows)
    assert result["failed"] == 0 and result["integrity_errors"] == 0
    assert result["total_output_tokens"] == 40 * 12  # from usage: ignore_eos runs to max_tokens
    assert result["total_input_tokens"] > 0
    assert result["output_throughput"] > 0 and result["request_goodput"] > 0
    assert result["cost_per_1k_output_tokens"] is not None
    assert all(r["request_id"] and r["ttft_s"] and len(r["chunk_s"]) == 12 for r in rows)
    assert any("breakwater_queue_depth" in row for row in result["server_timeseries"])
    for name in ("latency_over_time.png", "throughput.png", "queue_depth.png", "ttft_cdf.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    html = (tmp_path / "report.html").read_text()
    assert "Breakwater bench report" in html and html.count("data:image/png;base64,") == 4


def test_bench_closed_loop_against_a_plain_server(log_dir: Path, tmp_path: Path) -> None:
    sim, url = start_sim_server(log_dir, sim_decode_base_ms=1)
    try:
        code, result, rows = bench(
            *("--url", f"{url}/v1", "--model", "up-sim", "--profile", "concurrency", "--concurrency", "4"),
            *(
                "--num-requests",
                "20",
                "--endpoint",
                "completions",
                "--output-tokens",
                "8",
                "--metrics-url",
                "off",
            ),
            out=tmp_path,
        )
    finally:
        sim.stop()
    assert code == 0
    assert result["completed"] == 20 and result["total_output_tokens"] == 160
    assert all(r["request_id"] == "" for r in rows)  # not Breakwater: no SSE ids, nothing to check


def test_bench_classifies_429s_with_retry_after(
    redis_server: RedisServer, log_dir: Path, tmp_path: Path
) -> None:
    procs = StackProcs(redis_server.url, f"b{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway(lane_max_queued=2)
        procs.add_worker(capacity=1, sim_decode_base_ms=20)
        procs.wait_workers(url)
        code, result, rows = bench(
            *("--url", url, "--model", "sim", "--profile", "constant", "--rate", "100", "--duration", "0.3"),
            *("--output-tokens", "20", "--no-stream"),
            out=tmp_path,
        )
    finally:
        procs.stop()
    assert code == 0
    assert result["completed"] >= 3
    assert result["rate_limited"] > 0 and result["errors"] == {"http_429": result["rate_limited"]}
    assert result["retry_after_s"] is not None and result["retry_after_s"]["min"] >= 1
    assert sum(1 for r in rows if r["status"] == 429) == result["rate_limited"]


def test_bench_over_websocket(stack: StackProcs, tmp_path: Path) -> None:
    ws_url = stack.gateways[0][1].replace("http://", "ws://")
    code, result, rows = bench(
        *("--url", ws_url, "--model", "sim", "--profile", "poisson", "--rate", "30", "--duration", "1"),
        *("--output-tokens", "10", "--seed", "4"),
        out=tmp_path,
    )
    assert code == 0
    assert result["completed"] == result["num_prompts"] == len(rows) > 10
    assert result["integrity_errors"] == 0 and result["total_output_tokens"] == 10 * len(rows)
    assert all(r["request_id"].startswith("chatcmpl-") and len(r["chunk_s"]) == 10 for r in rows)
    assert result["server_timeseries"]  # /metrics scraped over http on the same host


def test_sweep_finds_the_highest_rate_meeting_the_slo(log_dir: Path, tmp_path: Path) -> None:
    # 2 slots, 10 tokens at 10 ms a step: about 0.1 s a request, so ~20 req/s saturates the server
    sim, url = start_sim_server(log_dir, capacity=2, sim_decode_base_ms=10)
    try:
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "breakwater", "bench", "--url", url, "--model", "up-sim"),
                *("--profile", "constant", "--rate", "4", "--duration", "1.5", "--output-tokens", "10"),
                *("--slo", "ttft=250", "--sweep", "--metrics-url", "off"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        sim.stop()
    assert proc.returncode == 0, proc.stderr
    best = float(proc.stderr.split("highest rate meeting ttft=250:")[1].split("req/s")[0])
    assert 4 <= best < 32  # 4 req/s is easy; 32 is past saturation
    assert "'meets': False" in proc.stderr  # it went past the limit, then bisected


def test_bench_measures_a_response_cache(redis_server: RedisServer, log_dir: Path, tmp_path: Path) -> None:
    """``--repeat-fraction``: repeated greedy requests; the summary has the hit ratio and the TTFT of
    hits and misses apart."""
    from breakwater.bench import Profile

    procs = StackProcs(redis_server.url, f"b{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway(cache="true")
        procs.add_worker(sim_decode_base_ms=5, heartbeat_s=0.5)
        procs.wait_workers(url)
        args = ("--profile", "poisson", "--rate", "20", "--duration", "2", "--seed", "3")
        code, result, rows = bench(
            *("--url", url, "--model", "sim", *args, "--repeat-fraction", "0.4"),
            *("--input-tokens", "16", "--output-tokens", "8"),
            out=tmp_path,
        )
    finally:
        procs.stop()
    assert code == 0 and result["failed"] == 0 and result["integrity_errors"] == 0
    arrivals = Profile(
        "poisson", rate=20, duration_s=2, seed=3, input_tokens=16, output_tokens=8, repeat_fraction=0.4
    ).arrivals()
    repeats = len(arrivals) - len({a.prompt_id for a in arrivals})
    assert 0 < repeats < len(arrivals) == len(rows)
    # Every repeat is answered by its earlier twin (finished or still generating); nothing else is.
    assert sorted(r["cache"] for r in rows) == sorted(["hit"] * repeats + ["miss"] * (len(rows) - repeats))
    assert result["cache_hit_ratio"] == repeats / len(rows)
    assert result["median_ttft_hit_ms"] > 0 and result["median_ttft_miss_ms"] > 0


def test_bench_measures_the_cost_per_process(
    redis_server: RedisServer, log_dir: Path, tmp_path: Path
) -> None:
    """``--measure`` each process's /metrics and ``--redis-url``: the seed's cost model from what the
    gateway, the worker and Redis actually used, priced from ``--pricing``."""
    procs = StackProcs(redis_server.url, f"b{uuid.uuid4().hex[:10]}", log_dir)
    gw_metrics, worker_metrics = free_port(), free_port()
    pricing = tmp_path / "prices.json"
    pricing.write_text('{"gpu_hour": {"l4": 0.9}, "vcpu_hour": 0.04, "redis_million_ops": 2.0}')
    try:
        url = procs.add_gateway(metrics_port=gw_metrics)
        procs.add_worker(sim_decode_base_ms=2, heartbeat_s=0.5, metrics_port=worker_metrics)
        procs.wait_workers(url)
        code, result, _ = bench(
            *("--url", url, "--model", "sim", "--profile", "constant", "--rate", "20", "--duration", "2"),
            *("--input-tokens", "16", "--output-tokens", "12"),
            *("--measure", f"http://127.0.0.1:{gw_metrics}/metrics"),
            *("--measure", f"http://127.0.0.1:{worker_metrics}/metrics"),
            *("--redis-url", redis_server.url, "--pricing", str(pricing), "--sku", "l4"),
            out=tmp_path / "out",
        )
    finally:
        procs.stop()
    assert code == 0 and result["completed"] == 40 and result["total_output_tokens"] == 40 * 12
    measured = result["measured_cost"]
    usage, parts = measured["usage"], measured["cost_usd"]
    assert usage["cpu_s"]["gateway"] > 0 and usage["cpu_s"]["worker"] > 0
    (replica,) = usage["replicas"]
    assert replica["cpu_s"] == usage["cpu_s"]["worker"]
    assert 0 < replica["busy_s"] <= usage["accelerator_s"]  # one worker, billed for the whole window
    assert usage["accelerator_s"] >= result["duration"]
    assert usage["redis_commands"] >= 40 * 12  # at least one durable write per token
    assert usage["redis_memory_gb"] > 0
    assert parts["gpu"] == pytest.approx(usage["accelerator_s"] / 3600 * 0.9)
    assert parts["gateway"] == pytest.approx(usage["cpu_s"]["gateway"] / 3600 * 0.04)
    assert parts["redis_ops"] == pytest.approx(usage["redis_commands"] / 1e6 * 2.0)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert measured["per_1k_output_tokens"] == pytest.approx(parts["total"] / (40 * 12) * 1000)


def test_bench_compares_an_aliass_versions(redis_server: RedisServer, log_dir: Path, tmp_path: Path) -> None:
    """A vs B: bench against an alias split 50/50 over a sound version and one failing 20% of its
    requests; the result has each version's share, error rate and latencies side by side."""
    procs = StackProcs(redis_server.url, f"ab{uuid.uuid4().hex[:8]}", log_dir)
    try:
        url = procs.add_gateway()
        procs.add_worker(model="llama", model_version="a", sim_decode_base_ms=2, heartbeat_s=0.5)
        procs.add_worker(
            model="llama", model_version="b", sim_decode_base_ms=2, heartbeat_s=0.5, sim_error_rate=0.2
        )
        for version in ("a", "b"):
            procs.wait_workers(url, model=f"llama@{version}", count=1)
        breakwater_cli(procs, "models", "alias", "set", "llama", "llama@a=50", "llama@b=50")
        code, result, rows = bench(
            *("--url", url, "--model", "llama", "--profile", "constant", "--rate", "50", "--duration", "4"),
            *("--input-tokens", "16", "--output-tokens", "8", "--slo", "ttft=5000"),
            out=tmp_path,
        )
    finally:
        procs.stop()
    assert code == 0 and result["num_prompts"] == 200
    versions = result["by_model"]
    assert set(versions) == {"llama@a", "llama@b"}
    assert versions["llama@a"]["requests"] == versions["llama@b"]["requests"] == 100  # smooth round robin
    assert versions["llama@a"]["error_rate"] == 0.0
    assert 0.08 <= versions["llama@b"]["error_rate"] <= 0.35  # 20% of request ids, by hash
    assert versions["llama@b"]["completed"] == 100 - result["failed"]
    assert all(v["p95_ttft_ms"] > 0 and v["mean_output_tokens"] == 8 for v in versions.values())
    assert versions["llama@a"]["slo_attainment"] == 1.0 and versions["llama@b"]["slo_attainment"] < 1.0
    assert {r["model"] for r in rows} == {"llama@a", "llama@b"}
