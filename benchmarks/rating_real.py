"""Does a real worker's rating predict what it finishes with its slots full? (issue #18)

A worker whose engine shows its batch steps rates itself (``engines/stepcost.py``): it fits its step
cycle to ``base + per_seq x running + per_token x prompt tokens`` and reports, in its heartbeat, the
jobs/s it would finish with every slot busy at its recent jobs' lengths (``rated``). The gateway's
desired-workers signal takes the lower of that and Little's law (jobs finished per second per running
job, times the slots), so the rating matters when the worker is *not* full: it is a prediction.

This checks the prediction on a real engine (llama.cpp, the bundled SmolLM2-135M, 8 slots) on a fresh
Redis, gateway and worker for each mix of lengths: closed loops of ``k`` concurrent requests for ``k``
below the slots (the batches the worker sees, and what it rates itself at), then twice the slots (every
slot busy and a queue: the capacity, measured). Per phase: jobs finished per second (after a warm-up),
the mean batch, the worker's ``rated`` (median of its heartbeats over the phase's last half) and
Little's law's extrapolation to full slots, which is what the autoscaler would use without a rating.

    .venv/bin/python benchmarks/rating_real.py            # ~11 minutes; writes docs/evaluation.md

Run it alone: the engine uses both cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from breakwater.bench.runner import synth_prompt
from breakwater.engines.models import DEFAULT_MODEL
from breakwater.redis_server import RedisServer, free_port
from common import ROOT, spawn, stop, wait_models, write_section

EVALUATION = ROOT / "docs" / "evaluation.md"
PREFIX = "bench"


@dataclass(frozen=True)
class Mix:
    name: str
    prompt_words: int
    output_tokens: int


MIXES = {
    "decode": Mix("decode-heavy", 24, 64),
    "prefill": Mix("prefill-heavy", 400, 8),
}


@dataclass
class Phase:
    mix: str
    concurrency: int
    jobs_per_s: float = 0.0
    running: float = 0.0  # mean sequences in the engine, from the heartbeats
    rated: float | None = None
    little: float = 0.0  # jobs/s per running job x slots
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0
    errors: int = 0


class Heartbeats(threading.Thread):
    """The worker's heartbeat (``active``, ``rated``) every 0.25 s, timestamped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.done = url, threading.Event()
        self.samples: list[tuple[float, int, float | None]] = []

    def run(self) -> None:
        r = redis.Redis.from_url(self.url)
        while not self.done.wait(0.25):
            for raw in r.hgetall(f"{PREFIX}:workers").values():
                info = orjson.loads(raw)
                self.samples.append((time.monotonic(), int(info.get("active", 0)), info.get("rated")))
        r.close()

    def between(self, a: float, b: float) -> list[tuple[float, int, float | None]]:
        return [s for s in self.samples if a <= s[0] <= b]


async def closed_loop(
    url: str, mix: Mix, concurrency: int, seconds: float
) -> list[tuple[float, int, int, bool]]:
    """``concurrency`` clients, each sending its next request when the last one ends, until the
    deadline; (finished at, prompt tokens, output tokens, ok) per request."""
    done: list[tuple[float, int, int, bool]] = []
    deadline = time.monotonic() + seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        n = 0
        while time.monotonic() < deadline:
            body = {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": synth_prompt(mix.prompt_words, index * 1000 + n)}],
                "max_tokens": mix.output_tokens,
                "ignore_eos": True,
                "temperature": 0.8,
            }
            n += 1
            try:
                resp = await http.post(f"{url}/v1/chat/completions", json=body)
                usage = resp.json()["usage"] if resp.status_code == 200 else None
            except httpx.HTTPError:
                usage = None
            now = time.monotonic()
            if usage:
                done.append((now, int(usage["prompt_tokens"]), int(usage["completion_tokens"]), True))
            else:
                done.append((now, 0, 0, False))

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
    return done


