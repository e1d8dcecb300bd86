"""How fast can one ``breakwater bench`` process send? Constant-rate runs against ``sim-server``
with zero engine latency, rising until the send lag (how late requests leave) passes 1 ms at p99.

    python benchmarks/bench_client.py [--rates 100,200,400,800,1600] [--duration 5] [--output-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from breakwater.bench import Profile, Target, run_profile, summarize
from breakwater.redis_server import free_port
from common import spawn, stop, wait_models, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="100,200,400,800,1600")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    port = free_port()
    tmp = Path("/tmp")
    server = spawn(
        ["sim-server", "--port", str(port), "--sim-decode-base-ms", "0", "--capacity", "100000"],
        {"BREAKWATER_LOG_LEVEL": "WARNING"},
        tmp / f"bench-client-sim-{port}.log",
    )
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_models(url, "sim", 30)
        target = Target(url, "sim", "completions", metrics_url="off")
        for rate in [float(r) for r in args.rates.split(",")]:
            profile = Profile("constant", rate=rate, duration_s=args.duration, input_tokens=16,
                              output_tokens=args.output_tokens)  # fmt: skip
            result = asyncio.run(run_profile(target, profile))
            s = summarize(result.records, duration_s=result.duration_s)
            rows.append((rate, s))
            print(rate, s["completed"], s["failed"], s["p99_send_lag_ms"], s["max_send_lag_ms"], flush=True)
    finally:
        stop([server])
    command = " ".join(["python benchmarks/bench_client.py", *sys.argv[1:]])
    lines = [
        "## Bench client capacity (`benchmarks/bench_client.py`)",
        "",
        f"Command: `{command}`, {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. "
        "One `breakwater bench` process (constant arrivals, streaming completions, "
        f"{args.output_tokens} tokens each) against `breakwater sim-server` with zero engine latency, both "
        "on the same cores. Send lag = how late a request left against its schedule.",
        "",
        "| rate (req/s) | completed / sent | output tok/s | send lag p50 | p99 | max |",
        "|---|---|---|---|---|---|",
    ]
    for rate, s in rows:
        lines.append(
            f"| {rate:g} | {s['completed']} / {s['num_prompts']} | {s['output_throughput']:.0f} | "
            f"{s['p50_send_lag_ms']:.2f} ms | {s['p99_send_lag_ms']:.2f} ms | {s['max_send_lag_ms']:.2f} ms |"
        )
    ok = [rate for rate, s in rows if s["p99_send_lag_ms"] < 1.0 and s["failed"] == 0]
    lines += ["", f"Highest rate with p99 send lag under 1 ms: **{max(ok):g} req/s**." if ok else
              "No rate tried kept the p99 send lag under 1 ms."]  # fmt: skip
    if not args.no_write:
        write_section("bench-client", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
