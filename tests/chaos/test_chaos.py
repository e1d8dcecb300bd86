"""The chaos suite: faults under continuous streaming load against a real multi-process stack.

Every scenario checks every request: it ends with exactly the text an undisturbed run produces (no
gap, no duplicate seq) or with an explicit error event, and the books balance (submitted =
completed + errored + rejected, none lost). Each run's books go to results/chaos/ for
docs/reliability.md (``python benchmarks/reliability.py``).
"""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from breakwater.engines.sim import POISON_MARKER
from breakwater.keys import Keys
from breakwater.redis_server import RedisServer
from tests.chaos.harness import Books, Outcome, ResumingClient, Spec, books, load, make_specs
from tests.helpers import StackProcs

pytestmark = pytest.mark.timeout(240)

WORKER: dict[str, Any] = {
    "sim_decode_base_ms": 20,
    "heartbeat_s": 0.3,
    "capacity": 16,
    "detach_grace_s": 60,
    "max_attempts": 3,
}
GATEWAY: dict[str, Any] = {"detach_grace_s": 60}


def stack(redis_url: str, log_dir: Path, *, gateways: int = 2, workers: int = 3, **gw: object) -> StackProcs:
    procs = StackProcs(redis_url, f"c{uuid.uuid4().hex[:10]}", log_dir)
    urls = [procs.add_gateway(**{**GATEWAY, **gw}) for _ in range(gateways)]
    for _ in range(workers):
        procs.add_worker(**WORKER)
    procs.wait_workers(urls[0], count=workers)
    return procs


def urls(procs: StackProcs) -> list[str]:
    return [url for proc, url in procs.gateways if proc.alive()]


def assert_exact(b: Books) -> None:
    assert b.lost == 0, b
    assert b.balanced(), b
    assert b.wrong_text == 0 and b.duplicated_tokens == 0 and b.gaps == 0, b


class Supervisor:
    """Keeps N workers running, like a Deployment: a dead worker is replaced."""

    def __init__(self, procs: StackProcs, count: int) -> None:
        self.procs = procs
        self.count = count
        self._stop = threading.Event()
        self.restarts = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if sum(w.alive() for w in self.procs.workers) < self.count:
                self.procs.add_worker(**WORKER)
                self.restarts += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the scenario's own (the Redis scenarios restart it), AOF fsync on every write."""
    server = RedisServer(tmp_path / "redis", appendfsync="always")
    server.start()
    yield server
    server.stop()


async def run_load(
    procs: StackProcs, tag: str, n: int, rate: float, **client: float
) -> tuple[list[Spec], list[Outcome]]:
    specs = make_specs(tag, n)
    c = ResumingClient(urls(procs), **client)
    try:
        outcomes = await load(c, specs, rate=rate, tag=f"{tag}-{uuid.uuid4().hex[:6]}")
    finally:
        await c.close()
    return specs, outcomes


async def test_1_sigkill_random_workers(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir)
    supervisor = Supervisor(procs, 3)
    rng = random.Random(1)

    async def killer() -> None:
        for _ in range(4):
            await asyncio.sleep(1.5)
            victim = rng.choice([w for w in procs.workers if w.alive()])
            victim.kill()

    try:
        (specs, outcomes), _ = await asyncio.gather(run_load(procs, "kill-workers", 80, 10), killer())
    finally:
        supervisor.stop()
        procs.stop()
    b = books("1-sigkill-workers", specs, outcomes)
    assert_exact(b)
    assert b.completed == 80 and supervisor.restarts >= 4


async def test_2_sigkill_a_gateway_mid_stream(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir)

    async def killer() -> None:
        await asyncio.sleep(2.0)
        procs.gateways[0][0].kill()

    try:
        (specs, outcomes), _ = await asyncio.gather(run_load(procs, "kill-gateway", 60, 10), killer())
    finally:
        procs.stop()
    b = books("2-sigkill-gateway", specs, outcomes)
    assert_exact(b)
    assert b.completed == 60
    assert sum(o.resumes for o in outcomes) > 0  # streams on the dead gateway resumed on the other


@pytest.mark.parametrize("down_s", [0.0, 10.0], ids=["restart", "down-10s"])
async def test_3_4_redis_restart_and_outage(chaos_redis: RedisServer, log_dir: Path, down_s: float) -> None:
    procs = stack(chaos_redis.url, log_dir)

    async def outage() -> None:
        await asyncio.sleep(2.0)
        chaos_redis.stop(kill=True)  # a crash: only what AOF (fsync always) holds survives
        await asyncio.sleep(down_s)
        chaos_redis.start()

    try:
        (specs, outcomes), _ = await asyncio.gather(
            run_load(procs, f"redis-{down_s:g}", 50, 10, deadline_s=120), outage()
        )
        alive = [w.alive() for w in procs.workers] + [g.alive() for g, _ in procs.gateways]
    finally:
        procs.stop()
    b = books(f"{3 if not down_s else 4}-redis-{'restart' if not down_s else 'down-10s'}", specs, outcomes)
    assert_exact(b)
    assert b.completed == 50
    assert all(alive)  # nothing crashed: every process reconnected by itself
    if down_s:
        assert 503 in {s for o in outcomes for s in o.statuses}  # refused while down, not hung or lost


