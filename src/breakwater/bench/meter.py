"""The seed's cost model, measured over one bench run: what each process and Redis consumed.

Read before and after the run (and Redis memory once a second during it):
- every ``--measure`` URL, a Prometheus page: a gateway's or worker's own ``/metrics``
  (``process_cpu_seconds_total``; a worker also ``breakwater_engine_busy_seconds_total``), or the
  ``breakwater up`` supervisor's, which has ``breakwater_process_tree_cpu_seconds_total`` per process;
- every ``--redis-url``: ``INFO commandstats`` (commands run) and ``INFO memory`` (``used_memory``).

Each replica is billed for the whole run (it exists, busy or not); its busy share is reported beside.
The usage is priced with :mod:`breakwater.capacity.pricing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import RedisError

from breakwater.broker.connection import RESP
from breakwater.capacity.pricing import Pricing, Usage, cost

T = TypeVar("T")
TREE_CPU = "breakwater_process_tree_cpu_seconds"
CPU = "process_cpu_seconds"
PID = "breakwater_process_pid"
BUSY = "breakwater_engine_busy_seconds"
GATEWAY_FAMILY = "breakwater_active_streams"  # every gateway exports it


@dataclass(frozen=True, slots=True)
class Reading:
    """One process's counters at one moment."""

    role: str  # gateway | worker | redis | other
    cpu_s: float
    busy_s: float | None = None  # workers: engine busy seconds
    pid: int | None = None
    supervised: bool = False  # read from the supervisor's page (the process and its children)


def parse_page(url: str, text: str) -> dict[str, Reading]:
    """The processes a metrics page describes, by a name unique over all pages."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    if TREE_CPU in families:  # the supervisor: one reading per process it started
        return {
            # By pid: a worker retired by the autoscaler keeps its pid under a new process name.
            f"{url}#pid{s.labels['pid']}": Reading(
                s.labels["role"], s.value, pid=int(s.labels["pid"]), supervised=True
            )
            for s in families[TREE_CPU].samples
            if s.name.endswith("_total")
        }
    samples = [s for name, f in families.items() if name.startswith(CPU) for s in f.samples]
    cpu_samples = [s.value for s in samples if s.name == f"{CPU}_total"]
    if not cpu_samples:
        raise ValueError(f"{url} has no {CPU}_total (is it a gateway's or worker's /metrics?)")
    cpu = sum(cpu_samples)
    pids = [int(s.value) for s in families[PID].samples] if PID in families else []
    pid = pids[0] if pids else None
    if BUSY in families:
        busy = sum(s.value for s in families[BUSY].samples if s.name.endswith("_total"))
        return {url: Reading("worker", cpu, busy, pid)}
    return {url: Reading("gateway" if GATEWAY_FAMILY in families else "other", cpu, pid=pid)}


def merged(readings: dict[str, Reading]) -> dict[str, Reading]:
    """One reading per process: where the supervisor's page and the process's own both describe it
    (same pid), the own page's role and busy seconds with the larger CPU (the supervisor's counts the
    process's children too)."""
    own = {r.pid: name for name, r in readings.items() if not r.supervised and r.pid is not None}
    out = {name: r for name, r in readings.items() if not (r.supervised and r.pid in own)}
    for r in readings.values():
        if r.supervised and r.pid in own:
            name = own[r.pid]
            out[name] = replace(out[name], cpu_s=max(out[name].cpu_s, r.cpu_s))
    return out


@dataclass(slots=True)
class RedisReading:
    commands: int
    used_memory: int


@dataclass(slots=True)
class Snapshot:
    processes: dict[str, Reading]
    redis: dict[str, RedisReading]
    at: float  # monotonic seconds


def _grown(before: float, after: float, restarted: bool) -> float:
    """A counter's increase; a process restarted in between (another pid) counts from zero."""
    return after if restarted else max(0.0, after - before)


