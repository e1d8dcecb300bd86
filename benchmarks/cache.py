"""The response cache (issue #17): the same schedule with 0%, 10% and 30% repeated requests, with the
cache off and on, side by side in one run.

Lengths come from a real trace (Azure LLM inference 2023, conversation; clipped), arrivals are
Poisson. One sim worker stands in for a GPU replica: its step time is a batch cost model, and the
seconds it spends in steps (``breakwater_engine_busy_seconds_total``) are the replica's busy GPU-seconds.
Per configuration: throughput, TTFT p50/p99 of hits and misses, generations, the busy GPU-seconds,
the CPU-seconds of gateway, worker and Redis, and the cost per 1k delivered output tokens from them
(the seed's model: GPU-seconds and CPU-seconds, priced by ``--gpu-hourly`` and ``--cpu-hourly``).

    .venv/bin/python benchmarks/cache.py            # ~12 minutes; writes its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from breakwater.bench.metrics import summarize
from breakwater.bench.profiles import Arrival, poisson, trace, with_repeats
from breakwater.bench.runner import Runner, Target
from breakwater.redis_server import RedisServer, free_port
from common import ROOT, spawn, stop, wait_models, write_section

TRACE = ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
TICKS = os.sysconf("SC_CLK_TCK")
WORKER = {  # a GPU-like replica: 16 sequences, ~25 ms per decode step at full batch
    "BREAKWATER_CAPACITY": "16",
    "BREAKWATER_SIM_DECODE_BASE_MS": "15",
    "BREAKWATER_SIM_DECODE_PER_SEQ_MS": "0.6",
    "BREAKWATER_SIM_PREFILL_MS_PER_TOKEN": "0.02",
    "BREAKWATER_HEARTBEAT_S": "0.5",
}


@dataclass
class Measured:
    label: str
    summary: dict[str, Any]
    generations: float
    gpu_s: float
    cpu_s: dict[str, float]

    def cost_per_1k(self, gpu_hourly: float, cpu_hourly: float) -> float:
        tokens = self.summary["total_output_tokens"]
        dollars = self.gpu_s * gpu_hourly / 3600 + sum(self.cpu_s.values()) * cpu_hourly / 3600
        return dollars / tokens * 1000 if tokens else float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def scrape(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """The sum of each named counter's samples (jobs: those that ran to an end, done or error)."""
    text = httpx.get(url, timeout=5).text
    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out and sample.labels.get("outcome", "done") in ("done", "error"):
                out[sample.name] += sample.value
    return out


def schedule(rate: float, seconds: float, fraction: float, seed: int) -> list[Arrival]:
    """Poisson arrivals with the trace's (input, output) lengths; ``fraction`` of them repeats."""
    lengths = [
        (a.input_tokens, a.output_tokens)
        for a in trace(TRACE, max_requests=5000, max_input_tokens=1024, max_output_tokens=192)
    ]
    rng = random.Random(seed)
    timed = []
    for arrival in poisson(rate, seconds, 1, 1, seed=seed):
        inp, out = rng.choice(lengths)
        timed.append(replace(arrival, input_tokens=max(1, inp), output_tokens=max(1, out)))
    return with_repeats(timed, fraction, seed)


async def run_one(url: str, arrivals: list[Arrival]) -> tuple[dict[str, Any], float]:
    runner = Runner(Target(url, "sim", metrics_url="off", timeout_s=120))
    await runner.start()
    try:
        result = await runner.open_loop(arrivals)
    finally:
        await runner.close()
    return summarize(result.records, duration_s=result.duration_s), result.duration_s


