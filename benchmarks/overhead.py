"""Overhead of the platform: the same sim engine served directly (sim-server) and through
gateway + Redis + worker, side by side in one run.

Reports added TTFT p50/p99 at several request rates, and the highest streamed tokens/s one gateway
process sustains (zero-latency engine, closed loop). Writes its table to docs/benchmarks.md.

    python benchmarks/overhead.py [--rates 10,50,100] [--count 300]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from breakwater.redis_server import RedisServer, free_port
from common import closed_loop, open_loop, pct, spawn, stop, wait_models, write_section

TIMING = {"sim_decode_base_ms": "5", "sim_decode_per_seq_ms": "0.1", "sim_prefill_ms_per_token": "0.02"}


def _env(prefix: str, **extra: str) -> dict[str, str]:
    return {f"BREAKWATER_{k.upper()}": v for k, v in {**TIMING, **extra}.items()} | {
        "BREAKWATER_LOG_LEVEL": "WARNING"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="10,50,100")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--throughput-seconds", type=float, default=15)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    body = {
        "model": "sim",
        "prompt": "measure the overhead of the platform",
        "max_tokens": args.max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }

    tmp = Path(tempfile.mkdtemp(prefix="bw-bench-"))
    redis = RedisServer(tmp / "redis")
    redis.start()
    procs = []
    try:
        direct_port, gw_port = free_port(), free_port()
        env = _env("x", redis_url=redis.url, key_prefix="bench", capacity="256")
        procs.append(
            spawn(["sim-server", "--port", str(direct_port), "--capacity", "256"], env, tmp / "sim.log")
        )
        procs.append(
            spawn(
                ["gateway", "--port", str(gw_port)],
                env | {"BREAKWATER_LANE_MAX_QUEUED": "100000"},
                tmp / "gw.log",
            )
        )
        procs.append(spawn(["worker", "--worker-id", "bench-w0", "--heartbeat-s", "1"], env, tmp / "w0.log"))
        direct, gateway = f"http://127.0.0.1:{direct_port}", f"http://127.0.0.1:{gw_port}"
        wait_models(direct, "sim")
        wait_models(gateway, "sim")
        asyncio.run(open_loop(gateway, 20, 20, body))  # warm up both paths
        asyncio.run(open_loop(direct, 20, 20, body))

        rows = []
        for rate in rates:
            d, _ = asyncio.run(open_loop(direct, rate, args.count, body, seed=1))
            b, _ = asyncio.run(open_loop(gateway, rate, args.count, body, seed=1))
            dt = [r.ttft_s * 1000 for r in d if r.ok]
            bt = [r.ttft_s * 1000 for r in b if r.ok]
            errors = sum(not r.ok for r in d + b)
            rows.append((rate, pct(dt, 50), pct(bt, 50), pct(dt, 99), pct(bt, 99), errors))
            print(
                f"rate {rate}: direct p50 {pct(dt, 50):.2f} ms, breakwater p50 {pct(bt, 50):.2f} ms",
                flush=True,
            )

        # Throughput of one gateway process with a zero-latency engine (the gateway is the bottleneck).
        stop(procs[2:])
        procs = procs[:2]
        fast = _env(
            "x",
            redis_url=redis.url,
            key_prefix="bench",
            capacity="256",
            sim_decode_base_ms="0",
            sim_decode_per_seq_ms="0",
            sim_prefill_ms_per_token="0",
        )
        procs.append(spawn(["worker", "--worker-id", "bench-fast"], fast, tmp / "w1.log"))
        time.sleep(1.0)
        tbody = {**body, "max_tokens": 256}
        res, wall = asyncio.run(closed_loop(gateway, 64, args.throughput_seconds, tbody))
        tok_s = sum(r.tokens for r in res if r.ok) / wall
        print(f"gateway streamed {tok_s:.0f} tokens/s", flush=True)
    finally:
        stop(procs)
        redis.stop()

    cmd = "python benchmarks/overhead.py " + " ".join(sys.argv[1:])
    lines = [
        "## Platform overhead (`benchmarks/overhead.py`)",
        "",
        f"Command: `{cmd.strip()}` — {platform.machine()}, {__import__('os').cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}. Sim engine timing: decode 5 ms + 0.1 ms/sequence per step, "
        f"prefill 0.02 ms/token; {args.max_tokens} output tokens per request; Poisson arrivals, "
        f"{args.count} requests per rate. Direct = `breakwater sim-server`; Breakwater = gateway + Redis + "
        "1 worker running the same engine. Client, servers and Redis share the machine's cores.",
        "",
        "| rate (req/s) | TTFT p50 direct | TTFT p50 Breakwater | added p50 "
        "| TTFT p99 direct | TTFT p99 Breakwater | added p99 | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate, d50, b50, d99, b99, err in rows:
        lines.append(
            f"| {rate:g} | {d50:.2f} ms | {b50:.2f} ms | {b50 - d50:+.2f} ms | {d99:.2f} ms | {b99:.2f} ms "
            f"| {b99 - d99:+.2f} ms | {err} |"
        )
    lines += [
        "",
        f"One gateway process streamed **{tok_s:.0f} tokens/s** (64 concurrent streams, 256 tokens each, "
        "zero-latency sim worker on the same machine).",
    ]
    if not args.no_write:
        write_section("overhead", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
