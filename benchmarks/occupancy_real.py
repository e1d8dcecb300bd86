"""Batch occupancy against TTFT on a real engine (issue #18, the seed's "queue-aware micro-batching
increases GPU occupancy to > 85% without hurting first-token delays"), beside the simulator's
prediction for the same engine.

``breakwater up --engine llamacpp`` (one worker: the bundled SmolLM2-135M, 8 sequences) takes
Poisson arrivals at rising rates (short prompts, 64 output tokens); the worker pulls a job only
when its engine has a free slot. Occupancy is the gateway's ``breakwater_batch_occupancy`` (running
over slots, from the worker's heartbeats), sampled every 0.5 s and averaged over the samples with
something running. The simulator runs the same arrivals on the llama.cpp curve measured by
``benchmarks/curve.py`` (docs/evaluation.md), so the table is also a check of the simulator against
a real engine. With one replica, a router's push would hand every job to this engine's own queue:
the same order and timing as the pull, so only the pull is run here; pull against push across
replicas is in the simulator's table (``benchmarks/occupancy.py``).

    .venv/bin/python benchmarks/occupancy_real.py    # ~6 minutes; writes its section of docs/evaluation.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from breakwater.bench import Profile, Target, run_profile
from breakwater.bench.metrics import percentile
from breakwater.bench.profiles import Arrival
from breakwater.capacity.policies import Fixed
from breakwater.capacity.service import ServiceCurve
from breakwater.capacity.simulator import Simulation
from breakwater.redis_server import free_port
from common import ROOT, write_section

EVALUATION = ROOT / "docs" / "evaluation.md"
CAPACITY = 8
# benchmarks/curve.py on this machine (docs/evaluation.md, "A measured service curve: llama.cpp")
CURVE = ServiceCurve(CAPACITY, 0.01614, 0.005682, 0.0043284)
MODEL = "smollm2-135m-instruct"


@dataclass
class Row:
    rate: float
    occupancy: float
    ttft_p50_s: float
    ttft_p95_s: float
    tokens_per_s: float
    sim_occupancy: float
    sim_ttft_p50_s: float
    sim_ttft_p95_s: float
    prompt_tokens: int


class Sampler(threading.Thread):
    """``breakwater_batch_occupancy{model}`` every 0.5 s until ``done``."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.done, self.values = url, threading.Event(), list[float]()

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:
                text = httpx.get(f"{self.url}/metrics", timeout=2).text
            except httpx.HTTPError:
                continue
            for family in text_string_to_metric_families(text):
                if family.name == "breakwater_batch_occupancy":
                    self.values.extend(s.value for s in family.samples if s.labels.get("model") == MODEL)


def start_stack(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "BREAKWATER_CAPACITY": str(CAPACITY), "BREAKWATER_HEARTBEAT_S": "0.5"}
    env["BREAKWATER_LOG_LEVEL"] = "WARNING"
    command = [sys.executable, "-m", "breakwater", "up", "--engine", "llamacpp", "--port", str(port)]
    command += ["--data-dir", str(tmp / "up")]
    with open(tmp / "up.log", "wb") as log:
        up = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"breakwater up exited: {(tmp / 'up.log').read_text()[-2000:]}")
        try:
            if any(m["id"] == MODEL for m in httpx.get(f"{url}/v1/models", timeout=2).json()["data"]):
                return up, url
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    up.terminate()
    raise RuntimeError("breakwater up did not serve the model within 180 s")


def measure(url: str, rate: float, args: argparse.Namespace) -> Row:
    profile = Profile(
        "poisson",
        rate=rate,
        duration_s=args.seconds,
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
        seed=int(rate * 100),
    )
    sampler = Sampler(url)
    sampler.start()
    result = asyncio.run(run_profile(Target(url, MODEL, metrics_url="off"), profile))
    sampler.done.set()
    sampler.join()
    ok = [r for r in result.records if r.ok]
    if len(ok) < len(result.records):
        bad = next(r for r in result.records if not r.ok)
        raise RuntimeError(f"{len(result.records) - len(ok)} requests failed: {bad.error_detail}")
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    span = max(r.start_s + (r.e2e_s or 0.0) for r in ok) - min(r.start_s for r in ok)
    busy = [v for v in sampler.values if v > 0]
    prompt = round(sum(r.prompt_tokens for r in ok) / len(ok))
    # The simulator: the same arrivals, each prompt as long as the engine counted it.
    arrivals = [Arrival(a.t, prompt, a.output_tokens) for a in profile.arrivals()]
    sim = Simulation(CURVE, arrivals, Fixed(1), replicas=1, startup_s=0.0).run()
    sim_ttft = [r.ttft_s for r in sim.requests]
    return Row(
        rate,
        sum(busy) / len(busy) if busy else 0.0,
        percentile(ttft, 50),
        percentile(ttft, 95),
        sum(r.output_tokens for r in ok) / span,
        sim.sequence_s / (CURVE.capacity * sim.busy_s) if sim.busy_s else 0.0,
        percentile(sim_ttft, 50),
        percentile(sim_ttft, 95),
        prompt,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="0.5,1,1.5,2")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--input-tokens", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows: list[Row] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        up, url = start_stack(Path(folder))
        try:
            asyncio.run(
                run_profile(
                    Target(url, MODEL, metrics_url="off"),
                    Profile("constant", rate=4, duration_s=2, input_tokens=16, output_tokens=8),
                )
            )
            for rate in (float(r) for r in args.rates.split(",")):
                rows.append(row := measure(url, rate, args))
                print(row, flush=True)
        finally:
            up.terminate()
            up.wait(60)
    lines = [
        "| arrivals/s | occupancy real / sim | TTFT p50 s real / sim | TTFT p95 s real / sim "
        "| output tokens/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.rate:g} | {r.occupancy:.0%} / {r.sim_occupancy:.0%} "
            f"| {r.ttft_p50_s:.2f} / {r.sim_ttft_p50_s:.2f} | {r.ttft_p95_s:.2f} / {r.sim_ttft_p95_s:.2f} "
            f"| {r.tokens_per_s:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    c = CURVE
    took = f"{time.monotonic() - began:.0f} s"
    body = f"""## Batch occupancy on a real engine: llama.cpp (issue #18)

`python benchmarks/occupancy_real.py`, x86_64, 2 cores, {time.strftime("%Y-%m-%d")}, {took}.
`breakwater up --engine llamacpp` (one worker, SmolLM2-135M Q4_1, {CAPACITY} sequences), Poisson
arrivals for {args.seconds:g} s per rate, prompts of {rows[0].prompt_tokens if rows else "?"} tokens as the
engine counts them, {args.output_tokens} output tokens (`ignore_eos`). Occupancy: running over slots
from the worker's heartbeats, averaged over the samples with something running. "sim": the simulator
on the same arrivals with the measured curve ({c.decode_base_s * 1000:g} ms + {c.decode_per_seq_s * 1000:g} ms
per sequence + {c.prefill_s_per_token * 1000:g} ms per prompt token).

{table}
"""
    write_section("occupancy-real", body, EVALUATION)
    print(f"wrote {EVALUATION}")


if __name__ == "__main__":
    main()