def run_mix(mix: Mix, levels: list[int], args: argparse.Namespace, tmp: Path) -> list[Phase]:
    server = RedisServer(tmp / f"redis-{mix.name}")
    server.start()
    procs = []
    phases: list[Phase] = []
    beats: Heartbeats | None = None
    try:
        beats = Heartbeats(server.url)
        env = {
            "BREAKWATER_REDIS_URL": server.url,
            "BREAKWATER_KEY_PREFIX": PREFIX,
            "BREAKWATER_LOG_LEVEL": "WARNING",
            "BREAKWATER_HEARTBEAT_S": "0.5",
            "BREAKWATER_CONTEXT_LENGTH": "1024",
        }
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        procs.append(spawn(["gateway", "--port", str(port)], env, tmp / f"gw-{mix.name}.log"))
        worker = ["worker", "--worker-id", "rated", "--engine", "llamacpp", "--capacity", str(args.slots)]
        procs.append(spawn(worker, env, tmp / f"w-{mix.name}.log"))
        wait_models(url, DEFAULT_MODEL, 300)
        beats.start()
        for k in levels:
            began = time.monotonic()
            results = asyncio.run(closed_loop(url, mix, k, args.seconds))
            ended = began + args.seconds
            counted = [r for r in results if began + args.warmup_s <= r[0] <= ended and r[3]]
            window = args.seconds - args.warmup_s
            phase = Phase(mix.name, k, errors=sum(1 for r in results if not r[3]))
            phase.jobs_per_s = len(counted) / window
            busy = [s[1] for s in beats.between(began + args.warmup_s, ended)]
            phase.running = statistics.fmean(busy) if busy else 0.0
            rated = [s[2] for s in beats.between(began + args.seconds / 2, ended) if s[2]]
            phase.rated = statistics.median(rated) if rated else None
            if phase.running > 0:
                phase.little = phase.jobs_per_s / phase.running * args.slots
            if counted:
                phase.prompt_tokens = statistics.fmean(r[1] for r in counted)
                phase.output_tokens = statistics.fmean(r[2] for r in counted)
            phases.append(phase)
            print(phase, flush=True)
    finally:
        if beats is not None:
            beats.done.set()
        stop(procs)
        server.stop()
    return phases


def table(phases: list[Phase], slots: int) -> list[str]:
    lines = [
        "| mix (prompt / output tokens) | concurrent requests | running, mean | jobs/s finished "
        "| the worker's rating, jobs/s | Little's law to full slots, jobs/s | rating / measured at full "
        "| Little / measured at full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mix in dict.fromkeys(p.mix for p in phases):
        rows = [p for p in phases if p.mix == mix]
        full = max(rows, key=lambda p: p.concurrency)
        for p in rows:
            lengths = f"{mix} ({p.prompt_tokens:.0f} / {p.output_tokens:.0f})"
            rated = f"{p.rated:.2f}" if p.rated else "none yet"
            ratio = f"{p.rated / full.jobs_per_s:.2f}" if p.rated and full.jobs_per_s else "—"
            little = f"{p.little / full.jobs_per_s:.2f}" if full.jobs_per_s else "—"
            measured = f"**{p.jobs_per_s:.2f}** (capacity)" if p is full else f"{p.jobs_per_s:.2f}"
            lines.append(
                f"| {lengths} | {p.concurrency} | {p.running:.1f} of {slots} | {measured} | {rated} "
                f"| {p.little:.2f} | {ratio} | {little} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mixes", default="decode,prefill", help=f"of {','.join(MIXES)}")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--levels", default="2,4,6", help="concurrent requests below the slots")
    parser.add_argument("--seconds", type=float, default=60.0, help="per phase")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="not counted, per phase")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    levels = [int(k) for k in args.levels.split(",")] + [2 * args.slots]
    began = time.monotonic()
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.mixes.split(","):
            phases += run_mix(MIXES[name], levels, args, Path(folder))
    lines = table(phases, args.slots)
    print("\n".join(lines))
    if args.no_write:
        return
    errors = sum(p.errors for p in phases)
    body = f"""## A real worker's rating against its measured capacity (issue #18)

`python benchmarks/rating_real.py`, {platform.machine()}, {os.cpu_count()} cores, {time.strftime("%Y-%m-%d")},
{time.monotonic() - began:.0f} s, {errors} failed requests. One `llamacpp` worker (the bundled
SmolLM2-135M, {args.slots} slots, both cores), a gateway and a fresh Redis per mix; closed loops
of N concurrent chat requests (`ignore_eos`) for {args.seconds:g} s each, the first
{args.warmup_s:g} s not counted. The rating: the worker's heartbeat `rated` (median over the
phase's second half); Little's law: jobs/s finished per running job times the slots, the gateway's
estimate without a rating. The row at {2 * args.slots} concurrent requests has every slot busy and
a queue: its jobs/s is the capacity the rows above predict. The phases run in this order on one
worker, so each rating also holds the steps of the phases before it (old steps fade with a
half-life of 4,000 steps, ~1,500 steps a decode-heavy phase), as a worker's history would.

{chr(10).join(lines)}
"""
    write_section("rating-real", body, EVALUATION)
    print(f"wrote {EVALUATION}")


if __name__ == "__main__":
    main()
