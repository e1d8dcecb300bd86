"""Fair share between tenants, side by side with FIFO, on one sim worker.

Tenants A and B each have an API key; one sim worker (capacity 8, answers of 16-48 tokens, 10 ms
steps) serves them, so the layer holds about 20 requests a second. Scenarios, each on a fresh stack:

- ``b_alone``: B alone at 3 req/s — B's TTFT when nobody else is there;
- ``flood``: A at 10x B's rate (30 req/s, 1.5x what the worker holds) while B sends 3 req/s — B's TTFT;
- ``equal``: both past capacity (30 req/s each, 3x together), equal weights — each one's share of
  output tokens;
- ``weighted``: the same with A's key at weight 3 — A's share;
- ``idle``: A alone far past capacity — its tokens per second against ``equal``'s total (nothing is
  left unused when B is idle).

"no preemption" is this checkout with ``BREAKWATER_PREEMPT=false`` (B waits for a slot to free).
"FIFO" is another checkout (``--baseline-src``, e.g. the commit before fair share) run the same way.

    python benchmarks/fairness.py [--seconds 20] [--baseline-src DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from breakwater.protocol.sse_lines import sse_lines
from breakwater.redis_server import RedisServer, free_port
from common import pct, spawn, stop, write_section

PEPPER = "fairness-benchmark-pepper-0123456789"
CAPACITY = 8
TOKENS = 32
B_RATE = 3.0
FLOOD_RATE = 30.0


@dataclass
class Tenant:
    name: str
    key: str = ""
    ttft_s: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    refused: int = 0
    failed: int = 0


@dataclass
class Stack:
    url: str
    procs: list[subprocess.Popen[bytes]]
    redis: RedisServer
    env: dict[str, str]


def start(src: Path | None, tmp: Path, extra_env: dict[str, str]) -> Stack:
    redis = RedisServer(tmp / "redis")
    redis.start()
    env = {
        "BREAKWATER_REDIS_URL": redis.url,
        "BREAKWATER_KEY_PREFIX": "fair",
        "BREAKWATER_LOG_LEVEL": "WARNING",
        "BREAKWATER_AUTH": "keys",
        "BREAKWATER_AUTH_PEPPER": PEPPER,
        "BREAKWATER_LANE_MAX_QUEUED": "100000",
        "BREAKWATER_SIM_DECODE_BASE_MS": "10",
        "BREAKWATER_SIM_DECODE_PER_SEQ_MS": "0",
        "BREAKWATER_SIM_PREFILL_MS_PER_TOKEN": "0",
        "BREAKWATER_SIM_JITTER_FRAC": "0",
        **({"PYTHONPATH": str(src / "src")} if src else {}),
        **extra_env,
    }
    port = free_port()
    procs = [
        spawn(["gateway", "--port", str(port)], env, tmp / "gw.log"),
        spawn(
            ["worker", "--engine", "sim", "--model", "sim", "--capacity", str(CAPACITY)], env, tmp / "w.log"
        ),
    ]
    return Stack(f"http://127.0.0.1:{port}", procs, redis, env)


def create_key(stack: Stack, tenant: str, weight: float) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "breakwater", "keys", "create", "--tenant", tenant, "--weight", str(weight)],
        env={**os.environ, **stack.env},
        capture_output=True,
        check=True,
    )
    return str(orjson.loads(out.stdout)["key"])


def wait_ready(stack: Stack, key: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = httpx.get(f"{stack.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=2)
            if any(m["id"] == "sim" for m in data.json().get("data", [])):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError("the stack did not serve `sim` in time")


async def one(client: httpx.AsyncClient, url: str, tenant: Tenant, seed: int) -> None:
    length = random.Random(f"{tenant.name}{seed}").randint(TOKENS // 2, TOKENS * 3 // 2)
    body = {"model": "sim", "prompt": f"{tenant.name} asks", "max_tokens": length, "ignore_eos": True,
            "stream": True, "seed": seed}  # fmt: skip
    t0 = time.perf_counter()
    first = True
    try:
        async with client.stream(
            "POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {tenant.key}"}
        ) as resp:
            if resp.status_code != 200:
                await resp.aread()
                tenant.refused += resp.status_code == 429
                tenant.failed += resp.status_code != 429
                return
            async for line in sse_lines(resp):
                if not line.startswith("data: {"):
                    continue
                choices = orjson.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("text"):
                    now = time.perf_counter()
                    tenant.token_times.append(now)
                    if first:
                        tenant.ttft_s.append(now - t0)
                        first = False
    except httpx.HTTPError:
        tenant.failed += 1


async def send(url: str, tenant: Tenant, rate: float, seconds: float, client: httpx.AsyncClient) -> None:
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    i = 0
    while (at := i / rate) < seconds:  # evenly spaced: the comparison is between systems, not arrivals
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(client, url, tenant, i)))
        i += 1
    await asyncio.wait(tasks, timeout=15)  # those still waiting past this are the flood's backlog
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def run(url: str, load: list[tuple[Tenant, float]], seconds: float) -> float:
    limits = httpx.Limits(max_connections=10_000, max_keepalive_connections=10_000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(send(url, t, rate, seconds, client) for t, rate in load))
    return start


def scenario(
    src: Path | None, env: dict[str, str], name: str, seconds: float, weights: dict[str, float]
) -> dict[str, Any]:
    rates = {
        "b_alone": {"B": B_RATE},
        "flood": {"A": FLOOD_RATE, "B": B_RATE},
        "equal": {"A": FLOOD_RATE, "B": FLOOD_RATE},
        "weighted": {"A": FLOOD_RATE, "B": FLOOD_RATE},
        "idle": {"A": FLOOD_RATE},
    }[name]
    tmp = Path(tempfile.mkdtemp(prefix=f"bw-fair-{name}-"))
    stack = start(src, tmp, env)
    try:
        tenants = {t: Tenant(t, create_key(stack, f"tenant-{t.lower()}", weights.get(t, 1.0))) for t in rates}
        wait_ready(stack, next(iter(tenants.values())).key)
        begin = asyncio.run(run(stack.url, [(tenants[t], r) for t, r in rates.items()], seconds))
    finally:
        stop(stack.procs)
        stack.redis.stop()
    # Shares over the part of the run where every sender had a backlog (after a quarter of it).
    lo, hi = begin + seconds / 4, begin + seconds
    counted = {t: sum(lo <= x < hi for x in tenant.token_times) for t, tenant in tenants.items()}
    total = sum(counted.values()) or 1
    return {
        "ttft": {t: (pct(x.ttft_s, 50), pct(x.ttft_s, 99)) for t, x in tenants.items()},
        "answered": {t: len(x.ttft_s) for t, x in tenants.items()},
        "share": {t: counted[t] / total for t in tenants},
        "tokens_per_s": total / (hi - lo),
        "refused": {t: x.refused for t, x in tenants.items()},
        "failed": {t: x.failed for t, x in tenants.items()},
    }


def measure(src: Path | None, seconds: float, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    plan = [("b_alone", {}), ("flood", {}), ("equal", {}), ("weighted", {"A": 3.0}), ("idle", {})]
    return {name: scenario(src, env or {}, name, seconds, weights) for name, weights in plan}


def report(systems: dict[str, dict[str, dict[str, Any]]], seconds: float, cmd: str) -> str:
    lines = [
        f"{platform.machine()}, {os.cpu_count()} cores; one sim worker (capacity {CAPACITY}, answers of "
        f"{TOKENS // 2}-{TOKENS * 3 // 2} tokens, 10 ms steps: ~20 req/s); {seconds:g} s of evenly spaced "
        "arrivals per scenario, each on a fresh stack; shares count output tokens received after the first "
        "quarter of the run.",
        "",
        "| system | B alone: B TTFT p50 / p99 | A floods (10x B): B TTFT p50 / p99 | B p99 vs alone "
        "| equal weights: A / B share | weights 3:1: A share | A alone vs both: tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, r in systems.items():
        alone, flood = r["b_alone"]["ttft"]["B"], r["flood"]["ttft"]["B"]
        eq, wt = r["equal"]["share"], r["weighted"]["share"]
        idle_tps, both_tps = r["idle"]["tokens_per_s"], r["equal"]["tokens_per_s"]
        lines.append(
            f"| {system} | {alone[0] * 1000:.0f} / {alone[1] * 1000:.0f} ms | {flood[0] * 1000:.0f} / "
            f"{flood[1] * 1000:.0f} ms | {flood[1] / alone[1]:.2f}x | {eq['A']:.1%} / {eq['B']:.1%} | "
            f"{wt['A']:.1%} | {idle_tps:.0f} vs {both_tps:.0f} |"
        )
    answered = {s: (r["b_alone"]["answered"]["B"], r["flood"]["answered"]["B"]) for s, r in systems.items()}
    refusals = {s: {n: r[n]["refused"] for n in r} for s, r in systems.items()}
    failures = {s: {n: r[n]["failed"] for n in r} for s, r in systems.items()}
    lines += [
        "",
        f"B's answers timed (alone, under the flood): {answered}",
        f"429s per scenario: {refusals}",
        f"other failures: {failures}",
        "",
        f"Command: `{cmd}`",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--baseline-src", type=Path, help="a checkout without fair share, run as FIFO")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    systems = {
        "fair share (this checkout)": measure(None, args.seconds),
        "fair share, no preemption": measure(None, args.seconds, {"BREAKWATER_PREEMPT": "false"}),
    }
    if args.baseline_src:
        systems["FIFO (baseline)"] = measure(args.baseline_src, args.seconds)
    text = report(systems, args.seconds, "python benchmarks/fairness.py " + " ".join(sys.argv[1:]))
    print(text)
    if not args.no_write:
        write_section("fairness", text)


if __name__ == "__main__":
    main()
