"""Which jobs a worker pulls (worker/pulling.py), against a real Redis: a pull that already holds
jobs keeps them when a later claim fails, so a request fenced by its claim is not left to lapse; a
lane the last blocking read found empty is not read again before the next one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.broker import Broker, RequestSpec, StartOutcome
from breakwater.config import WorkerSettings
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.redis_server import RedisServer
from breakwater.worker import Worker
from tests.inproc import InProc


@pytest.fixture
async def worker(redis_server: RedisServer, prefix: str) -> AsyncIterator[Worker]:
    settings = WorkerSettings(redis_url=redis_server.url, key_prefix=prefix, worker_id="w")
    broker = Broker.connect(settings)
    worker = Worker(settings, SimEngine(SimOptions()), broker)
    await broker.ensure_groups(worker.model)
    yield worker
    await broker.aclose()


async def test_a_pull_keeps_its_jobs_when_a_later_claim_fails(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = worker.broker
    spec = RequestSpec(
        model=worker.model, lane="interactive", kind="completion", request_id="x", timeout_s=60, prompt="p"
    )
    assert (await broker.enqueue(rid="r1", spec=spec, max_queued=10, result_ttl_s=60)).accepted
    claim = broker.claim
    failed: list[str] = []

    async def batch_lost(model: str, lane: str, *args: Any) -> Any:
        if lane == "batch":
            failed.append(lane)
            raise RedisConnectionError("connection to Redis lost")
        return await claim(model, lane, *args)

    monkeypatch.setattr(broker, "claim", batch_lost)
    [job] = await worker._next_jobs(4)
    assert failed == ["batch"]
    assert job.rid == "r1" and job.started is not None  # fenced by its claim: it must run now
    assert (job.started.outcome, job.started.attempt) == (StartOutcome.RUN, 1)


JOBS = 8


async def _reads(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_xreadgroup", {}).get("calls", 0))


async def test_a_job_that_comes_alone_costs_two_reads_not_three(gw_empty: InProc, redis: Redis) -> None:
    """The interactive lane the blocking read found empty is not read again before the next blocking
    read: per job, that read and one of the batch lane (three reads before, the first one empty)."""
    await gw_empty.add_worker(block_ms=10_000)  # no read times out while the jobs come one by one
    before = await _reads(redis)
    for i in range(JOBS):
        body = {"model": "sim", "prompt": f"job {i}", "max_tokens": 2}
        response = await gw_empty.http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2
    reads = await _reads(redis) - before
    assert 2 * JOBS - 1 <= reads <= 2 * JOBS + 1, reads  # three per job: 3 * JOBS
