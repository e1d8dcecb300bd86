"""What one request costs Breakwater's processes, per process: CPU milliseconds per request at short
streams, where the per-request path (admission, claim, start, finish, subscribe) is most of the work.

The stack is ``benchmarks/peers.py``'s (gateway, an ``openai`` worker and Redis on CPU 1; a fake
backend that answers at once and the open-loop client on CPU 0). Each round runs this tree and,
with ``--baseline-src``, another checkout, one after the other (the order alternates between
rounds): this machine's speed drifts within a session, so only runs of one sitting compare. CPU is
utime+stime from /proc over the window (10 ms ticks: at 600 requests, ~0.02 ms per request).

    python benchmarks/request_cost.py [--baseline-src DIR] [--rounds 2] [--rate 40] [--seconds 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis

from breakwater.redis_server import free_port
from common import pct, write_section
from load_client import open_loop
from peers import CLIENT_CPU, MODEL, SUT_CPU, WARM_UP, Instance, _run, cpu_ticks, start_breakwater

PROCESSES = ("gateway", "worker", "redis")


def measure(
    label: str, src: Path | None, backend: Instance, args: argparse.Namespace, tmp: Path
) -> dict[str, float]:
    """One stack of ``src`` (None: this tree): CPU ms per completed request, per process."""
    inst = start_breakwater(src, tcp=args.redis_tcp)(backend.port, tmp)
    try:
        inst.wait_ready()
        _run(open_loop("127.0.0.1", inst.port, WARM_UP, 20, 1.0, 10, seed=7))
        body = {"model": MODEL, "prompt": "what does a request cost", "stream": True}
        body["max_tokens"] = args.max_tokens
        pids = inst.pids()
        before = {name: cpu_ticks(pids[name]) for name in PROCESSES}
        stats0 = _commandstats(inst)
        result = _run(open_loop("127.0.0.1", inst.port, body, args.rate, args.seconds, 15, seed=11))
        tick = os.sysconf("SC_CLK_TCK")
        cpu = {name: (cpu_ticks(pids[name]) - before[name]) / tick for name in PROCESSES}
        stats1 = _commandstats(inst)
    finally:
        inst.stop()
    done = [o for o in result.outcomes if o.ok]
    if args.commands:
        _print_commands(stats0, stats1, max(len(done), 1))
    row = {f"{name}_ms": 1000 * cpu[name] / max(len(done), 1) for name in PROCESSES}
    row["layer_ms"] = sum(row[f"{name}_ms"] for name in PROCESSES)
    row["requests"] = len(done)
    row["errors"] = len(result.outcomes) - len(done) + result.unfinished
    row["ttft_p50_ms"] = pct([o.ttft_s * 1000 for o in done], 50)
    print(
        f"  {label}: {len(done)} requests, gateway {row['gateway_ms']:.2f} · worker {row['worker_ms']:.2f} · "
        f"redis {row['redis_ms']:.2f} ms each, TTFT p50 {row['ttft_p50_ms']:.1f} ms",
        flush=True,
    )
    return row


def _commandstats(inst: Instance) -> dict[str, tuple[int, int]]:
    """Redis's calls and microseconds so far, per command (INFO commandstats)."""
    assert inst.redis is not None
    client = redis.Redis.from_url(inst.redis.url)
    try:
        info = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in info.items()}


def _print_commands(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], n: int) -> None:
    """Per request: calls and Redis-side microseconds of each command (scripts' inner ones too)."""
    rows: list[tuple[float, float, str]] = []
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        if calls > c0:
            rows.append(((usec - u0) / n, (calls - c0) / n, name))
    for per_usec, per_calls, name in sorted(rows, reverse=True):
        print(f"    {name:<24} {per_calls:6.2f} calls {per_usec:7.1f} us per request", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-src", type=Path, help="another checkout, run as 'before'")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=40, help="requests per second")
    parser.add_argument("--seconds", type=float, default=15, help="of arrivals per run")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument(
        "--redis-tcp",
        action="store_true",
        help="reach Redis over TCP (default: its unix socket, as `breakwater up`; a checkout before "
        "2026-12-05 needs TCP)",
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--commands", action="store_true", help="print Redis's commands per request (INFO commandstats)"
    )
    args = parser.parse_args()
    if not {CLIENT_CPU, SUT_CPU} <= os.sched_getaffinity(0):
        sys.exit(f"needs CPUs {CLIENT_CPU} and {SUT_CPU}; this process may use {os.sched_getaffinity(0)}")
    os.sched_setaffinity(0, {CLIENT_CPU})
    versions: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.baseline_src:
        versions.append(("before", args.baseline_src.resolve()))
    tmp = Path(tempfile.mkdtemp(prefix="bw-cost-"))
    backend = Instance(free_port())
    fake = [sys.executable, str(Path(__file__).with_name("fake_openai.py")), "--port", str(backend.port)]
    backend.launch("fake", [*fake, "--model", MODEL, "--ttft-ms", "0", "--itl-ms", "0"], tmp / "fake.log")
    rows: list[tuple[int, str, dict[str, float]]] = []
    try:
        backend.wait_ready(30)
        direct = _run(
            open_loop(
                "127.0.0.1", backend.port, {**WARM_UP, "max_tokens": args.max_tokens}, args.rate, 5, 10, 3
            )
        )
        base_ttft = pct([o.ttft_s * 1000 for o in direct.outcomes if o.ok], 50)
        for n in range(args.rounds):
            order = versions if n % 2 == 0 else versions[::-1]
            for label, src in order:
                rows.append((n + 1, label, measure(label, src, backend, args, tmp)))
    finally:
        backend.stop()
    lines = [
        "| round | version | requests (errors) | CPU ms per request: gateway · worker · redis | layer | "
        "added TTFT p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for n, label, r in rows:
        lines.append(
            f"| {n} | {label} | {r['requests']:.0f} ({r['errors']:.0f}) | {r['gateway_ms']:.2f} · "
            f"{r['worker_ms']:.2f} · {r['redis_ms']:.2f} | {r['layer_ms']:.2f} | "
            f"+{r['ttft_p50_ms'] - base_ttft:.1f} |"
        )
    cmd = "python benchmarks/request_cost.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "### The cost of one request (`benchmarks/request_cost.py`)",
            "",
            f"Command: `{cmd.strip()}`, {time.strftime('%Y-%m-%d')}. {args.max_tokens}-token streams at "
            f"{args.rate:g} req/s for {args.seconds:g} s a run; the fake backend answers at once "
            f"(direct TTFT p50 {base_ttft:.1f} ms); Breakwater's processes on CPU {SUT_CPU}, Redis "
            f"over {'TCP' if args.redis_tcp else 'its unix socket'}.",
            "",
            *lines,
        ]
    )
    print(text)
    if not args.no_write:
        write_section("request-cost", text)


if __name__ == "__main__":
    main()
