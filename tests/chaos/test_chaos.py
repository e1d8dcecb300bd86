"""The chaos suite: faults under continuous streaming load against a real multi-process stack.

Every scenario checks every request: it ends with exactly the text an undisturbed run produces (no
gap, no duplicate seq) or with an explicit error event, and the books balance (submitted =
completed + errored + rejected, none lost, none failed by a response no client could act on). Each
fault is timed by polling for streams in flight (never by a fixed sleep), and each scenario checks
that its fault did hit them. Each run's books go to results/chaos/ for docs/reliability.md
(``python benchmarks/reliability.py``).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from breakwater.broker import RequestRecord, Status
from breakwater.engines.sim import POISON_MARKER
from breakwater.keys import Keys
from breakwater.redis_server import RedisServer, free_port
from tests.chaos.harness import (
    Books,
    Final,
    Outcome,
    ResumingClient,
    Spec,
    books,
    make_specs,
    metric_sum,
    poll_for,
)
from tests.chaos.slow_reader import SlowReader
from tests.helpers import Proc, StackProcs, async_wait_for, read_record

pytestmark = pytest.mark.timeout(240)

WORKER: dict[str, Any] = {
    "sim_decode_base_ms": 20,
    "heartbeat_s": 0.3,
    "capacity": 16,
    "detach_grace_s": 60,
    "max_attempts": 3,
}
GATEWAY: dict[str, Any] = {"detach_grace_s": 60}
LEASE_S = WORKER["heartbeat_s"] * 3  # the default lease_heartbeats


def stack(
    redis_url: str,
    log_dir: Path,
    *,
    gateways: int = 2,
    workers: int = 3,
    worker: dict[str, Any] | None = None,
    **gw: object,
) -> StackProcs:
    procs = StackProcs(redis_url, f"c{uuid.uuid4().hex[:10]}", log_dir)
    urls = [procs.add_gateway(**{**GATEWAY, **gw}) for _ in range(gateways)]
    for _ in range(workers):
        procs.add_worker(**{**WORKER, **(worker or {})})
    procs.wait_workers(urls[0], count=workers)
    return procs


def urls(procs: StackProcs) -> list[str]:
    return [url for proc, url in procs.gateways if proc.alive()]


def assert_exact(b: Books) -> None:
    assert b.lost == 0 and b.failed == 0, b
    assert b.balanced(), b
    assert b.wrong_text == 0 and b.duplicated_tokens == 0 and b.gaps == 0, b


def worker_id(proc: Proc) -> str:
    return proc.args[proc.args.index("--worker-id") + 1]


def straddling(outcomes: list[Outcome], start: float, end: float) -> list[Outcome]:
    """Streams that had tokens before ``start`` and got more after ``end``: the fault hit them."""
    return [o for o in outcomes if o.tokens_between(0, start) and o.tokens_between(end, math.inf)]


class Supervisor:
    """Keeps N workers running, like a Deployment: a dead worker is replaced."""

    def __init__(self, procs: StackProcs, count: int, worker: dict[str, Any] | None = None) -> None:
        self.procs = procs
        self.count = count
        self.worker = worker or WORKER
        self._stop = asyncio.Event()
        self.restarts = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            if sum(w.alive() for w in self.procs.workers) < self.count:
                await asyncio.to_thread(self.procs.add_worker, **self.worker)
                self.restarts += 1
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self._stop.set()
        await self._task


@asynccontextmanager
async def running(procs: StackProcs, redis_url: str) -> AsyncIterator[tuple[ResumingClient, Redis]]:
    """A resuming client on the stack's gateways and a Redis client; the stack stops on exit."""
    client = ResumingClient(urls(procs))
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client, redis
    finally:
        await client.close()
        await redis.aclose()
        procs.stop()


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the scenario's own (the Redis scenarios restart it), AOF fsync on every write."""
    server = RedisServer(tmp_path / "redis", appendfsync="always")
    server.start()
    yield server
    server.stop()


