"""``breakwater bench`` without ``--model``: the model comes from ``/v1/models``; a run where every
request fails exits non-zero and says what the server answered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from breakwater.redis_server import free_port
from tests.helpers import StackProcs


def bench(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "breakwater", "bench", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def rows(out: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (out / "requests.jsonl").read_bytes().splitlines()]


def test_bench_without_model_requests_the_model_the_server_lists(stack: StackProcs, tmp_path: Path) -> None:
    url = stack.gateways[0][1]
    proc = bench(
        *("--url", f"{url}/v1", "--profile", "constant", "--rate", "10", "--duration", "1"),
        *("--input-tokens", "8", "--output-tokens", "6"),
        out=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model: sim, from the server's /v1/models" in proc.stderr
    result = orjson.loads((tmp_path / "result.json").read_bytes())
    assert result["config"]["target"]["model"] == "sim"
    assert result["completed"] == result["num_prompts"] == 10 and result["failed"] == 0
    assert result["total_output_tokens"] == 10 * 6


def test_bench_fails_clearly_when_every_request_fails(stack: StackProcs, tmp_path: Path) -> None:
    url = stack.gateways[0][1]
    proc = bench(
        *("--url", url, "--model", "no-such-model", "--profile", "constant", "--rate", "10"),
        *("--duration", "0.5", "--output-tokens", "4"),
        out=tmp_path,
    )
    assert proc.returncode == 1
    message = proc.stderr.split("error: ", 1)[1]
    assert message.startswith("all 5 requests failed; the most common error, on 5: http_404 (HTTP 404): {")
    assert "model_not_found" in message and "no-such-model" in message
    recorded = rows(tmp_path)
    assert [r["status"] for r in recorded] == [404] * 5
    assert all("model_not_found" in r["error_detail"] for r in recorded)
    assert "Traceback" not in proc.stderr


def test_bench_without_model_says_when_it_cannot_list_the_models(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = bench("--url", url, "--duration", "1", out=tmp_path)
    assert proc.returncode == 2
    assert f"error: could not list the models at {url}/v1/models" in proc.stderr
    assert "pass --model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "result.json").exists()
