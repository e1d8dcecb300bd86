"""Engines side by side: Breakwater's engines against the same engine's own OpenAI server.

Runs N concurrent streaming chat requests (closed loop, fixed output length) per setup and reports
aggregate output tokens/s and TTFT p50/p99 per concurrency:

- ``llama``: gateway + Redis + one llamacpp worker, then ``python -m llama_cpp.server`` on the same GGUF
  (section ``engines`` of docs/benchmarks.md);
- ``vllm``: vLLM's own server (direct), Breakwater with the in-process vLLM engine, and Breakwater with
  the ``openai`` engine in front of vLLM's server (the sidecar shape), all with the same model folder,
  ``max_num_seqs`` and KV cache; needs ``make vllm-env`` (section ``engines-vllm``).

    python benchmarks/engines.py llama [--concurrency 1,4,8,16] [--max-tokens 64] [--requests-per-stream 2]
    python benchmarks/engines.py vllm [--concurrency 1,8,32] [--max-tokens 64] [--requests-per-stream 2]
        [--vllm-dtype float32] [--vllm-cores N] [--baseline-src DIR --rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from breakwater.engines.models import DEFAULT_MODEL, bundled_gguf
from breakwater.protocol.sse_lines import sse_lines
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
            async for line in sse_lines(resp):
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


VLLM_PYTHON = str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python")


def vllm_env(cores: int) -> dict[str, str]:
    """vLLM's settings, its model computed by threads bound to the first ``cores`` cores."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }


Rows = dict[str, dict[int, dict[str, float]]]
DIRECT = "vLLM server (direct)"


def measure(name: str, url: str, levels: list[int], args: argparse.Namespace, rows: Rows) -> None:
    wait_models(url, DEFAULT_MODEL, 600)
    # warm up at the highest concurrency, so no setup's first level is the one that pays for it
    asyncio.run(run_level(url, DEFAULT_MODEL, max(levels), 1, 8))
    rows[name] = {}
    for n in levels:
        rows[name][n] = asyncio.run(
            run_level(url, DEFAULT_MODEL, n, args.requests_per_stream, args.max_tokens)
        )
        print(name, n, rows[name][n], flush=True)


@contextmanager
def breakwater(
    tmp: Path, worker_args: list[str], worker_env: dict[str, str], python: str, *, embedded: bool = False
) -> Iterator[str]:
    """Redis + gateway + one worker (or, ``embedded``, the worker inside the gateway); yields its URL."""
    redis = RedisServer(tmp / f"redis-{free_port()}")
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
        if embedded:
            argv = ["gateway", "--port", str(port), "--embed-engine", *worker_args[1:]]
            procs.append(spawn(argv, env | worker_env, tmp / "gw.log", python))
        else:
            procs.append(spawn(["gateway", "--port", str(port)], env, tmp / "gw.log"))
            argv = ["worker", "--worker-id", "bench", *worker_args]
            procs.append(spawn(argv, env | worker_env, tmp / "w.log", python))
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(procs)
        redis.stop()