def start_load(client: ResumingClient, specs: list[Spec], rate: float | None) -> asyncio.Task[list[Outcome]]:
    return client.start(specs, rate=rate, tag=uuid.uuid4().hex[:8])


async def streams_mid_flight(client: ResumingClient, count: int, gateway: str | None = None) -> list[Outcome]:
    """Wait until ``count`` streams (on ``gateway``) have tokens and have not ended; return them."""
    await async_wait_for(
        lambda: len(client.streaming(gateway)) >= count, 30, what=f"{count} streams mid-flight"
    )
    return client.streaming(gateway)


async def running_on(
    procs: StackProcs,
    redis: Redis,
    outcomes: list[Outcome],
    rng: random.Random | None = None,
    on: Proc | None = None,
) -> tuple[Outcome, RequestRecord, Proc] | None:
    """A stream with at least 10 tokens to go whose job runs on a live worker of ours (``on``)."""
    outcomes = list(outcomes)
    if rng is not None:
        rng.shuffle(outcomes)
    workers = [w for w in procs.workers if w.alive() and on in (None, w)]
    for out in outcomes:
        if len(out.events) > 20 or not out.rid:  # 30 tokens each: the kill must not race the end
            continue
        record = await read_record(procs, redis, out.rid)
        worker = next((w for w in workers if worker_id(w) == record.worker), None)
        if worker is not None and record.status is Status.RUNNING and record.attempt < WORKER["max_attempts"]:
            return out, record, worker
    return None


async def test_1_sigkill_workers_mid_stream(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir)
    specs = make_specs("kill-workers", 80)
    rng = random.Random(1)
    hits: list[tuple[Outcome, RequestRecord]] = []  # a stream, and its record when its worker died
    async with running(procs, redis_server.url) as (client, redis):
        supervisor = Supervisor(procs, 3)
        try:
            task = start_load(client, specs, rate=10)
            for _ in range(4):
                out, record, victim = await poll_for(
                    lambda: running_on(procs, redis, client.streaming(), rng), 30, "a stream on a live worker"
                )
                victim.kill()
                hits.append((out, record))

                async def continued(rid: str = out.rid, before: int = record.attempt) -> bool:
                    return (await read_record(procs, redis, rid)).attempt > before

                await async_wait_for(continued, 30, what="another worker to take the killed stream")
            outcomes = await task
            after = [await read_record(procs, redis, out.rid) for out, _ in hits]
        finally:
            await supervisor.stop()
    b = books("1-sigkill-workers", specs, outcomes)
    assert_exact(b)
    assert b.completed == 80 and supervisor.restarts >= 4
    for (out, before), record in zip(hits, after, strict=True):  # each kill hit a stream mid-flight
        assert out.final is Final.DONE and record.status is Status.DONE, record
        assert record.attempt > before.attempt and record.worker != before.worker, (before, record)


async def test_2_sigkill_a_gateway_mid_stream(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir)
    specs = make_specs("kill-gateway", 60)
    victim, victim_url = procs.gateways[0]
    async with running(procs, redis_server.url) as (client, _):
        task = start_load(client, specs, rate=10)
        hit = await streams_mid_flight(client, 3, victim_url)
        victim.kill()
        outcomes = await task
    b = books("2-sigkill-gateway", specs, outcomes)
    assert_exact(b)
    assert b.completed == 60
    # The streams cut mid-flight resumed on the other gateway (unless they ended in the same ms).
    assert sum(o.resumes > 0 and o.final is Final.DONE for o in hit) >= len(hit) - 1, hit
    assert sum(o.resumes for o in outcomes) > 0


