"""Continuous batching of the llamacpp engine, side by side with llama-cpp-python's own server.

Runs N concurrent streaming chat requests (closed loop, fixed output length) through
gateway + Redis + one llamacpp worker, and, when ``llama_cpp.server`` is importable
(``pip install 'llama-cpp-python[server]'``), against ``python -m llama_cpp.server`` on the same GGUF.
Reports aggregate output tokens/s and TTFT p50/p99 per concurrency and writes docs/benchmarks.md.

    python benchmarks/engines.py [--concurrency 1,4,8,16] [--max-tokens 64] [--requests-per-stream 2]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from breakwater.engines.models import DEFAULT_MODEL, bundled_gguf
from breakwater.redis_server import RedisServer, free_port
from common import pct, spawn, stop, wait_models, write_section

PROMPT = [{"role": "user", "content": "Tell me a short story about a harbor at night."}]


async def _one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> tuple[float, int, float]:
    body: dict[str, Any] = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.8,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = 0.0
    tokens = 0
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = orjson.loads(line[6:])
                if data.get("usage"):
                    tokens = int(data["usage"]["completion_tokens"])
                if data.get("choices") and data["choices"][0]["delta"].get("content"):
                    chunks += 1  # one token per chunk, for servers that send no usage chunk
                    if not first:
                        first = time.perf_counter()
    except httpx.HTTPError:
        return float("nan"), -1, time.perf_counter() - t0  # counted as an error
    return (first or time.perf_counter()) - t0, tokens or chunks, time.perf_counter() - t0


async def run_level(url: str, model: str, streams: int, per_stream: int, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()

        async def loop() -> list[tuple[float, int, float]]:
            return [await _one(client, url, model, max_tokens) for _ in range(per_stream)]

        results = [r for rs in await asyncio.gather(*(loop() for _ in range(streams))) for r in rs]
        wall = time.perf_counter() - start
    ok = [r for r in results if r[1] >= 0]
    ttfts = [r[0] * 1000 for r in ok]
    return {
        "tok_s": sum(r[1] for r in ok) / wall,
        "ttft_p50": pct(ttfts, 50),
        "ttft_p99": pct(ttfts, 99),
        "errors": float(len(results) - len(ok)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    cap = max(levels)
    gguf = bundled_gguf(DEFAULT_MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="bw-engines-"))
    rows: dict[str, dict[int, dict[str, float]]] = {}

    redis = RedisServer(tmp / "redis")
    redis.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env = {
            "BREAKWATER_REDIS_URL": redis.url,
            "BREAKWATER_KEY_PREFIX": "bench",
            "BREAKWATER_LOG_LEVEL": "WARNING",
            "BREAKWATER_LANE_MAX_QUEUED": "10000",
        }
        port = free_port()
        procs.append(spawn(["gateway", "--port", str(port)], env, tmp / "gw.log"))
        procs.append(
            spawn(
                ["worker", "--engine", "llamacpp", "--capacity", str(cap), "--worker-id", "bench"],
                env | {"BREAKWATER_CONTEXT_LENGTH": "1024"},
                tmp / "w.log",
            )
        )
        url = f"http://127.0.0.1:{port}"
        wait_models(url, DEFAULT_MODEL, 120)
        asyncio.run(run_level(url, DEFAULT_MODEL, 1, 1, 8))
        rows["Breakwater (llamacpp engine)"] = {}
        for n in levels:
            rows["Breakwater (llamacpp engine)"][n] = asyncio.run(
                run_level(url, DEFAULT_MODEL, n, args.requests_per_stream, args.max_tokens)
            )
            print(n, rows["Breakwater (llamacpp engine)"][n], flush=True)
    finally:
        stop(procs)
        redis.stop()

    if importlib.util.find_spec("llama_cpp.server") is not None:
        port = free_port()
        with open(tmp / "server.log", "ab") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(gguf),
                    "--port",
                    str(port),
                    "--host",
                    "127.0.0.1",
                    "--n_ctx",
                    "1024",
                    "--model_alias",
                    DEFAULT_MODEL,
                    # the same threads as the worker (its default is half the cores)
                    *("--n_threads", str(os.cpu_count() or 1), "--n_threads_batch", str(os.cpu_count() or 1)),
                    "--interrupt_requests",
                    "False",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_models(url, DEFAULT_MODEL, 120)
            rows["llama-cpp-python server"] = {}
            for n in levels:
                rows["llama-cpp-python server"][n] = asyncio.run(
                    run_level(url, DEFAULT_MODEL, n, args.requests_per_stream, args.max_tokens)
                )
                print("server", n, rows["llama-cpp-python server"][n], flush=True)
        finally:
            stop([server])

    cmd = "python benchmarks/engines.py " + " ".join(sys.argv[1:])
    bw = rows["Breakwater (llamacpp engine)"]
    lines = [
        "## Continuous batching: llamacpp engine (`benchmarks/engines.py`)",
        "",
        f"Command: `{cmd.strip()}` — {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}. "
        f"Model SmolLM2-135M-Instruct Q4_1 (bundled), streaming chat, {args.max_tokens} output tokens "
        f"(`ignore_eos`), {args.requests_per_stream} requests per stream, closed loop.",
        "",
        "| setup | streams | output tok/s | TTFT p50 | TTFT p99 | failed requests |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_level in rows.items():
        for n, r in by_level.items():
            lines.append(
                f"| {name} | {n} | {r['tok_s']:.1f} | {r['ttft_p50']:.0f} ms | {r['ttft_p99']:.0f} ms "
                f"| {r['errors']:.0f} |"
            )
    if 1 in bw and 8 in bw:
        lines += [
            "",
            f"Batching gain: 8 streams give **{bw[8]['tok_s'] / bw[1]['tok_s']:.2f}x** the single-stream "
            "aggregate throughput through Breakwater.",
        ]
    other = rows.get("llama-cpp-python server")
    if other and 8 in other and 8 in bw:
        lines.append(
            f"At 8 streams Breakwater delivers **{bw[8]['tok_s'] / other[8]['tok_s']:.2f}x** the "
            "tokens/s of llama-cpp-python's server on the same model (which serves one request at a time)."
        )
    if not args.no_write:
        write_section("engines", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
