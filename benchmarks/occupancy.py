"""Batch occupancy against TTFT: queue-aware pull vs a router's push (issue #18, the seed's "queue-aware
micro-batching increases GPU occupancy to > 85% without hurting first-token delays").

In the simulator (``breakwater.capacity``), a fixed fleet of replicas with continuous batching takes
Poisson arrivals with the Azure 2023 conversation trace's lengths, at rising rates, dispatched three
ways: ``pull`` (Breakwater: one queue, a replica takes work when it has a free slot), ``push-rr``
(a router hands each request to the next replica as it arrives, round robin) and ``push-least``
(to the replica with the fewest outstanding requests, as vllm-router and llm-d can). Occupancy is
running sequences over slots, averaged over the time replicas are stepping.

    .venv/bin/python benchmarks/occupancy.py     # ~3 minutes; writes its section of docs/evaluation.md
"""

from __future__ import annotations

import argparse
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from breakwater.bench.metrics import percentile
from breakwater.bench.profiles import Arrival, trace
from breakwater.capacity.policies import Fixed
from breakwater.capacity.service import ILLUSTRATIVE
from breakwater.capacity.simulator import DISPATCH, Simulation
from common import write_section

ROOT = Path(__file__).resolve().parent.parent
EVALUATION = ROOT / "docs" / "evaluation.md"
TRACE = ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
CURVE = ILLUSTRATIVE
REPLICAS = 4
WARMUP_S = 120.0
RATES = (4.0, 8.0, 10.0, 12.0, 13.0, 14.0, 15.0, 16.0)  # arrivals/s, rising through saturation


@dataclass(frozen=True)
class Row:
    dispatch: str
    rate: float
    occupancy: float
    ttft_p50_s: float
    ttft_p95_s: float
    tokens_per_s: float


def arrivals(rate: float, seconds: float, seed: int) -> list[Arrival]:
    lengths = [(a.input_tokens, a.output_tokens) for a in trace(TRACE)]
    rng = random.Random(seed)
    t, out = 0.0, []
    while t < seconds:
        prompt, output = rng.choice(lengths)
        out.append(Arrival(t, prompt, output))
        t += rng.expovariate(rate)
    return out


def run(dispatch: str, rate: float, seconds: float) -> Row:
    sim = Simulation(
        CURVE, arrivals(rate, seconds, seed=1), Fixed(REPLICAS), replicas=REPLICAS, dispatch=dispatch
    )
    result = sim.run()
    after = [r for r in result.requests if r.arrival_s >= WARMUP_S and r.done_s >= 0]
    occupancy = result.sequence_s / (CURVE.capacity * result.busy_s) if result.busy_s else 0.0
    tokens = sum(r.output_tokens for r in result.requests if r.done_s >= 0)
    return Row(
        dispatch,
        rate,
        occupancy,
        percentile([r.ttft_s for r in after], 50),
        percentile([r.ttft_s for r in after], 95),
        tokens / result.end_s,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=900.0)
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    began = time.monotonic()
    rates = [float(r) for r in args.rates.split(",")]
    jobs = [(d, r) for r in rates for d in DISPATCH]
    with ProcessPoolExecutor(max_workers=2) as pool:
        rows = list(pool.map(run, [d for d, _ in jobs], [r for _, r in jobs], [args.seconds] * len(jobs)))
    lines = [
        "| arrivals/s | dispatch | occupancy | TTFT p50 / p95 s | output tokens/s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.rate:g} | {row.dispatch} | {row.occupancy:.0%} | "
            f"{row.ttft_p50_s:.2f} / {row.ttft_p95_s:.2f} | {row.tokens_per_s:,.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    body = f"""## Batch occupancy: queue-aware pull vs push (issue #18)

`python benchmarks/occupancy.py`, {time.strftime("%Y-%m-%d")}, {time.monotonic() - began:.0f} s. Simulator:
{REPLICAS} replicas of {CURVE.capacity} sequences (steps of {CURVE.decode_base_s * 1000:g} ms +
{CURVE.decode_per_seq_s * 1000:g} ms per sequence + {CURVE.prefill_s_per_token * 1000:g} ms per prompt token,
at most {CURVE.max_batched_tokens} prompt tokens joining a step),
{args.seconds:g} s of Poisson arrivals with the conversation trace's lengths, the first {WARMUP_S:g} s
left out of the TTFT. Occupancy: running sequences over slots while stepping.

{table}
"""
    write_section("occupancy", body, EVALUATION)


if __name__ == "__main__":
    main()
