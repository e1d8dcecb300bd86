"""A request nobody follows (a background response, a stream whose client left) that is still queued
at its ``timeout`` ends then with the ``timeout`` error, by a gateway's :class:`QueueReaper`: its
key's limits are given back and its place in the lane freed at the deadline, not when a worker at
last reads its job."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import openai
import pytest
from redis.asyncio import Redis

from breakwater.broker import Broker, RequestSpec
from breakwater.broker.ledger import day_of
from breakwater.gateway.deadlines import QueueReaper
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.redis_server import RedisServer
from breakwater.tenancy.limits import Limits
from tests.helpers import async_wait_for, queued_spec
from tests.inproc import busy_gateway

LANE = "interactive"
FAR_MS = int((time.time() + 3600) * 1000)


def _reaper(broker: Broker) -> QueueReaper:
    return QueueReaper(broker, GatewayMetrics(), ttl_s=60)


def _spec(timeout_s: float) -> RequestSpec:
    return queued_spec(timeout_s, tenant="t", key_id="k")


async def _reaped(reaper: QueueReaper, count: int) -> None:
    ended, deadline = 0, time.monotonic() + 5
    while ended < count:
        assert time.monotonic() < deadline, f"{ended} of {count} requests ended"
        ended += await reaper.tick()
        await asyncio.sleep(0.01)


async def test_the_reaper_ends_a_queued_request_at_its_deadline_and_gives_its_key_its_place(
    broker: Broker,
) -> None:
    reaper = _reaper(broker)
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


async def test_a_request_cancelled_while_queued_is_metered_when_it_leaves_the_lane(broker: Broker) -> None:
    """No worker reads its job now, and the worker that did was the one to meter it: its key's place
    and its budget hold came back only then."""
    reaper = _reaper(broker)
    one = Limits(max_concurrent=1, budget_day=1000)
    admitted = await broker.ledger.admit("t", "k", one, rids=("c",), tokens=300, deadline_ms=FAR_MS)
    assert admitted.admitted
    spec = replace(_spec(0.05), reserved_tokens=300, held_tokens=300)
    assert (await broker.enqueue(rid="c", spec=spec, max_queued=10, result_ttl_s=60)).accepted
    assert await broker.cancel("c", 60) == 1
    deadline = time.monotonic() + 5
    while await broker.queue_depth("m", LANE) != (0, 0):
        assert time.monotonic() < deadline, "the cancelled request did not leave its lane"
        assert await reaper.tick() == 0  # it had ended: not one this reaper ended
        await asyncio.sleep(0.01)
    again = await broker.ledger.admit("t", "k", one, rids=("r",), tokens=800, deadline_ms=FAR_MS)
    assert again.admitted, again
    today = day_of(time.time())
    (row,) = await broker.ledger.usage("t", today, today)
    assert row.key_id == "k" and row.counts["cancelled"] == 1


async def test_a_lane_that_fails_does_not_hold_up_the_others(broker: Broker, redis: Redis) -> None:
    reaper = _reaper(broker)
    await redis.sadd(broker.keys.lanes(), "broken\tbroken\tinteractive")
    await redis.set(broker.keys.deadlines("broken", LANE), "not a zset")  # every read of it fails
    assert (await broker.enqueue(rid="q", spec=_spec(0.05), max_queued=10, result_ttl_s=60)).accepted
    assert [lane.queue for lane in await broker.lanes()] == ["broken", "m"]
    await _reaped(reaper, 1)
    record = await broker.get_record("q")
    assert record is not None and record.status.value == "error"


async def test_a_request_not_yet_due_on_redis_clock_is_left_queued(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This host's clock may run ahead of Redis's: Redis's decides, and the request stays in its lane."""
    reaper = _reaper(broker)
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


async def test_a_request_cancelled_while_queued_gives_its_place_in_the_queue_back_at_once(
    redis_server: RedisServer, prefix: str
) -> None:
    """Its place was taken until a worker read its job (or its deadline passed): a client that
    cancelled queued work kept getting 429 `queue_full`."""
    async with busy_gateway(redis_server.url, prefix, 3.0, lane_max_queued=1) as gw, gw.sdk() as client:
        queued = await client.responses.create(model="sim", input="wait", background=True)
        with pytest.raises(openai.RateLimitError) as full:
            await client.responses.create(model="sim", input="no room", background=True)
        assert isinstance(full.value.body, dict) and full.value.body["code"] == "queue_full"
        assert (await client.responses.cancel(queued.id)).status == "cancelled"
        again = await client.responses.create(model="sim", input="room again", background=True)
        assert again.status == "queued"
        busy = (await gw.http.get(f"/v1/requests/{gw.busy_rid}")).json()
        assert busy["status"] == "running"  # no worker read the cancelled one's job meanwhile
        broker = gw.app.state.service.broker
        assert await broker.queue_depth("sim", LANE) == (1, 1)


async def test_a_job_whose_admission_was_cancelled_after_its_enqueue_is_cancelled(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its client (a request handler cancelled, a batch line stopped) never got its id, and its
    Idempotency-Key was released: it ran for nobody when a worker took it."""
    async with busy_gateway(redis_server.url, prefix, 3.0) as gw:
        rids = gw.queued_ids(monkeypatch)
        fanin = gw.app.state.service.fanin

        async def never(*_: Any) -> bool:
            await asyncio.Event().wait()
            return True

        monkeypatch.setattr(fanin, "confirm", never)  # the admission waits here, its job queued
        body = {"model": "sim", "prompt": "gone", "max_tokens": 4}
        sending = asyncio.create_task(gw.http.post("/v1/completions", json=body))
        broker = gw.app.state.service.broker
        deadline = time.monotonic() + 10
        while not rids or await broker.get_record(rids[0]) is None:
            assert time.monotonic() < deadline and not sending.done(), "the request was not queued"
            await asyncio.sleep(0.01)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        record = await broker.get_record(rids[0])
        assert record is not None and record.status.value == "cancelled"
        assert await broker.queue_depth("sim", LANE) == (0, 1)  # the busy one, in flight
