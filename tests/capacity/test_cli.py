"""``breakwater simulate`` as an operator runs it: a trace, policies side by side, a table or JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BREAKWATER = [sys.executable, "-m", "breakwater"]


def azure_trace(path: Path, rows: int = 200, gap_s: float = 0.5) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(rows):
        ms = int(i * gap_s * 1000)
        stamp = f"2023-11-16 18:{15 + ms // 60000:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}0000"
        lines.append(f"{stamp},{100 + i},{20 + i % 7}")
    path.write_text("\n".join(lines) + "\n")
    return path


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BREAKWATER, "simulate", *args], capture_output=True, text=True, timeout=120)


def test_policies_side_by_side_on_a_trace(tmp_path: Path) -> None:
    trace = azure_trace(tmp_path / "t.csv")
    run = simulate(
        "--trace",
        str(trace),
        "--policy",
        "fixed:2",
        "--policy",
        "hpa:0.7",
        "--policy",
        "keda",
        "--policy",
        "keda-zero",
        "--policy",
        "adaptive",
        "--policy",
        "supervisor",
        "--startup-s",
        "5",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    names = ["fixed-2", "hpa-utilisation-0.7", "keda-lag-5", "keda-zero-lag-5", "adaptive", "supervisor"]
    assert [r["policy"] for r in rows] == names
    for r in rows:
        assert r["requests"] == r["finished"] == 200
        assert 0 < r["ttft_p50_s"] <= r["ttft_p95_s"] <= r["ttft_p99_s"]
        assert 0 <= r["slo_attainment"] <= 1 and r["usd_per_1k_tokens"] > 0
    fixed = rows[0]
    assert fixed["peak_replicas"] == 2
    # 100 s of trace on 2 replicas (the last request ends a little after): about 200 replica-seconds
    assert 2 * 99.5 / 3600 < fixed["replica_hours"] < 2 * 110 / 3600
    table = simulate("--trace", str(trace), "--policy", "fixed:1", "--sku", "l4")
    assert table.returncode == 0, table.stderr
    assert "| fixed-1 |" in table.stdout and "$ per 1k output tokens" in table.stdout


def test_bad_input_is_refused_with_its_name(tmp_path: Path) -> None:
    trace = azure_trace(tmp_path / "t.csv", rows=5)
    bad = simulate("--trace", str(trace), "--policy", "hpa:lots")
    assert bad.returncode == 2 and "hpa:lots" in bad.stderr
    sku = simulate("--trace", str(trace), "--policy", "fixed:1", "--sku", "tpu-v9")
    assert sku.returncode == 2 and "tpu-v9" in sku.stderr
    missing = simulate("--trace", str(tmp_path / "nope.csv"), "--policy", "fixed:1")
    assert missing.returncode == 2 and "nope.csv" in missing.stderr