@pytest.mark.parametrize("down_s", [0.0, 10.0], ids=["restart", "down-10s"])
async def test_3_4_redis_restart_and_outage(chaos_redis: RedisServer, log_dir: Path, down_s: float) -> None:
    procs = stack(chaos_redis.url, log_dir)
    specs = make_specs(f"redis-{down_s:g}", 50)
    async with running(procs, chaos_redis.url) as (client, _):
        client.deadline_s = 120
        task = start_load(client, specs, rate=10)
        await streams_mid_flight(client, 5)
        down_at = time.monotonic()
        chaos_redis.stop(kill=True)  # a crash: only what AOF (fsync always) holds survives
        await asyncio.sleep(down_s)  # the outage itself
        chaos_redis.start()
        up_at = time.monotonic()
        outcomes = await task
        alive = [w.alive() for w in procs.workers] + [g.alive() for g, _ in procs.gateways]
    b = books(f"{3 if not down_s else 4}-redis-{'restart' if not down_s else 'down-10s'}", specs, outcomes)
    assert_exact(b)
    assert b.completed == 50
    assert all(alive)  # nothing crashed: every process reconnected by itself
    assert straddling(outcomes, down_at, up_at)  # streams mid-flight when Redis died went on after
    if down_s:  # refused while down (503 + Retry-After: retried), never hung, lost or failed
        refusals = [r for o in outcomes for r in o.refusals]
        assert refusals and all(r.status == 503 and r.code == "redis_unavailable" for r in refusals), b


async def test_5_poison_job_is_dead_lettered(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir)
    specs = make_specs("poison", 40)
    specs[5] = Spec(f"{POISON_MARKER} crashes the engine", 7, 30)
    async with running(procs, redis_server.url) as (client, redis):
        supervisor = Supervisor(procs, 3)
        try:
            outcomes = await start_load(client, specs, rate=10)
            entries: Any = await redis.xrange(Keys(procs.prefix).dlq("sim"))
        finally:
            await supervisor.stop()
        # Counted from the processes, not the restarts: the last crash may still be being replaced
        # when the dead-lettered request answers.
        crashed = sum(not w.alive() for w in procs.workers)
    b = books("5-poison", specs[:5] + specs[6:], outcomes[:5] + outcomes[6:])
    assert_exact(b)
    assert b.completed == 39
    poisoned = outcomes[5]
    assert poisoned.final is Final.ERROR and (poisoned.error or {}).get("code") == "max_attempts_exceeded"
    assert [dict(fields)["rid"] for _, fields in entries] == [poisoned.rid]
    assert crashed >= 3  # it crashed a worker on every attempt


async def test_6_burst_far_above_capacity(redis_server: RedisServer, log_dir: Path) -> None:
    # 3 x 16 slots, 100 ms a step: a 30-token job holds its slot >= 3 s, so 300 requests fired at
    # once overflow the lane (48 running + 30 queued) however slowly a busy CPU delivers them.
    lane_max_queued = 30
    procs = stack(
        redis_server.url, log_dir, worker={"sim_decode_base_ms": 100}, lane_max_queued=lane_max_queued
    )
    specs = make_specs("burst", 300)
    async with running(procs, redis_server.url) as (client, _):
        outcomes = await start_load(client, specs, rate=None)
        drain_rate = await metric_sum(urls(procs)[:1], "breakwater_drain_rate", model="sim")
        refused_by_gateways = await metric_sum(
            urls(procs), "breakwater_admission_rejections_total", model="sim", reason="queue_full"
        )
    b = books("6-burst", specs, outcomes)
    assert_exact(b)
    # The contract: each request completes, or is refused with 429 because the lane is full.
    assert b.errored == 0 and b.completed + b.rejected == 300, b
    assert {s for o in outcomes for s in o.statuses} <= {200, 429}, b.refused
    assert b.rejected > 0 and b.completed > lane_max_queued, b
    refusals = [r for o in outcomes for r in o.refusals]
    assert all(r.code == "queue_full" and r.reason == "queue_full" for r in refusals), b.refused
    # The lane bound was hit: each 429 saw the lane full, and the gateways counted each one.
    waiting = [int(m.group(1)) for r in refusals if (m := re.search(r"\((\d+) waiting\)", r.message))]
    assert len(waiting) == b.rejected and min(waiting) >= lane_max_queued, waiting
    assert refused_by_gateways == b.rejected
    assert all(r.retry_after is not None and r.retry_after >= 1 for r in refusals)
    assert drain_rate > 0  # Retry-After comes from a measured drain rate


