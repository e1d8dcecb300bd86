"""``breakwater simulate`` as an operator runs it: a trace, policies side by side, a table or JSON."""

from __future__ import annotations

import json
import os
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
    env = {**os.environ, "COLUMNS": "400"}  # a usage error's box: not wrapped in the middle of a path
    return subprocess.run(
        [*BREAKWATER, "simulate", *args], capture_output=True, text=True, timeout=120, env=env
    )


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


def test_values_it_cannot_simulate_are_refused_in_a_line(tmp_path: Path) -> None:
    """`--time-scale 0` and `--capacity 0` were ValueError tracebacks; `--min-replicas` over
    `--max-replicas` was taken; a file that is not a trace was a traceback of its reader."""
    trace = azure_trace(tmp_path / "t.csv", rows=5)
    not_a_trace = tmp_path / "hostname"
    not_a_trace.write_text("buildhost\nother\n")
    bad_rows = tmp_path / "bad.csv"
    bad_rows.write_text("TIMESTAMP,ContextTokens\nyesterday,5\n")
    cases = [
        (("--time-scale", "0"), "Invalid value for --time-scale: must be more than 0, got 0"),
        (("--capacity", "0"), "Invalid value for '--capacity'"),
        (("--min-replicas", "5", "--max-replicas", "2"), "--min-replicas: 5 is over --max-replicas 2"),
        (("--startup-s", "-1"), "Invalid value for '--startup-s'"),
    ]
    for args, said in cases:
        run = simulate("--trace", str(trace), "--policy", "hpa:0.7", *args)
        assert run.returncode == 2 and said in _said(run.stderr) and "Traceback" not in run.stderr, run.stderr
    for path in (not_a_trace, bad_rows):
        run = simulate("--trace", str(path), "--policy", "fixed:1")
        assert run.returncode == 2 and str(path.name) in run.stderr, run.stderr
        assert "Traceback" not in run.stderr, run.stderr


def _said(stderr: str) -> str:
    """A usage error's text without the box rich draws around it."""
    return " ".join(stderr.replace("│", " ").split())
