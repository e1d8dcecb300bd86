"""Preemption for fair share (bind.lua's 'preempt' mode, the joins stream) against a real Redis: when
a full worker is given a joining tenant's job, whose sequence it gives up, and when it is given
nothing (and reads nothing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from breakwater.broker import Broker, Job, RequestSpec
from breakwater.keys import GROUP, Keys

SPEC = RequestSpec(model="m", lane="interactive", kind="completion", request_id="x", timeout_s=60, prompt="p")


@pytest.fixture
async def broker(redis: Redis, prefix: str) -> AsyncIterator[Broker]:
    broker = Broker(redis, Keys(prefix))
    await broker.ensure_groups("m")
    yield broker
    await broker.fast.aclose()


async def _enqueue(broker: Broker, tenant: str, n: int, *, cost: int = 10, start: int = 0) -> list[str]:
    rids = []
    for i in range(start, start + n):
        rid = f"{tenant}-{i}"
        result = await broker.enqueue(
            rid=rid, spec=replace(SPEC, tenant=tenant), max_queued=1000, result_ttl_s=60, cost=cost
        )
        assert result.accepted
        rids.append(rid)
    return rids


async def _claim(broker: Broker, n: int, worker: str = "w1") -> list[Job]:
    jobs = await broker.claim("m", "interactive", worker, n, None)
    assert len(jobs) == n
    return jobs


async def _pending(redis: Redis, prefix: str) -> int:
    info = await redis.xpending(Keys(prefix).jobs("m", "interactive"), GROUP)
    return int(info["pending"])


async def test_a_joining_tenant_takes_a_slot_from_the_tenant_running_most(
    broker: Broker, redis: Redis, prefix: str
) -> None:
    await _enqueue(broker, "flood", 10)
    running = await _claim(broker, 4)
    assert {job.tenant for job in running} == {"flood"}
    (rid,) = await _enqueue(broker, "small", 1)
    got = await broker.claim_preempting("m", "interactive", "w1", {"flood": 4})
    assert got is not None
    job, victim = got
    assert (job.rid, job.tenant, victim) == (rid, "small", "flood")
    assert await _pending(redis, prefix) == 5  # the entry is this worker's, like any claimed one
    # The flood's backlog is untouched: its next six requests are still served in order.
    rest = await broker.claim("m", "interactive", "w2", 10, None)
    assert [j.rid for j in rest] == [f"flood-{i}" for i in range(4, 10)]


async def test_no_preemption_that_would_leave_the_victim_with_fewer_sequences(
    broker: Broker, redis: Redis, prefix: str
) -> None:
    await _enqueue(broker, "a", 2)
    await _claim(broker, 2)
    await _enqueue(broker, "b", 2)
    await _claim(broker, 1)  # b runs one here
    # a runs 2, b runs 1 and waits with one more: giving b a's slot would only swap who has more.
    assert await broker.claim_preempting("m", "interactive", "w1", {"a": 2, "b": 1}) is None
    assert await _pending(redis, prefix) == 3  # nothing was read
    # b's waiting request is still served normally when a slot frees.
    (job,) = await _claim(broker, 1, "w2")
    assert job.rid == "b-1"


async def test_a_tenant_that_has_had_more_service_does_not_preempt(
    broker: Broker, redis: Redis, prefix: str
) -> None:
    await _enqueue(broker, "light", 4, cost=10)
    await _enqueue(broker, "heavy", 2, cost=100)
    running = await _claim(broker, 5)  # heavy first (the tie goes by name), then light's four
    assert [job.tenant for job in running] == ["heavy", "light", "light", "light", "light"]
    # heavy (100 tokens of service, one more waiting) runs 1 here, light (40) runs 4 and waits for
    # nothing: light has received less, so heavy is not owed light's slot.
    assert await broker.claim_preempting("m", "interactive", "w1", {"heavy": 1, "light": 4}) is None
    assert await _pending(redis, prefix) == 5
    # Had light received more, heavy would be owed it: the same layout with light at 140.
    await redis.hset(Keys(prefix).fair("m", "interactive"), "c:light", 140)
    got = await broker.claim_preempting("m", "interactive", "w1", {"heavy": 1, "light": 4})
    assert got is not None and (got[0].rid, got[1]) == ("heavy-1", "light")


async def test_nothing_waiting_means_nothing_to_preempt_for(broker: Broker) -> None:
    await _enqueue(broker, "a", 3)
    await _claim(broker, 3)
    assert await broker.claim_preempting("m", "interactive", "w1", {"a": 3}) is None


async def test_joins_announce_a_tenant_entering_the_backlog_once(broker: Broker) -> None:
    after = {"interactive": "0-0", "batch": "0-0"}
    await _enqueue(broker, "a", 1)
    assert await broker.wait_joins("m", after, 100) == ["interactive"]
    await _enqueue(broker, "a", 2, start=1)  # still backlogged: no new announcement
    assert await broker.wait_joins("m", after, 100) == []
    await _claim(broker, 3)
    await _enqueue(broker, "a", 1, start=3)  # its list was empty again: it joins again
    await _enqueue(broker, "b", 1)
    assert await broker.wait_joins("m", after, 100) == ["interactive"]
    assert await broker.wait_joins("m", after, 100) == []