async def test_7_rolling_restart_under_load(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir)
    specs = make_specs("roll", 400)  # sent at 8/s until the roll is over, however long it takes
    drained: list[tuple[Outcome, RequestRecord]] = []  # running on a worker when it got SIGTERM
    cut: list[Outcome] = []  # streaming from a gateway when it got SIGTERM
    exits: dict[str, int] = {}  # exit status of each process stopped
    rolled = asyncio.Event()
    async with running(procs, redis_server.url) as (client, redis):
        task = client.start(specs, rate=8, tag=uuid.uuid4().hex[:8], until=rolled)
        for old in list(procs.workers):
            procs.add_worker(**WORKER)  # surge first, like a Deployment's rolling update

            async def on_old(old: Proc = old) -> tuple[Outcome, RequestRecord, Proc] | None:
                return await running_on(procs, redis, client.streaming(), on=old)

            out, record, _ = await poll_for(on_old, 30, f"a stream on {worker_id(old)}")
            drained.append((out, record))
            # The worker Deployment's grace: drain_grace_s (30 s) + 15 s (docs/deploy.md).
            exits[worker_id(old)] = await asyncio.to_thread(old.stop, 45)
        for old, old_url in list(procs.gateways):
            await asyncio.to_thread(procs.add_gateway, **GATEWAY)
            client.gateways[:] = urls(procs)  # clients learn the new gateway (a load balancer would)
            cut += await streams_mid_flight(client, 2, old_url)
            exits[old_url] = await asyncio.to_thread(old.stop, 30)
            client.gateways[:] = urls(procs)
        rolled.set()
        outcomes = await task
        after = [await read_record(procs, redis, out.rid) for out, _ in drained]
    b = books("7-rolling-restart", specs[: len(outcomes)], outcomes)
    assert_exact(b)
    assert b.completed == len(outcomes) and b.errored == 0
    # A draining worker finishes what it runs (no reclaim, no second attempt) ...
    for (out, before), record in zip(drained, after, strict=True):
        assert out.final is Final.DONE and record.status is Status.DONE, record
        assert record.attempt == before.attempt and record.worker == before.worker, (before, record)
    # ... and a draining gateway ends its streams without [DONE]: their clients resume elsewhere.
    assert any(o.resumes > 0 for o in cut), cut
    # Each exited by itself (uvicorn re-raises the SIGTERM it handled), none was SIGKILLed at the end
    # of its grace period.
    assert all(code in (0, -signal.SIGTERM) for code in exits.values()), exits


async def test_8_slow_client_does_not_stall_others(redis_server: RedisServer, log_dir: Path) -> None:
    procs = stack(redis_server.url, log_dir, gateways=1, stream_buffer=8)
    url = urls(procs)[0]
    # The slow reader's long text comes fast, from a worker of its own (a model of its own): it falls
    # hundreds of events behind within seconds. (Measured: with a fast reader, nothing overflows.)
    procs.add_worker(model="sim-long", **{**WORKER, "sim_decode_base_ms": 2})
    procs.wait_workers(url, model="sim-long", count=1)
    slow_spec = Spec("chaos slow reader", 4242, 3000, chat=True, model="sim-long")
    specs = make_specs("beside-slow", 40)
    async with running(procs, redis_server.url) as (client, _), SlowReader(url, slow_spec) as slow:
        await slow.started()
        before = await metric_sum([url], "breakwater_stream_overflows_total")
        outcomes = await start_load(client, specs, rate=10)
        assert not slow.done  # the slow reader was still reading while the others finished

        async def overflowed() -> bool:
            return await metric_sum([url], "breakwater_stream_overflows_total") > before

        await async_wait_for(overflowed, 60, what="the slow reader's live buffer to overflow")
        text = await asyncio.wait_for(slow.read_rest(), 120)
    b = books("8-slow-client", specs, outcomes)
    assert_exact(b)
    assert b.completed == 40
    assert b.recovery_s < 1.0  # no stream paused behind the slow reader
    # Its live buffer overflowed (above), so it was served from the durable stream: still every token.
    assert text == slow_spec.expected()


