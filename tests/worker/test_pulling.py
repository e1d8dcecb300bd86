"""Which jobs a worker pulls (worker/pulling.py), against a real Redis: a pull that already holds
jobs keeps them when a later claim fails, so a request fenced by its claim is not left to lapse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.broker import Broker, RequestSpec, StartOutcome
from breakwater.config import WorkerSettings
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.redis_server import RedisServer
from breakwater.worker import Worker


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