@dataclass(slots=True)
class Measured:
    duration_s: float
    output_tokens: int
    cpu_s: dict[str, float] = field(default_factory=dict)  # by role
    replicas: list[dict[str, Any]] = field(default_factory=list)  # workers: cpu, busy
    redis_commands: int = 0
    redis_memory_gb: float = 0.0  # mean of the samples, summed over nodes

    def usage(self, sku: str, replicas: float | None = None) -> Usage:
        """The priced usage: ``replicas`` accelerators (default: the workers measured) for the run."""
        count = len(self.replicas) if replicas is None else replicas
        return Usage(
            output_tokens=self.output_tokens,
            gpu_s=count * self.duration_s,
            sku=sku,
            gateway_cpu_s=self.cpu_s.get("gateway", 0.0),
            worker_cpu_s=self.cpu_s.get("worker", 0.0),
            redis_ops=self.redis_commands,
            redis_gb=self.redis_memory_gb,
            duration_s=self.duration_s,
        )

    def report(self, pricing: Pricing, sku: str, replicas: float | None = None) -> dict[str, Any]:
        """Usage, cost by component, cost per 1k output tokens: the ``measured_cost`` of a summary."""
        usage = self.usage(sku, replicas)
        priced = cost(usage, pricing)
        parts = asdict(priced)
        per_1k = priced.total / self.output_tokens * 1000 if self.output_tokens else None
        return {
            "sku": sku,
            "usage": {
                "accelerator_s": usage.gpu_s,
                "replicas": self.replicas,
                "cpu_s": self.cpu_s,
                "redis_commands": self.redis_commands,
                "redis_memory_gb": self.redis_memory_gb,
            },
            "cost_usd": {**parts, "total": priced.total},
            "share": {k: v / priced.total for k, v in parts.items()} if priced.total > 0 else None,
            "per_1k_output_tokens": per_1k,
            "pricing": asdict(pricing),
        }


class Meter:
    def __init__(self, urls: list[str], redis_urls: list[str], *, sample_s: float = 1.0) -> None:
        if not urls and not redis_urls:
            raise ValueError("nothing to measure: give --measure and/or --redis-url")
        self.urls = urls
        self.redis = [Redis.from_url(u, protocol=RESP) for u in redis_urls]
        self.redis_urls = redis_urls
        self.sample_s = sample_s

    async def aclose(self) -> None:
        for client in self.redis:
            await client.aclose()

    async def snapshot(self) -> Snapshot:
        processes: dict[str, Reading] = {}
        async with httpx.AsyncClient(timeout=10.0) as http:
            for url in self.urls:
                resp = await http.get(url)
                resp.raise_for_status()
                processes.update(parse_page(url, resp.text))
        processes = merged(processes)
        redis = {}
        for url, client in zip(self.redis_urls, self.redis, strict=True):
            stats = await client.info("commandstats")
            memory = await client.info("memory")
            # INFO is left out: the meter's own (once a second), not the system's.
            commands = sum(
                int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_") and k != "cmdstat_info"
            )
            redis[url] = RedisReading(commands, int(memory["used_memory"]))
        return Snapshot(processes, redis, time.monotonic())

    async def _memory(self) -> int:
        return sum([int((await c.info("memory"))["used_memory"]) for c in self.redis])

    async def around(self, run: Awaitable[T]) -> tuple[T, Snapshot, Snapshot | None, list[int]]:
        """Run ``run`` between two snapshots, sampling Redis memory meanwhile. The second snapshot
        is None when it could not be read: the run's results are kept, unpriced."""
        before = await self.snapshot()
        samples = [sum(r.used_memory for r in before.redis.values())]

        async def sample() -> None:
            while True:
                await asyncio.sleep(self.sample_s)
                with contextlib.suppress(OSError, RedisError):
                    samples.append(await self._memory())

        sampler = asyncio.create_task(sample())
        try:
            result = await run
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        try:
            after: Snapshot | None = await self.snapshot()
        except (OSError, RedisError, httpx.HTTPError, ValueError):
            return result, before, None, samples
        assert after is not None
        samples.append(sum(r.used_memory for r in after.redis.values()))
        return result, before, after, samples


def measure(before: Snapshot, after: Snapshot, memory: list[int], *, output_tokens: int) -> Measured:
    """What the run consumed: counters' increases between the snapshots, over the time between."""
    duration_s = after.at - before.at
    out = Measured(duration_s, output_tokens)
    for name, end in after.processes.items():
        start = before.processes.get(name)
        restarted = start is None or start.pid != end.pid
        cpu = _grown(start.cpu_s if start else 0.0, end.cpu_s, restarted)
        out.cpu_s[end.role] = out.cpu_s.get(end.role, 0.0) + cpu
        if end.role == "worker":
            replica: dict[str, Any] = {"process": name, "cpu_s": cpu}
            if end.busy_s is not None:
                busy = _grown(start.busy_s or 0.0 if start else 0.0, end.busy_s, restarted)
                replica["busy_s"] = busy
                replica["busy_share"] = busy / duration_s if duration_s > 0 else None
            out.replicas.append(replica)
    for url, end_r in after.redis.items():
        start_r = before.redis.get(url)
        restarted_r = start_r is None or end_r.commands < start_r.commands  # a Redis restart zeroes it
        out.redis_commands += int(_grown(start_r.commands if start_r else 0, end_r.commands, restarted_r))
    out.redis_memory_gb = sum(memory) / len(memory) / 1e9 if memory else 0.0
    return out