@contextmanager
def server(tmp: Path, argv: list[str], env: dict[str, str], name: str) -> Iterator[str]:
    port = free_port()
    with open(tmp / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop([proc])


def run_llama(tmp: Path, levels: list[int], args: argparse.Namespace) -> Rows:
    rows: Rows = {}
    gguf = bundled_gguf(DEFAULT_MODEL)
    worker = ["--engine", "llamacpp", "--capacity", str(max(levels))]
    with breakwater(tmp, worker, {"BREAKWATER_CONTEXT_LENGTH": "1024"}, sys.executable) as url:
        measure("Breakwater (llamacpp engine)", url, levels, args, rows)
    if importlib.util.find_spec("llama_cpp.server") is not None:
        threads = str(os.cpu_count() or 1)
        argv = [
            *(sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", "1024"),
            *("--model_alias", DEFAULT_MODEL, "--interrupt_requests", "False"),
            # the same threads as the worker (its default is half the cores)
            *("--n_threads", threads, "--n_threads_batch", threads),
        ]
        with server(tmp, argv, {}, "llama-server") as url:
            measure("llama-cpp-python server", url, levels, args, rows)
    return rows


def run_vllm(tmp: Path, levels: list[int], args: argparse.Namespace) -> Rows:
    rows: Rows = {}
    prepared = subprocess.run(
        [VLLM_PYTHON, "-m", "breakwater", "models", "prepare", DEFAULT_MODEL],
        capture_output=True,
        text=True,
        check=True,
    )
    model_dir = prepared.stdout.strip().splitlines()[-1]
    seqs = str(max(levels))
    argv = [
        *(VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir),
        *("--served-model-name", DEFAULT_MODEL, "--max-model-len", "1024", "--max-num-seqs", seqs),
        *("--enforce-eager", "--dtype", args.vllm_dtype),
    ]
    env = vllm_env(args.vllm_cores)
    # This tree's sidecar, and with --baseline-src another checkout's, measured against one vLLM
    # server; with --rounds, again, each round in the reverse order of the last (the machine drifts
    # and the later runs of a round find it warmer): direct first, then last.
    versions: list[tuple[str, dict[str, str]]] = [("", {})]
    if args.baseline_src:
        versions.append((" (before)", {"PYTHONPATH": str(Path(args.baseline_src).resolve() / "src")}))
    with server(tmp, argv, env, "vllm-server") as vllm_url:
        sidecar = ["--engine", "openai", "--upstream-url", f"{vllm_url}/v1", "--capacity", seqs]
        setups: list[tuple[str, dict[str, str] | None, bool]] = [(DIRECT, None, False)]
        for tag, tag_env in versions:
            setups.append((f"Breakwater + vLLM sidecar (openai engine){tag}", tag_env, False))
            # the same engine as a worker inside the gateway process (`gateway --embed-engine openai`)
            setups.append((f"Breakwater + vLLM sidecar (engine in the gateway){tag}", tag_env, True))
        for n in range(args.rounds):
            suffix = f" · round {n + 1}" if args.rounds > 1 else ""
            for name, version_env, embedded in setups if n % 2 == 0 else setups[::-1]:
                if version_env is None:
                    measure(f"{name}{suffix}", vllm_url, levels, args, rows)
                    continue
                with breakwater(tmp, sidecar, version_env, sys.executable, embedded=embedded) as url:
                    measure(f"{name}{suffix}", url, levels, args, rows)
    if args.baseline_src:
        return rows  # an A/B of the sidecar; the in-process engine does not change with it
    inproc = ["--engine", "vllm", "--capacity", seqs, "--context-length", "1024"]
    inproc_env = env | {"BREAKWATER_VLLM_ARGS": json.dumps({"dtype": args.vllm_dtype})}
    with breakwater(tmp, inproc, inproc_env, VLLM_PYTHON) as url:
        measure("Breakwater + vLLM in-process (vllm engine)", url, levels, args, rows)
    return rows


def table(rows: Rows) -> list[str]:
    lines = [
        "| setup | streams | output tok/s | TTFT p50 | TTFT p99 | failed requests |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_level in rows.items():
        for n, r in by_level.items():
            lines.append(
                f"| {name} | {n} | {r['tok_s']:.1f} | {r['ttft_p50']:.0f} ms | {r['ttft_p99']:.0f} ms "
                f"| {r['errors']:.0f} |"
            )
    return lines


def ratio_lines(rows: Rows, base: str, levels: list[int]) -> list[str]:
    """Each setup against ``base`` (of the same round, when there are rounds)."""
    out = []
    for name, by_level in rows.items():
        if name.startswith(base):
            continue
        _, sep, round_ = name.partition(" · ")
        # the same round's; a setup measured once (in-process, after the rounds) against the last
        ref = rows.get(base + sep + round_) or next(
            (r for k, r in reversed(rows.items()) if k.startswith(base)), {}
        )
        for n in levels:
            if n in by_level and n in ref:
                r, b = by_level[n], ref[n]
                out.append(
                    f"- {name} at {n} streams: **{r['tok_s'] / b['tok_s']:.2f}x** the tokens/s of {base}, "
                    f"TTFT p50 {r['ttft_p50'] / b['ttft_p50']:.2f}x."
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suite", choices=["llama", "vllm"])
    parser.add_argument("--concurrency", default=None, help="default: llama 1,4,8,16; vllm 1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument(
        "--vllm-dtype",
        default="float32",
        help="vLLM's --dtype for all its setups: bfloat16 on a CPU without AVX512-BF16 (this one: AVX2) "
        "falls back from oneDNN to a slow matmul",
    )
    parser.add_argument(
        "--vllm-cores",
        type=int,
        default=os.cpu_count() or 1,
        help="vLLM computes on the first N cores; fewer than all pins everything else (this client, vLLM's "
        "API server and scheduler, Breakwater) to the rest, a GPU node's shape (default: all, shared)",
    )
    parser.add_argument(
        "--baseline-src", default=None, help="vllm: also the sidecar of this checkout (an A/B; no in-process)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="vllm: direct and sidecar(s) this many times")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.vllm_cores <= (os.cpu_count() or 1):
        parser.error(f"--vllm-cores: 1 to {os.cpu_count()}")
    default = "1,4,8,16" if args.suite == "llama" else "1,8,32"
    levels = [int(c) for c in (args.concurrency or default).split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bw-engines-"))
    cores = os.cpu_count() or 1
    if args.suite == "vllm" and args.vllm_cores < cores:  # children inherit it; vLLM binds its own threads
        os.sched_setaffinity(0, range(args.vllm_cores, cores))
    cmd = "python benchmarks/engines.py " + " ".join(sys.argv[1:])
    env_line = (
        f"Command: `{cmd.strip()}`, {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}. "
        f"Model SmolLM2-135M-Instruct, streaming chat, {args.max_tokens} output tokens (`ignore_eos`), "
        f"{args.requests_per_stream} requests per stream, closed loop."
    )
    if args.suite == "llama":
        rows = run_llama(tmp, levels, args)
        bw = rows["Breakwater (llamacpp engine)"]
        lines = [
            "## Continuous batching: llamacpp engine (`benchmarks/engines.py llama`)",
            "",
            env_line + " GGUF Q4_1 (bundled).",
            "",
            *table(rows),
        ]
        if 1 in bw and 8 in bw:
            lines += [
                "",
                f"Batching gain: 8 streams give **{bw[8]['tok_s'] / bw[1]['tok_s']:.2f}x** the single-stream "
                "aggregate throughput through Breakwater.",
            ]
        lines += ["", *ratio_lines(rows, "Breakwater (llamacpp engine)", levels)]
        section = "engines"
    else:
        rows = run_vllm(tmp, levels, args)
        lines = [
            "## vLLM: direct vs through Breakwater (`benchmarks/engines.py vllm`)",
            "",
            env_line
            + " vLLM (`vllm-cpu` 0.32, eager) on the bf16 folder made by `breakwater models prepare`, "
            f"run as `--dtype {args.vllm_dtype}`, `max_num_seqs` {max(levels)}, 2 GiB KV cache, for every "
            "setup; "
            + (
                "its compute shares every core with the rest."
                if args.vllm_cores >= cores
                else f"its compute on {args.vllm_cores} core(s) of its own, all else on the other(s)."
            ),
            "",
            *table(rows),
            "",
            *ratio_lines(rows, DIRECT, levels),
        ]
        section = "engines-vllm"
    if not args.no_write:
        write_section(section, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
