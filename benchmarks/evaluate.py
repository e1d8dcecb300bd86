"""The seed's evaluation, scaled to this machine: step, burst and trace replay against the local stack.

Two stacks, one after the other, each Redis + one gateway + workers:

- ``sim``: two sim workers shaped like a GPU replica (32 sequences, 15 ms decode step + 0.1 ms per
  running sequence, 0.05 ms per prompt token), so the platform is measured at GPU-like rates;
- ``llamacpp``: one worker with the bundled SmolLM2 on the CPU, at rates this machine can serve.

Profiles (the seed's: step 50->200 RPS over 5 min; burst 0->400 RPS in 10 s, hold, decay; trace
replay), scaled by ``SCALE`` below. Writes docs/evaluation.md and plots under docs/evaluation/, full
results under results/evaluation/.

    python benchmarks/evaluate.py [--only sim|llamacpp] [--trace TRACE.csv|TRACE.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson

from breakwater.bench import SLO, Cost, Profile, Target, run_profile, summarize
from breakwater.bench.report import write
from breakwater.redis_server import RedisServer, free_port
from common import ROOT, spawn, stop, wait_models

DOC = ROOT / "docs" / "evaluation.md"
PLOTS = ROOT / "docs" / "evaluation"
RESULTS = ROOT / "results" / "evaluation"
DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"

SIM_WORKER = {
    "BREAKWATER_CAPACITY": "32",
    "BREAKWATER_SIM_DECODE_BASE_MS": "15",
    "BREAKWATER_SIM_DECODE_PER_SEQ_MS": "0.1",
    "BREAKWATER_SIM_PREFILL_MS_PER_TOKEN": "0.05",
    "BREAKWATER_SIM_JITTER_FRAC": "0.1",
}

STACKS: dict[str, dict[str, Any]] = {
    "sim": {
        "model": "sim",
        "workers": 2,
        "worker_args": ["--engine", "sim"],
        "worker_env": SIM_WORKER,
        # seed: 50->200 RPS over 5 min; here 10->40 RPS over 60 s in 4 plateaus
        "step": {"start_rate": 10, "end_rate": 40, "duration_s": 60, "steps": 4},
        # seed: 0->400 RPS in 10 s, hold, decay; here 0->80 RPS in 5 s, hold 10 s, decay 10 s
        "burst": {"peak": 80, "ramp_s": 5, "hold_s": 10, "decay_s": 10},
        "trace": {"time_scale": 4.0, "duration_s": 60, "max_input_tokens": 2048, "max_output_tokens": 256},
        "tokens": (128, 64),
        "slo": "ttft=1000,tpot=100",
        "cost": Cost(gpu_hourly=2.50, gpus=2),  # each sim worker stands for one GPU replica
    },
    "llamacpp": {
        "model": "smollm2-135m-instruct",
        "workers": 1,
        "worker_args": ["--engine", "llamacpp", "--capacity", "8"],
        "worker_env": {"BREAKWATER_CONTEXT_LENGTH": "1024"},
        "step": {"start_rate": 0.5, "end_rate": 2.0, "duration_s": 60, "steps": 4},
        "burst": {"peak": 4, "ramp_s": 5, "hold_s": 10, "decay_s": 10},
        "trace": {"time_scale": 0.2, "duration_s": 60, "max_input_tokens": 256, "max_output_tokens": 32},
        "tokens": (64, 32),
        "slo": "ttft=3000,tpot=200",
        "cost": Cost(cpu_hourly=0.04, cpus=2),
    },
}


def run_stack(name: str, spec: dict[str, Any], trace: Path, tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    redis = RedisServer(tmp / f"redis-{name}")
    redis.start()
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        env = {
            "BREAKWATER_REDIS_URL": redis.url,
            "BREAKWATER_KEY_PREFIX": f"eval-{name}",
            "BREAKWATER_LOG_LEVEL": "WARNING",
            "BREAKWATER_LANE_MAX_QUEUED": "100000",
        }
        port = free_port()
        procs.append(spawn(["gateway", "--port", str(port)], env, tmp / f"{name}-gw.log"))
        for i in range(spec["workers"]):
            args = ["worker", "--worker-id", f"{name}-{i}", *spec["worker_args"]]
            procs.append(spawn(args, env | spec["worker_env"], tmp / f"{name}-w{i}.log"))
        url = f"http://127.0.0.1:{port}"
        wait_models(url, spec["model"], 300)
        target = Target(url, spec["model"], "chat")
        inp, out = spec["tokens"]
        profiles = {
            "step": Profile("step", input_tokens=inp, output_tokens=out, **spec["step"]),
            "burst": Profile("burst", input_tokens=inp, output_tokens=out, **spec["burst"]),
            "trace": Profile("trace", trace=str(trace), **spec["trace"]),
        }
        for pname, profile in profiles.items():
            result = asyncio.run(run_profile(target, profile))
            summary = summarize(
                result.records, duration_s=result.duration_s, slo=SLO.parse(spec["slo"]), cost=spec["cost"]
            )
            folder = RESULTS / f"{name}-{pname}"
            shutil.rmtree(folder, ignore_errors=True)
            config = {"stack": name, "profile": profile.__repr__(), "worker_env": spec["worker_env"]}
            write(result, summary, config, folder)
            PLOTS.mkdir(parents=True, exist_ok=True)
            for plot in ("latency_over_time.png", "queue_depth.png"):
                if (folder / plot).exists():
                    shutil.copy(folder / plot, PLOTS / f"{name}-{pname}-{plot}")
            queue = [row.get("breakwater_queue_depth", 0.0) for row in result.timeseries]
            summary["max_queue_depth"] = max(queue, default=0.0)
            rows.append((pname, summary))
            print(
                name, pname, {k: summary[k] for k in ("completed", "failed", "output_throughput")}, flush=True
            )
    finally:
        stop(procs)
        redis.stop()
    return rows


def stored(name: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for pname in ("step", "burst", "trace"):
        summary = orjson.loads((RESULTS / f"{name}-{pname}" / "result.json").read_bytes())
        queue = [row.get("breakwater_queue_depth", 0.0) for row in summary["server_timeseries"]]
        summary["max_queue_depth"] = max(queue, default=0.0)
        rows.append((pname, summary))
    return rows


def section(name: str, spec: dict[str, Any], rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    cost = spec["cost"]
    price = (
        f"${cost.gpu_hourly}/GPU-h x {cost.gpus:g}"
        if cost.gpus
        else f"${cost.cpu_hourly}/core-h x {cost.cpus:g}"
    )
    lines = [
        f"## `{name}` stack",
        "",
        f"Workers: {spec['workers']} x `{' '.join(spec['worker_args'])}` {spec['worker_env']}. "
        f"SLOs for goodput: `{spec['slo']}`. Cost model: {price}.",
        "",
        "| profile | sent | completed | failed | req/s | output tok/s | TTFT p50 / p99 | TPOT p50 / p99 "
        "| E2E p99 | goodput | max queue | $ / 1k output tok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pname, s in rows:
        c = s.get("cost_per_1k_output_tokens")
        lines.append(
            f"| {pname} | {s['num_prompts']} | {s['completed']} | {s['failed']} "
            f"| {s['request_throughput']:.2f} "
            f"| {s['output_throughput']:.0f} | {s['median_ttft_ms']:.0f} / {s['p99_ttft_ms']:.0f} ms "
            f"| {s['median_tpot_ms']:.1f} / {s['p99_tpot_ms']:.1f} ms | {s['p99_e2el_ms']:.0f} ms "
            f"| {s.get('request_goodput', 0):.2f} | {s['max_queue_depth']:.0f} | {c:.5f} |"
            if c is not None
            else f"| {pname} | {s['num_prompts']} | {s['completed']} | {s['failed']} | ... |"
        )
    lines.append("")
    for pname, s in rows:
        dropped = "none dropped" if s["failed"] == 0 else f"{s['failed']} failed ({s['errors']})"
        lines.append(
            f"- {pname}: {s['completed']} of {s['num_prompts']} completed, {dropped}; the Redis queue "
            f"peaked at {s['max_queue_depth']:.0f} jobs; stream integrity errors: {s['integrity_errors']}."
        )
    lines.append("")
    for pname, _ in rows:
        lines.append(
            f"![{name} {pname} latency](evaluation/{name}-{pname}-latency_over_time.png) "
            f"![{name} {pname} queue](evaluation/{name}-{pname}-queue_depth.png)"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=list(STACKS))
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--report-only", action="store_true", help="rewrite the doc from results/evaluation")
    args = parser.parse_args()
    if not args.trace.exists():
        raise SystemExit(f"trace {args.trace} not found: pass --trace (Azure CSV or Mooncake JSONL)")
    tmp = Path(tempfile.mkdtemp(prefix="bw-eval-"))
    body: list[str] = []
    for name, spec in STACKS.items():
        if args.only and name != args.only:
            continue
        rows = stored(name) if args.report_only else run_stack(name, spec, args.trace, tmp)
        body += section(name, spec, rows)
    command = " ".join(["python benchmarks/evaluate.py", *(a for a in sys.argv[1:] if a != "--report-only")])
    head = [
        "# Evaluation",
        "",
        "The seed's three load profiles (step, burst, trace replay), scaled to one 2-core machine, against",
        "the local stack (Redis + one gateway + workers), measured with `breakwater bench` (metric",
        "definitions in [bench.md](bench.md)). Produced by `make evaluate`:",
        "",
        f"`{command}`, {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.",
        f"Trace: `{args.trace.name}` (Azure LLM inference 2023; prompt and output lengths clipped as noted).",
        "",
        "- **step**: seed 50->200 RPS over 5 min; here four equal plateaus over 60 s.",
        "- **burst**: seed 0->400 RPS in 10 s, hold, decay; here a linear ramp, hold and linear decay.",
        "- **trace**: arrival times and lengths replayed from the trace, time-scaled.",
        "",
    ]
    DOC.write_text("\n".join(head + body))
    print(DOC.read_text())


if __name__ == "__main__":
    main()