async def test_5_poison_job_is_dead_lettered(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir)
    supervisor = Supervisor(procs, 3)
    specs = make_specs("poison", 40)
    specs[5] = Spec(f"{POISON_MARKER} crashes the engine", 7, 30)
    client = ResumingClient(urls(procs))
    try:
        outcomes = await load(client, specs, rate=10, tag=f"poison-{uuid.uuid4().hex[:6]}")
        dlq = await _dlq(procs, redis_server)
    finally:
        await client.close()
        supervisor.stop()
        procs.stop()
    b = books("5-poison", specs[:5] + specs[6:], outcomes[:5] + outcomes[6:])
    assert_exact(b)
    assert b.completed == 39
    poisoned = outcomes[5]
    assert poisoned.final == "error" and (poisoned.error or {}).get("code") == "max_attempts_exceeded"
    assert [entry["rid"] for entry in dlq] == [poisoned.rid]
    assert supervisor.restarts >= 3  # it crashed a worker on every attempt


async def _dlq(procs: StackProcs, server: RedisServer) -> list[dict[str, str]]:
    from redis.asyncio import Redis

    redis = Redis.from_url(server.url, decode_responses=True)
    try:
        entries: Any = await redis.xrange(Keys(procs.prefix).dlq("sim"))
        return [dict(fields) for _, fields in entries]
    finally:
        await redis.aclose()


async def test_6_burst_far_above_capacity(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir, lane_max_queued=30)
    try:
        specs, outcomes = await run_load(procs, "burst", 300, 150)
        metrics = httpx.get(f"{urls(procs)[0]}/metrics").text
    finally:
        procs.stop()
    rate = [line for line in metrics.splitlines() if line.startswith('breakwater_drain_rate{model="sim"}')]
    assert rate and float(rate[0].split()[-1]) > 0  # Retry-After comes from a measured drain rate
    b = books("6-burst", specs, outcomes)
    assert_exact(b)
    statuses = {s for o in outcomes for s in o.statuses}
    assert statuses <= {200, 429}  # beyond the lane bound only 429s, never a 5xx
    assert b.rejected > 0 and b.completed > 30
    assert all(r >= 1 for o in outcomes for r in o.retry_after)


async def test_7_rolling_restart_under_load(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir)

    async def roll() -> None:
        await asyncio.sleep(1.0)
        for old in list(procs.workers):
            procs.add_worker(**WORKER)  # surge first, like a Deployment's rolling update
            await asyncio.to_thread(old.stop, 30)
        for old, _ in list(procs.gateways):
            procs.add_gateway(**GATEWAY)
            await asyncio.to_thread(old.stop, 30)

    client = ResumingClient(urls(procs))
    try:
        specs = make_specs("roll", 80)
        task = asyncio.create_task(load(client, specs, rate=8, tag=f"roll-{uuid.uuid4().hex[:6]}"))
        await roll()
        client.gateways[:] = urls(procs)  # clients learn the new gateways (a load balancer would)
        outcomes = await task
    finally:
        await client.close()
        procs.stop()
    b = books("7-rolling-restart", specs, outcomes)
    assert_exact(b)
    assert b.completed == 80 and b.errored == 0


async def test_8_slow_client_does_not_stall_others(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir, gateways=1, stream_buffer=8)
    url = urls(procs)[0]
    slow_spec = Spec("chaos slow reader", 4242, 60)
    slow_text: list[bytes] = []

    async def slow_reader() -> None:
        async with (
            httpx.AsyncClient(timeout=120) as http,
            http.stream("POST", f"{url}/v1/completions", json=slow_spec.body()) as resp,
        ):
            async for byte in resp.aiter_raw(1):
                slow_text.append(byte)
                await asyncio.sleep(0.001)

    try:
        slow = asyncio.create_task(slow_reader())
        await asyncio.sleep(0.5)
        specs, outcomes = await run_load(procs, "beside-slow", 40, 10)
        assert not slow.done()  # the slow reader was still reading while the others finished
        await asyncio.wait_for(slow, 120)
    finally:
        procs.stop()
    b = books("8-slow-client", specs, outcomes)
    assert_exact(b)
    assert b.completed == 40
    assert b.recovery_s < 1.0  # no stream paused behind the slow reader
    body = b"".join(slow_text).decode()
    received = "".join(
        orjson.loads(line[6:])["choices"][0]["text"]
        for line in body.splitlines()
        if line.startswith("data: {") and '"choices":[{' in line
    )
    assert received == slow_spec.expected()  # the slow reader still got every token, in order
