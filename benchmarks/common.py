"""Shared benchmark plumbing: process control, a streaming client, percentiles, docs sections."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from breakwater.protocol.sse_lines import sse_lines

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"


def spawn(
    args: list[str], env: dict[str, str], log: Path, python: str = sys.executable
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [python, "-m", "breakwater", *args],
            env={**os.environ, **env},
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` to ``cpus`` (as ``taskset -a`` would; one already gone is skipped)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def wait_models(url: str, model: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = httpx.get(f"{url}/v1/models", timeout=1).json()["data"]
            if any(m["id"] == model for m in data):
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not list {model} within {timeout_s}s")


@dataclass
class Result:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    tokens: int = 0
    error: str = ""
    itl_s: list[float] = field(default_factory=list)
    body_bytes: int = 0  # the response body's bytes as sent (HTTP framing and headers not counted)


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Result:
    """One streaming completion; TTFT is the first chunk with text, tokens counted from usage."""
    t0 = time.perf_counter()
    first = 0.0
    last = 0.0
    tokens = 0
    itl: list[float] = []
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Result(False, error=f"HTTP {resp.status_code}")
            async for line in sse_lines(resp):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = orjson.loads(line[6:])
                now = time.perf_counter()
                if data.get("usage"):
                    tokens = int(data["usage"]["completion_tokens"])
                if data.get("choices") and data["choices"][0].get("text"):
                    if not first:
                        first = now
                    else:
                        itl.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        return Result(False, error=type(exc).__name__)
    end = time.perf_counter()
    ttft = first - t0 if first else end - t0
    return Result(True, ttft, end - t0, tokens, itl_s=itl, body_bytes=resp.num_bytes_downloaded)


async def open_loop(
    url: str, rate: float, count: int, body: dict[str, Any], seed: int = 0
) -> tuple[list[Result], float]:
    """Poisson arrivals at ``rate`` req/s; returns results and wall time."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        at = 0.0
        for i in range(count):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_one(client, url, {**body, "seed": i})))
            at += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


async def closed_loop(
    url: str, concurrency: int, duration_s: float, body: dict[str, Any]
) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    results: list[Result] = []
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()

        async def loop(k: int) -> None:
            i = 0
            while time.perf_counter() - start < duration_s:
                results.append(await stream_one(client, url, {**body, "seed": k * 100_000 + i}))
                i += 1

        await asyncio.gather(*(loop(k) for k in range(concurrency)))
        return results, time.perf_counter() - start


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def write_section(name: str, body: str, path: Path = DOCS) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    path.parent.mkdir(exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