async def test_9_redis_full_with_noeviction(tmp_path: Path, log_dir: Path) -> None:
    server = RedisServer(tmp_path / "r")  # our own: its maxmemory must not touch other tests
    server.start()
    try:
        procs = stack(server.url, log_dir)
        specs = make_specs("redis-full", 60)
        async with running(procs, server.url) as (client, admin):
            task = start_load(client, specs, rate=10)
            hit = await streams_mid_flight(client, 5)
            accepted = [o for o in client.outcomes if o.rid]
            used = int((await admin.info("memory"))["used_memory"])
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", used // 2)
            full_at = time.monotonic()

            def refused_for_oom() -> bool:
                return any(r.reason == "redis_oom" for o in client.outcomes for r in o.refusals)

            await async_wait_for(refused_for_oom, 20, what="a request refused because Redis is full")
            await asyncio.sleep(max(0.0, full_at + 3.0 - time.monotonic()))  # full for 3 s at least
            await admin.config_set("maxmemory", 0)
            freed_at = time.monotonic()
            outcomes = await task
            alive = [w.alive() for w in procs.workers] + [g.alive() for g, _ in procs.gateways]
    finally:
        server.stop()
    b = books("9-redis-full", specs, outcomes)
    assert_exact(b)
    assert b.completed == 60  # the refused were retried, and went through once memory was freed
    assert all(alive), alive  # no worker (or gateway) exited: they backed off and retried their writes
    refusals = [r for o in outcomes for r in o.refusals]
    assert all(r.status == 503 and r.retry_after == 1 for r in refusals), b.refused
    assert all(r.code == "redis_unavailable" and r.reason == "redis_oom" for r in refusals), b.refused
    assert all(o.final is Final.DONE for o in accepted)  # accepted before the limit: all completed ...
    assert straddling(hit, full_at, freed_at)  # ... and streams cut off by the full Redis went on after


