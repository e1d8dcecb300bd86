"""Admission: bounded lanes answer 429 with Retry-After, Idempotency-Key never enqueues twice,
queued jobs past their deadline are dropped with an error, and SIGTERM drains a worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from breakwater.redis_server import RedisServer
from tests.helpers import (
    StackProcs,
    async_wait_for,
    one_gateway_one_worker,
    read_record,
    sse_started,
    wait_for,
)


@pytest.fixture
def busy_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    """A lane bound of 3 and one worker with a single slot, so further jobs stay queued."""
    gateway = {"lane_max_queued": 3}
    with one_gateway_one_worker(
        redis_server.url, "a", log_dir, gateway, heartbeat_s=0.3, sim_decode_base_ms=20, capacity=1
    ) as procs:
        yield procs


LONG = {"model": "sim", "prompt": "occupy the slot", "max_tokens": 3000, "ignore_eos": True, "stream": True}


async def _occupy(client: httpx.AsyncClient, redis: Redis, procs: StackProcs) -> str:
    """Start a long request and wait until the worker runs it; returns its id."""
    resp = await client.send(client.build_request("POST", "/v1/completions", json=LONG), stream=True)
    rid = resp.headers["x-breakwater-request-id"]
    await resp.aclose()  # detached; it keeps running for the grace period
    key = procs.keys_request(rid)
    deadline = asyncio.get_running_loop().time() + 10
    while await redis.hget(key, "status") != "running":
        assert asyncio.get_running_loop().time() < deadline, "the long request never started"
        await asyncio.sleep(0.02)
    return rid


async def test_full_lane_gets_429_with_retry_after(busy_stack: StackProcs, redis: Redis) -> None:
    url = busy_stack.gateways[0][1]
    body = {"model": "sim", "prompt": "queued", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        long_rid = await _occupy(client, redis, busy_stack)
        tasks = [
            asyncio.create_task(client.post("/v1/completions", json={**body, "seed": i})) for i in range(3)
        ]
        stream = f"{busy_stack.prefix}:jobs:{{sim}}:interactive"
        deadline = asyncio.get_running_loop().time() + 10
        while await redis.xlen(stream) < 4:  # 1 running + 3 waiting
            assert asyncio.get_running_loop().time() < deadline, "jobs were not queued"
            await asyncio.sleep(0.02)
        refused = await client.post("/v1/completions", json=body)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-breakwater-reason"] == "queue_full"
        assert refused.json()["error"]["code"] == "queue_full"
        assert await redis.xlen(stream) == 4
        await client.delete(f"/v1/requests/{long_rid}")  # the queue drains; every admitted request completes
        done = await asyncio.gather(*tasks)
    assert [r.status_code for r in done] == [200, 200, 200]


async def _more(redis: Redis, stream: str, than: int) -> bool:
    return int(await redis.xlen(stream)) > than


async def test_job_past_its_deadline_is_dropped_not_generated(busy_stack: StackProcs, redis: Redis) -> None:
    url = busy_stack.gateways[0][1]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        long_rid = await _occupy(client, redis, busy_stack)
        stream = f"{busy_stack.prefix}:jobs:{{sim}}:interactive"
        queued = await redis.xlen(stream)
        late = asyncio.create_task(
            client.post(
                "/v1/completions",
                json={"model": "sim", "prompt": "too late", "max_tokens": 3, "timeout": 0.3},
            )
        )
        # Its deadline counts from its enqueue.
        await async_wait_for(lambda: _more(redis, stream, queued), 10, 0.02, what="the late job queued")
        await asyncio.sleep(0.5)  # let the queued job's deadline pass (the point of this test)
        await client.delete(f"/v1/requests/{long_rid}")
        resp = await late
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "timeout"
    record = await read_record(busy_stack, redis, resp.headers["x-breakwater-request-id"])
    assert (record.tokens, record.attempt, record.emitted) == (0, 0, "")  # never generated


async def test_idempotency_key_returns_the_same_request(stack: StackProcs, redis: Redis) -> None:
    url = stack.gateways[0][1]
    key = f"idem-{uuid.uuid4().hex}"
    body = {"model": "sim", "prompt": "only once", "seed": 8, "max_tokens": 6}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        first, second = await asyncio.gather(
            client.post("/v1/completions", json=body, headers={"Idempotency-Key": key}),
            client.post("/v1/completions", json=body, headers={"Idempotency-Key": key}),
        )
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]
    record = await read_record(stack, redis, first.json()["id"])
    assert record.attempt == 1  # run once


def test_sigterm_drains_in_flight_work(redis_server: RedisServer, log_dir: Path) -> None:
    procs = StackProcs(redis_server.url, f"g{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        worker = procs.add_worker(heartbeat_s=0.3, sim_decode_base_ms=30, drain_grace_s=20)
        procs.wait_workers(url)
        body = {
            "model": "sim",
            "prompt": "finish me",
            "seed": 3,
            "max_tokens": 40,
            "ignore_eos": True,
            "stream": True,
        }
        with sse_started(url, "/v1/completions", body) as (_, lines):
            worker.proc.send_signal(15)
            rest = list(lines)
        assert rest[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in rest
        wait_for(lambda: not worker.alive(), 20, what="worker exits after draining")
        assert worker.proc.returncode == 0
        assert '"draining"' in worker.log()
    finally:
        procs.stop()


def test_retry_after_follows_the_measured_drain_rate() -> None:
    from breakwater.gateway.autoscale import retry_after_s

    assert retry_after_s(40, drain_rate=10.0, capacity=4) == 4  # 40 jobs ahead at 10 jobs/s
    assert retry_after_s(41, drain_rate=10.0, capacity=4) == 5
    assert retry_after_s(3, drain_rate=50.0, capacity=4) == 1  # never below 1 s
    assert retry_after_s(10_000, drain_rate=1.0, capacity=4) == 60  # never above a minute
    assert retry_after_s(8, drain_rate=0.0, capacity=4) == 2  # nothing measured yet: by capacity
