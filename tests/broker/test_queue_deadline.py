"""``Broker.expire(queued_only=True)``: a gateway ends its client's wait when the request is still
queued past its deadline, as a worker taking the job would (the same ``timeout`` error), on Redis's
clock, and never a request a worker has started (the deadline is the queue's)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from redis.asyncio import Redis

from breakwater.broker import Broker, RequestSpec, StartOutcome
from breakwater.broker.types import NOT_DUE
from tests.helpers import queued_spec


def _spec(timeout_s: float) -> RequestSpec:
    return queued_spec(timeout_s)


async def _queued(broker: Broker, rid: str, timeout_s: float) -> None:
    result = await broker.enqueue(rid=rid, spec=_spec(timeout_s), max_queued=10, result_ttl_s=60)
    assert result.accepted


async def test_a_request_queued_past_its_deadline_ends_with_the_timeout_error(broker: Broker) -> None:
    await _queued(broker, "q", 0.05)
    await asyncio.sleep(0.1)  # its deadline, on Redis's clock, is 50 ms after its enqueue
    assert await broker.expire("q", 60, queued_only=True) == 1
    (event,) = await broker.read_events("q", 0)
    assert event.kind == "error" and event.error is not None
    assert (event.error["code"], event.error["type"]) == ("timeout", "timeout")
    record = await broker.get_record("q")
    assert record is not None and record.status.value == "error"
    # The worker that takes its job later finds it ended: it settles the job, never runs it.
    (job,) = await broker.claim("m", "interactive", "w", 1, None)
    assert (await broker.start_job("q", "w", 3, result_ttl_s=60, alone=True)).outcome is StartOutcome.TERMINAL
    assert job.rid == "q"


async def test_before_its_deadline_on_redis_clock_nothing_is_written(broker: Broker, redis: Redis) -> None:
    """The gateway's clock may be ahead of Redis's: Redis's decides."""
    await _queued(broker, "early", 60)
    seq = await redis.hget(broker.keys.request("early"), "seq")
    assert await broker.expire("early", 60, queued_only=True) == NOT_DUE
    assert await broker.read_events("early", 0) == []
    record = await broker.get_record("early")
    assert record is not None and record.status.value == "queued"
    assert await redis.hget(broker.keys.request("early"), "seq") == seq


async def test_a_started_request_runs_on_past_its_queue_deadline(broker: Broker) -> None:
    await _queued(broker, "s", 0.3)
    await broker.claim("m", "interactive", "w", 1, None)
    assert (await broker.start_job("s", "w", 3, result_ttl_s=60, alone=True)).outcome is StartOutcome.RUN
    await asyncio.sleep(0.4)
    assert await broker.expire("s", 60, queued_only=True) == NOT_DUE
    assert await broker.read_events("s", 0) == []
    record = await broker.get_record("s")
    assert record is not None and record.status.value == "running"


async def test_an_ended_or_missing_request_is_left_as_it_is(broker: Broker) -> None:
    await _queued(broker, "c", 0.05)
    assert await broker.cancel("c", 60) == 1
    await asyncio.sleep(0.1)
    assert await broker.expire("c", 60, queued_only=True) == -2
    assert [e.error["code"] for e in await broker.read_events("c", 0) if e.error] == ["cancelled"]
    assert await broker.expire("nobody", 60, queued_only=True) == -3


async def test_a_gateway_that_ends_a_queued_request_gives_its_key_its_place_back(broker: Broker) -> None:
    """Its key's concurrency (and budget hold) were given back only when a worker at last read its
    job and settled it: a client answered 504 at the deadline got 429 for its retry meanwhile."""
    from breakwater.gateway.following import Quiet
    from breakwater.tenancy.limits import Limits

    one = Limits(max_concurrent=1)
    far = int((time.time() + 600) * 1000)
    admitted = await broker.ledger.admit("t", "k", one, rids=("q",), tokens=0, deadline_ms=far)
    assert admitted.admitted
    spec = replace(_spec(0.05), tenant="t", key_id="k")
    assert (await broker.enqueue(rid="q", spec=spec, max_queued=10, result_ttl_s=60)).accepted
    refused = await broker.ledger.admit("t", "k", one, rids=("r",), tokens=0, deadline_ms=far)
    assert not refused.admitted  # the queued request holds the key's one place
    await asyncio.sleep(0.1)
    quiet = Quiet(deadline=time.time() - 1, ttl_s=60)
    assert await quiet.spell(broker, "q", 0) is False  # (no keepalive asked for)
    record = await broker.get_record("q")
    assert record is not None and record.status.value == "error"
    again = await broker.ledger.admit("t", "k", one, rids=("r",), tokens=0, deadline_ms=far)
    assert again.admitted