async def test_10_hung_engine_step(redis_server: RedisServer, log_dir: Path) -> None:
    marker = "<<bw-hang>>"
    step_timeout_s = 1.0
    procs = stack(redis_server.url, log_dir, workers=2)
    port = free_port()
    hung = procs.add_worker(
        **WORKER, sim_hang_marker=marker, step_timeout_s=step_timeout_s, metrics_port=port
    )
    hung_id = worker_id(hung)
    procs.wait_workers(urls(procs)[0], count=3)
    # Every prompt has the marker: the first that makes 5 tokens on that worker hangs its engine.
    # 5 s of arrivals: most come after the hang is known (~2 s in) and its in-flight claim settled.
    specs = [Spec(f"chaos hang {marker} {i}", 2000 + i, 30, chat=i % 2 == 1) for i in range(50)]
    hit: dict[str, RequestRecord] = {}  # rid -> its record while the hung worker held its stream
    taken_after_hang: set[str] = set()
    async with running(procs, redis_server.url) as (client, redis):

        async def on_hung() -> set[str]:
            rids = [o.rid for o in list(client.outcomes) if o.rid]
            records = {rid: await read_record(procs, redis, rid) for rid in rids}
            return {rid for rid, r in records.items() if r.worker == hung_id and not r.status.terminal}

        async def held_by_hung() -> bool:
            for out in client.streaming():
                record = await read_record(procs, redis, out.rid)
                if record.worker == hung_id and record.status is Status.RUNNING:
                    hit.setdefault(out.rid, record)
            return bool(hit)

        started = time.monotonic()
        task = start_load(client, specs, rate=10)
        await async_wait_for(held_by_hung, 30, what="a stream on the worker whose engine hangs")
        health = await _poll_health(port, step_timeout_s + 10)
        hung_alive = hung.alive()
        # It knows it is hung now; a claim already under way may still land: its blocking read
        # (block_ms, 0.2 s) and the two round trips that bind and start it, on a loaded CPU.
        await asyncio.sleep(1.0)
        held = await on_hung()
        while not task.done():  # from now on it must take nothing new
            taken_after_hang |= await on_hung() - held
            await asyncio.sleep(0.1)
        outcomes = await task
        elapsed = time.monotonic() - started
        after = {rid: await read_record(procs, redis, rid) for rid in hit}
        hung.kill()  # what its failing liveness probe would do
    b = books("10-hung-engine-step", specs, outcomes)
    assert_exact(b)
    assert b.completed == 50
    assert health == (503, {"status": "engine_step_hung"}) and hung_alive  # alive, and says it is stuck
    for rid, before in hit.items():  # every stream it held moved to another worker and completed
        record = after[rid]
        assert record.status is Status.DONE and record.worker != hung_id, record
        assert record.attempt > before.attempt, (before, record)
    # Moved within about lease + step timeout (plus a loaded CPU's slack); the run stays short.
    assert b.recovery_s < LEASE_S + step_timeout_s + 3.0, b
    assert elapsed < 60
    # A worker that knows its engine is stuck (and left the registry) claims no more jobs.
    assert not taken_after_hang, f"{len(taken_after_hang)} requests claimed by the hung worker"


async def _poll_health(port: int, timeout_s: float) -> tuple[int, Any]:
    """The worker's /healthz once it answers 503 (or its last answer at the deadline)."""
    answer: list[tuple[int, Any]] = []
    async with httpx.AsyncClient(timeout=2) as http:

        async def unhealthy() -> bool:
            resp = await http.get(f"http://127.0.0.1:{port}/healthz")
            answer[:] = [(resp.status_code, resp.json())]
            return resp.status_code == 503

        await async_wait_for(unhealthy, timeout_s, what="the hung worker's /healthz to fail")
    return answer[0]


async def test_11_spot_preemption_of_half_the_workers(redis_server: RedisServer, log_dir: Path) -> None:
    # Spot capacity taken back: every 3 s half the live workers get SIGTERM (the provider's notice),
    # then SIGKILL 1 s later if still running; their drain grace (0.5 s) fits inside the notice, as
    # the spot overlay sets it. New workers replace them (the on-demand pool, or new spot nodes).
    spot = {**WORKER, "drain_grace_s": 0.5}
    procs = stack(redis_server.url, log_dir, workers=4, worker=spot)
    specs = make_specs("spot", 120)
    preempted: list[Proc] = []
    async with running(procs, redis_server.url) as (client, redis):
        supervisor = Supervisor(procs, 4, spot)
        try:
            task = start_load(client, specs, rate=10)
            await streams_mid_flight(client, 4)
            while not task.done():
                live = [w for w in procs.workers if w.alive()]
                victims = live[: len(live) // 2]
                for victim in victims:
                    victim.proc.send_signal(signal.SIGTERM)
                preempted += victims
                await asyncio.sleep(1.0)  # the notice
                for victim in victims:
                    if victim.alive():
                        victim.kill()
                await asyncio.sleep(2.0)
            outcomes = await task
            records = [await read_record(procs, redis, o.rid) for o in outcomes if o.rid]
        finally:
            await supervisor.stop()
    b = books("11-spot-preemption", specs, outcomes)
    assert_exact(b)
    assert b.completed == 120 and len(preempted) >= 6
    # Preemption hit requests mid-flight: some were continued by another worker.
    assert sum(r.attempt > 1 for r in records) > 0, b
