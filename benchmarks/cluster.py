"""Redis CPU per token event on one Redis and on Redis Clusters of 1, 2 and 3 primaries (issue #16),
side by side in one run, with sharded and classic Pub/Sub.

The same load each time: one gateway and one sim worker (64 sequences, fast steps) on this machine,
a closed loop of streaming 64-token completions. What is measured is Redis's side: the CPU-seconds
of every primary per token event delivered, the busiest primary's share, and from them how many
token events per second the Redis layer would carry with one core per primary (the busiest primary
saturating first). The gateway and the worker are not what is compared here (they share the
machine's two cores with Redis; see benchmarks/peers.py for them).

    .venv/bin/python benchmarks/cluster.py       # ~3 minutes; writes its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from breakwater.redis_cluster import LocalCluster
from breakwater.redis_server import RedisServer, free_port
from common import closed_loop, spawn, stop, wait_models, write_section

TICKS = os.sysconf("SC_CLK_TCK")
WORKER = {
    "BREAKWATER_CAPACITY": "64",
    "BREAKWATER_SIM_DECODE_BASE_MS": "8",
    "BREAKWATER_SIM_DECODE_PER_SEQ_MS": "0",
    "BREAKWATER_HEARTBEAT_S": "0.5",
}


@dataclass
class Measured:
    label: str
    tokens: int
    seconds: float
    cpu_s: list[float]  # per primary

    @property
    def events_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def us_per_event(self) -> float:
        return sum(self.cpu_s) / self.tokens * 1e6

    @property
    def busiest_share(self) -> float:
        return max(self.cpu_s) / sum(self.cpu_s)

    @property
    def capacity(self) -> float:
        """Token events per second with one core per primary: the busiest saturates first."""
        return self.tokens / max(self.cpu_s)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def measure(
    label: str, url: str, primaries: list[int], tmp: Path, args: argparse.Namespace, **env: str
) -> Measured:
    prefix = f"kb{uuid.uuid4().hex[:8]}"
    base = {
        "BREAKWATER_REDIS_URL": url,
        "BREAKWATER_KEY_PREFIX": prefix,
        "BREAKWATER_LOG_LEVEL": "WARNING",
        **env,
    }
    port = free_port()
    procs = [
        spawn(["gateway", "--port", str(port)], base, tmp / f"{prefix}-gw.log"),
        spawn(["worker", "--engine", "sim", "--model", "sim"], {**base, **WORKER}, tmp / f"{prefix}-w.log"),
    ]
    try:
        gw = f"http://127.0.0.1:{port}"
        wait_models(gw, "sim")
        body = {
            "model": "sim",
            "prompt": "cluster",
            "max_tokens": 64,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        asyncio.run(closed_loop(gw, 8, 2.0, body))  # warm-up: scripts loaded, connections open
        before = [cpu_seconds(pid) for pid in primaries]
        results, seconds = asyncio.run(closed_loop(gw, args.streams, args.seconds, body))
        cpu = [cpu_seconds(pid) - b for pid, b in zip(primaries, before, strict=True)]
    finally:
        stop(procs)
    failed = sum(not r.ok for r in results)
    if failed:
        print(f"{label}: {failed} requests failed", file=sys.stderr)
    return Measured(label, sum(r.tokens for r in results if r.ok), seconds, cpu)


def primaries_of(cluster: LocalCluster) -> list[int]:
    return [n.proc.pid for n in cluster.nodes if n.proc is not None and cluster.role(n) == "master"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=48, help="concurrent streams")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="bw-cluster-") as d:
        tmp = Path(d)
        single = RedisServer(tmp / "single")
        single.start()
        try:
            rows.append(
                measure(
                    "one Redis (redis://)", single.url, [single.proc.pid] if single.proc else [], tmp, args
                )
            )
        finally:
            single.stop()
        for n in (1, 2, 3):
            cluster = LocalCluster(tmp / f"c{n}", primaries=n, replicas=0)
            cluster.start()
            try:
                pids = primaries_of(cluster)
                rows.append(
                    measure(
                        f"cluster, {n} primar{'y' if n == 1 else 'ies'}, sharded Pub/Sub",
                        cluster.url,
                        pids,
                        tmp,
                        args,
                    )
                )
                if n == 3:
                    rows.append(
                        measure(
                            "cluster, 3 primaries, classic Pub/Sub",
                            cluster.url,
                            pids,
                            tmp,
                            args,
                            BREAKWATER_SHARDED_PUBSUB="false",
                        )
                    )
            finally:
                cluster.stop()
    base = next(r for r in rows if r.label.startswith("cluster, 1"))
    lines = [
        "| Redis layer | token events/s delivered | Redis CPU µs per token event (all primaries) "
        "| busiest primary's share | token events/s at one core per primary (busiest saturates) "
        "| vs 1 primary |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.events_per_s:,.0f} | {r.us_per_event:.1f} | {r.busiest_share:.0%} | "
            f"{r.capacity:,.0f} | {r.capacity / base.capacity:.2f}x |"
        )
    command = f".venv/bin/python benchmarks/cluster.py --streams {args.streams} --seconds {args.seconds:g}"
    body = "\n".join(["```", command, "```", "", *lines])
    print(body)
    if not args.no_write:
        write_section("cluster", body)


if __name__ == "__main__":
    main()