def measure(redis: RedisServer, tmp: Path, label: str, cache: bool, arrivals: list[Arrival]) -> Measured:
    prefix = f"cb{uuid.uuid4().hex[:8]}"
    env = {
        "BREAKWATER_REDIS_URL": redis.url,
        "BREAKWATER_KEY_PREFIX": prefix,
        "BREAKWATER_LOG_LEVEL": "WARNING",
    }
    port, wport = free_port(), free_port()
    gw = spawn(
        ["gateway", "--port", str(port)],
        {**env, "BREAKWATER_CACHE": str(cache).lower()},
        tmp / f"{prefix}-gw.log",
    )
    worker = spawn(
        ["worker", "--engine", "sim", "--model", "sim"],
        {**env, **WORKER, "BREAKWATER_METRICS_PORT": str(wport)},
        tmp / f"{prefix}-w.log",
    )
    url = f"http://127.0.0.1:{port}"
    metrics_url = f"http://127.0.0.1:{wport}/metrics"
    names = ("breakwater_engine_busy_seconds_total", "breakwater_worker_jobs_total")
    try:
        wait_models(url, "sim")
        assert redis.proc is not None
        pids = {"gateway": gw.pid, "worker": worker.pid, "redis": redis.proc.pid}
        before_cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        before = scrape(metrics_url, names)
        summary, _ = asyncio.run(run_one(url, arrivals))
        time.sleep(0.5)  # the last jobs' acknowledgements
        after = scrape(metrics_url, names)
        cpu = {name: cpu_seconds(pid) - before_cpu[name] for name, pid in pids.items()}
    finally:
        stop([gw, worker])
    return Measured(
        label,
        summary,
        generations=after[names[1]] - before[names[1]],
        gpu_s=after[names[0]] - before[names[0]],
        cpu_s=cpu,
    )


def report(results: list[Measured], args: argparse.Namespace, cmd: str) -> str:
    lines = [
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')}, this machine). One sim worker as a GPU replica "
        f"(capacity 16, {WORKER['BREAKWATER_SIM_DECODE_BASE_MS']} ms + "
        f"{WORKER['BREAKWATER_SIM_DECODE_PER_SEQ_MS']} ms per sequence per step), one gateway, one Redis. "
        f"Poisson arrivals at {args.rates.replace(',', ' and ')} req/s for {args.seconds:g} s, lengths drawn "
        "from the Azure 2023 conversation trace (input ≤ 1024, output ≤ 192 tokens), streamed. "
        "The same schedule for cache off and on. Cost: busy GPU-seconds x "
        f"${args.gpu_hourly:g}/GPU-h + CPU-seconds (gateway, worker, Redis) x ${args.cpu_hourly:g}/vCPU-h, "
        "per 1k delivered output tokens.",
        "",
        "| req/s | repeats | cache | done | hit ratio | generations | out tok/s | TTFT p50 / p99 miss (ms) "
        "| TTFT p50 / p99 hit (ms) | busy GPU-s | CPU-s gw / worker / redis | $ per 1k tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        s = m.summary
        hit = s.get("cache_hit_ratio")
        miss_ttft = (
            s.get("median_ttft_miss_ms", s["median_ttft_ms"]),
            s.get("p99_ttft_miss_ms", s["p99_ttft_ms"]),
        )
        hit_ttft = f"{s['median_ttft_hit_ms']:.1f} / {s['p99_ttft_hit_ms']:.1f}" if hit else "—"
        hit = hit or 0.0
        lines.append(
            f"| {m.label} | {s['completed']}/{s['num_prompts']} | {f'{hit:.0%}' if 'on' in m.label else '—'} "
            f"| {m.generations:.0f} | {s['output_throughput']:.0f} | {miss_ttft[0]:.1f} / {miss_ttft[1]:.1f} "
            f"| {hit_ttft} | {m.gpu_s:.1f} "
            f"| {m.cpu_s['gateway']:.1f} / {m.cpu_s['worker']:.1f} / {m.cpu_s['redis']:.1f} "
            f"| {m.cost_per_1k(args.gpu_hourly, args.cpu_hourly):.5f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="4,6.5", help="req/s: below and above the replica's capacity")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--fractions", default="0,0.1,0.3")
    parser.add_argument("--gpu-hourly", type=float, default=2.0, help="$ per GPU-hour (busy seconds)")
    parser.add_argument("--cpu-hourly", type=float, default=0.04, help="$ per vCPU-hour")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="bw-cache-") as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer(tmp / "redis")
        redis.start()
        try:
            for rate, fraction in itertools.product(
                (float(r) for r in args.rates.split(",")), [float(f) for f in args.fractions.split(",")]
            ):
                arrivals = schedule(rate, args.seconds, fraction, args.seed)
                for cache in (False, True):
                    label = f"{rate:g} | {fraction:.0%} | {'on' if cache else 'off'}"
                    m = measure(redis, tmp, label, cache, arrivals)
                    print(
                        label, m.summary["completed"], m.summary.get("cache_hit_ratio"), m.gpu_s, flush=True
                    )
                    results.append(m)
        finally:
            redis.stop()
    cmd = "python benchmarks/cache.py " + " ".join(sys.argv[1:])
    text = report(results, args, cmd.strip())
    print(text)
    if not args.no_write:
        write_section("cache", text)


if __name__ == "__main__":
    main()
