"""Scale-out on one machine (issue #18, the seed's "linear throughput ... gateway scaling remained
non-bottleneck"): aggregate token throughput with 1, 2, 4 and 8 sim workers behind 1 gateway, and
8 workers behind 2 gateways, side by side in one run, with the CPU each kind of process used.

Each worker is a sim engine that can stream far more than this machine's cores can carry (64
sequences, 8 ms steps), and the load is a closed loop of streaming 64-token completions spread
over the gateways. Where the aggregate stops growing, the CPU columns say which component holds
the cores: on a machine with few cores every process competes for them, so this finds the
component that costs the most per token rather than a network or GPU limit.

    .venv/bin/python benchmarks/scaleout.py     # ~3 minutes; writes its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from breakwater.redis_server import RedisServer, free_port
from common import Result, closed_loop, spawn, stop, wait_models, write_section

TICKS = os.sysconf("SC_CLK_TCK")
WORKER = {
    "BREAKWATER_CAPACITY": "64",
    "BREAKWATER_SIM_DECODE_BASE_MS": "8",
    "BREAKWATER_SIM_DECODE_PER_SEQ_MS": "0",
    "BREAKWATER_HEARTBEAT_S": "0.5",
}
SHAPES = ((1, 1), (1, 2), (1, 4), (1, 8), (2, 8))  # (gateways, workers)


@dataclass
class Row:
    gateways: int
    workers: int
    tokens: int
    failed: int
    seconds: float
    cpu: dict[str, float]  # CPU-seconds per kind of process
    redis_bytes: tuple[int, int]  # Redis's network bytes in and out over the run
    client_bytes: int  # response bodies the clients received

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def redis_net(redis: RedisServer) -> tuple[int, int]:
    client = Redis.from_url(redis.url)
    try:
        stats = client.info("stats")
    finally:
        client.close()
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def spread(urls: list[str], streams: int, seconds: float, body: dict[str, object]) -> list[Result]:
    """``streams`` closed-loop streams shared out over the gateways."""
    share = [streams // len(urls) + (i < streams % len(urls)) for i in range(len(urls))]
    runs = await asyncio.gather(*(closed_loop(u, n, seconds, body) for u, n in zip(urls, share, strict=True)))
    return [r for results, _ in runs for r in results]


def measure(redis: RedisServer, gateways: int, workers: int, tmp: Path, args: argparse.Namespace) -> Row:
    prefix = f"so{uuid.uuid4().hex[:8]}"
    base = {
        "BREAKWATER_REDIS_URL": redis.url,
        "BREAKWATER_KEY_PREFIX": prefix,
        "BREAKWATER_LOG_LEVEL": "WARNING",
    }
    ports = [free_port() for _ in range(gateways)]
    gws = [spawn(["gateway", "--port", str(p)], base, tmp / f"{prefix}-gw{p}.log") for p in ports]
    wks = [
        spawn(["worker", "--engine", "sim", "--model", "sim"], {**base, **WORKER}, tmp / f"{prefix}-w{i}.log")
        for i in range(workers)
    ]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    body: dict[str, object] = {"model": "sim", "prompt": "scale", "max_tokens": 64, "ignore_eos": True}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    try:
        for url in urls:
            wait_models(url, "sim")
        asyncio.run(spread(urls, 8, 2.0, body))  # warm-up
        groups = {"gateways": gws, "workers": wks}
        before = {k: sum(cpu_seconds(p.pid) for p in ps) for k, ps in groups.items()}
        before |= {"redis": cpu_seconds(redis.proc.pid) if redis.proc else 0.0, "client": own_cpu()}
        net_before = redis_net(redis)
        results = asyncio.run(spread(urls, args.streams, args.seconds, body))
        net_after = redis_net(redis)
        after = {k: sum(cpu_seconds(p.pid) for p in ps) for k, ps in groups.items()}
        after |= {"redis": cpu_seconds(redis.proc.pid) if redis.proc else 0.0, "client": own_cpu()}
    finally:
        stop(gws + wks)
    ok = [r for r in results if r.ok]
    return Row(
        gateways,
        workers,
        sum(r.tokens for r in ok),
        len(results) - len(ok),
        args.seconds,
        {k: after[k] - before[k] for k in after},
        (net_after[0] - net_before[0], net_after[1] - net_before[1]),
        sum(r.body_bytes for r in ok),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=96, help="concurrent streams")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bw-scaleout-") as d:
        tmp = Path(d)
        redis = RedisServer(tmp / "redis")
        redis.start()
        try:
            for gateways, workers in SHAPES:
                rows.append(measure(redis, gateways, workers, tmp, args))
        finally:
            redis.stop()
    base = rows[0]
    lines = [
        "| gateways x workers | tokens/s delivered | vs 1 x 1 | cores used: gateways · workers · Redis · "
        "load client | bytes per token: into Redis · out of Redis · to the client | failed |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cores = " · ".join(f"{r.cpu[k] / r.seconds:.2f}" for k in ("gateways", "workers", "redis", "client"))
        lines.append(
            f"| {r.gateways} x {r.workers} | {r.tokens_per_s:,.0f} | "
            f"{r.tokens_per_s / base.tokens_per_s:.2f}x | {cores} | "
            f"{r.redis_bytes[0] / r.tokens:.0f} · {r.redis_bytes[1] / r.tokens:.0f} · "
            f"{r.client_bytes / r.tokens:.0f} | {r.failed} |"
        )
    command = f".venv/bin/python benchmarks/scaleout.py --streams {args.streams} --seconds {args.seconds:g}"
    body = "\n".join(["```", command, "```", f"({os.cpu_count()} cores)", "", *lines])
    print(body)
    if not args.no_write:
        write_section("scaleout", body)


if __name__ == "__main__":
    main()
