"""Redis CPU per token event on one Redis and on Redis Clusters of 1, 2 and 3 primaries (issue #16),
side by side in one run, with sharded and classic Pub/Sub; and one hot model's queue in 1, 2 and 3
partitions on 3 primaries (``--part partitions``).

The same load each time: one gateway and one sim worker (64 sequences, fast steps) on this machine,
a closed loop of streaming 64-token completions. What is measured is Redis's side: the CPU-seconds
of every primary per token event delivered, the busiest primary's share, and from them how many
token events per second the Redis layer would carry with one core per primary (the busiest primary
saturating first). The gateway and the worker are not what is compared here (they share the
machine's two cores with Redis; see benchmarks/peers.py for them).

    .venv/bin/python benchmarks/cluster.py       # ~5 minutes; writes its sections of docs/benchmarks.md

Partitions: the same loop with short answers (4 tokens), so that the queue's work per request
(admission, claim, bind, ack: all on the model's queue slot) weighs as it does for a hot model of
short requests. Without partitions that slot's primary saturates first; in N partitions the queue
work spreads over N primaries. Measured: requests per second at one core per primary.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from breakwater.redis_cluster import LocalCluster
from breakwater.redis_server import RedisServer, free_port
from common import closed_loop, spawn, stop, wait_models, write_section

TICKS = os.sysconf("SC_CLK_TCK")
SHORT = 4  # tokens per answer in the partitions runs
IDLE_S = 5.0
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
    requests: int = 0

    @property
    def request_capacity(self) -> float:
        """Requests per second with one core per primary."""
        return self.requests / max(self.cpu_s)

    @property
    def us_per_request(self) -> float:
        return sum(self.cpu_s) / self.requests * 1e6

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
    label: str,
    url: str,
    primaries: list[int],
    tmp: Path,
    args: argparse.Namespace,
    max_tokens: int = 64,
    net: bool = False,
    **env: str,
) -> Measured:
    """One closed-loop run; ``net``: each primary's CPU less what it spends idle (same duration)."""
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
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        asyncio.run(closed_loop(gw, 8, 2.0, body))  # warm-up: scripts loaded, connections open
        idle = [cpu_seconds(pid) for pid in primaries]
        time.sleep(IDLE_S)  # what the nodes spend with nothing to do: heartbeats, polls, cluster bus
        before = [cpu_seconds(pid) for pid in primaries]
        results, seconds = asyncio.run(closed_loop(gw, args.streams, args.seconds, body))
        cpu = [cpu_seconds(pid) - b for pid, b in zip(primaries, before, strict=True)]
        if net:
            cpu = [c - (b - i) * seconds / IDLE_S for c, b, i in zip(cpu, before, idle, strict=True)]
    finally:
        stop(procs)
    failed = sum(not r.ok for r in results)
    if failed:
        print(f"{label}: {failed} requests failed", file=sys.stderr)
    ok = [r for r in results if r.ok]
    return Measured(label, sum(r.tokens for r in ok), seconds, cpu, len(ok))


def publish(part: str, section: str, lines: list[str], args: argparse.Namespace) -> None:
    """Print the table with its command, and write it into docs/benchmarks.md's ``section``."""
    command = (
        f".venv/bin/python benchmarks/cluster.py --part {part} --streams {args.streams} "
        f"--seconds {args.seconds:g}"
    )
    body = "\n".join(["```", command, "```", "", *lines])
    print(body)
    if not args.no_write:
        write_section(section, body)


def primaries_of(cluster: LocalCluster) -> list[int]:
    return [n.proc.pid for n in cluster.nodes if n.proc is not None and cluster.role(n) == "master"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=48, help="concurrent streams")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--part", choices=["all", "primaries", "partitions"], default="all")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bw-cluster-") as d:
        if args.part in ("all", "primaries"):
            report_primaries(Path(d), args)
        if args.part in ("all", "partitions"):
            report_partitions(Path(d), args)


def report_primaries(tmp: Path, args: argparse.Namespace) -> None:
    rows: list[Measured] = []
    single = RedisServer(tmp / "single")
    single.start()
    try:
        rows.append(
            measure("one Redis (redis://)", single.url, [single.proc.pid] if single.proc else [], tmp, args)
        )
    finally:
        single.stop()
    for n in (1, 2, 3):
        cluster = LocalCluster(tmp / f"c{n}", primaries=n, replicas=0)
        cluster.start()
        try:
            pids = primaries_of(cluster)
            label = f"cluster, {n} primar{'y' if n == 1 else 'ies'}, sharded Pub/Sub"
            rows.append(measure(label, cluster.url, pids, tmp, args))
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
    publish("primaries", "cluster", lines, args)


def report_partitions(tmp: Path, args: argparse.Namespace) -> None:
    rows: list[Measured] = []
    one = LocalCluster(tmp / "p1", primaries=1, replicas=0)
    one.start()
    try:
        rows.append(measure("1 primary", one.url, primaries_of(one), tmp, args, max_tokens=SHORT, net=True))
    finally:
        one.stop()
    cluster = LocalCluster(tmp / "p3", primaries=3, replicas=0)
    cluster.start()
    try:
        for n in (1, 2, 3):
            rows.append(
                measure(
                    f"3 primaries, {n} partition{'s' if n > 1 else ''}",
                    cluster.url,
                    primaries_of(cluster),
                    tmp,
                    args,
                    max_tokens=SHORT,
                    net=True,
                    BREAKWATER_PARTITIONS=f"sim={n}",
                )
            )
    finally:
        cluster.stop()
    base = rows[0]
    lines = [
        "| hot model sim | requests/s delivered | Redis CPU µs per request (all primaries, less idle) "
        "| CPU share per primary | requests/s at one core per primary (busiest saturates) "
        "| vs 1 primary |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        shares = " · ".join(f"{c / sum(r.cpu_s):.0%}" for c in sorted(r.cpu_s, reverse=True))
        lines.append(
            f"| {r.label} | {r.requests / r.seconds:,.0f} | {r.us_per_request:.0f} | {shares} | "
            f"{r.request_capacity:,.0f} | {r.request_capacity / base.request_capacity:.2f}x |"
        )
    publish("partitions", "cluster-partitions", lines, args)


if __name__ == "__main__":
    main()
