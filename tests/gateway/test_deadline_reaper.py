"""A request nobody follows (a background response, a stream whose client left) that is still queued
at its ``timeout`` ends then with the ``timeout`` error, by a gateway's :class:`QueueReaper`: its
key's limits are given back and its place in the lane freed at the deadline, not when a worker at
last reads its job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from breakwater.broker import Broker, RequestSpec
from breakwater.config import GatewaySettings
from breakwater.gateway.autoscale import AutoscaleSignals
from breakwater.gateway.deadlines import QueueReaper
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.models import ModelRegistry
from breakwater.keys import Keys
from breakwater.redis_server import RedisServer
from breakwater.tenancy.limits import Limits
from tests.helpers import async_wait_for
from tests.inproc import busy_gateway

LANE = "interactive"
FAR_MS = int((time.time() + 3600) * 1000)


@pytest.fixture
async def broker(redis: Redis, prefix: str) -> AsyncIterator[Broker]:
    broker = Broker(redis, Keys(prefix))
    yield broker
    await broker.fast.aclose()


def _reaper(broker: Broker, redis_server: RedisServer, prefix: str) -> QueueReaper:
    settings = GatewaySettings(redis_url=redis_server.url, key_prefix=prefix, models="m", model_cache_s=0)
    metrics = GatewayMetrics()
    signals = AutoscaleSignals(settings, broker, ModelRegistry(settings, broker), metrics)
    return QueueReaper(broker, signals, metrics, ttl_s=60)


def _spec(timeout_s: float) -> RequestSpec:
    return RequestSpec(
        model="m",
        lane=LANE,
        kind="completion",
        request_id="x",
        timeout_s=timeout_s,
        prompt="p",
        tenant="t",
        key_id="k",
    )


async def _reaped(reaper: QueueReaper, count: int) -> None:
    ended, deadline = 0, time.monotonic() + 5
    while ended < count:
        assert time.monotonic() < deadline, f"{ended} of {count} requests ended"
        ended += await reaper.tick()
        await asyncio.sleep(0.01)


async def test_the_reaper_ends_a_queued_request_at_its_deadline_and_gives_its_key_its_place(
    broker: Broker, redis_server: RedisServer, prefix: str
) -> None:
    reaper = _reaper(broker, redis_server, prefix)
    one = Limits(max_concurrent=1)
    assert (await broker.ledger.admit("t", "k", one, rids=("q",), tokens=0, deadline_ms=FAR_MS)).admitted
    assert (await broker.enqueue(rid="q", spec=_spec(0.05), max_queued=10, result_ttl_s=60)).accepted
    other = replace(_spec(60), key_id="other")
    assert (await broker.enqueue(rid="long", spec=other, max_queued=10, result_ttl_s=60)).accepted
    assert not (await broker.ledger.admit("t", "k", one, rids=("r",), tokens=0, deadline_ms=FAR_MS)).admitted

    await _reaped(reaper, 1)
    (event,) = await broker.read_events("q", 0)
    assert event.kind == "error" and event.error is not None
    assert (event.error["code"], event.error["type"]) == ("timeout", "timeout")
    assert (await broker.ledger.admit("t", "k", one, rids=("r",), tokens=0, deadline_ms=FAR_MS)).admitted
    sample = reaper.metrics.registry.get_sample_value("breakwater_queue_timeouts_total", {"model": "m"})
    assert sample == 1
    # Out of its lane; the request still within its timeout stays queued.
    assert await broker.queue_depth("m", LANE) == (1, 0)
    long = await broker.get_record("long")
    assert long is not None and long.status.value == "queued"
    assert await reaper.tick() == 0


async def test_a_request_not_yet_due_on_redis_clock_is_left_queued(
    broker: Broker, redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This host's clock may run ahead of Redis's: Redis's decides, and the request stays in its lane."""
    reaper = _reaper(broker, redis_server, prefix)
    assert (await broker.enqueue(rid="early", spec=_spec(30), max_queued=10, result_ttl_s=60)).accepted
    real = time.time
    monkeypatch.setattr("breakwater.broker.admission.time.time", lambda: real() + 60)
    assert [w.rid for w in await broker.past_deadline("m", LANE, 10)] == ["early"]
    assert await reaper.tick() == 0
    record = await broker.get_record("early")
    assert record is not None and record.status.value == "queued"
    assert await broker.queue_depth("m", LANE) == (1, 0)
    assert [w.rid for w in await broker.past_deadline("m", LANE, 10)] == ["early"]  # asked again


async def test_a_background_response_queued_past_its_timeout_fails_at_the_deadline(
    redis_server: RedisServer, prefix: str
) -> None:
    async with busy_gateway(redis_server.url, prefix, 3.0) as gw, gw.sdk() as client:
        queued = await client.responses.create(
            model="sim", input="hi", background=True, extra_body={"timeout": 0.3}
        )
        assert queued.status == "queued"

        async def failed() -> bool:
            return (await client.responses.retrieve(queued.id)).status == "failed"

        await async_wait_for(failed, 10, what="the background response failed")
        # Ended while the worker is still busy with the request ahead (it never took this one).
        busy = (await gw.http.get(f"/v1/requests/{gw.busy_rid}")).json()
        assert busy["status"] == "running"
        response = await client.responses.retrieve(queued.id)
        assert response.error is not None and str(response.error.code) == "timeout"
        broker = gw.app.state.service.broker
        assert await broker.queue_depth("sim", LANE) == (0, 1)  # the busy one, in flight
        metrics = gw.app.state.service.metrics
        assert metrics.registry.get_sample_value("breakwater_queue_timeouts_total", {"model": "sim"}) == 1
