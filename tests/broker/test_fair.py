"""Fair share within a lane (enqueue.lua, bind.lua, ack.lua) against a real Redis: the order in which
workers receive requests of several tenants, weights, work conservation, and bindings that survive a
reclaim."""

from __future__ import annotations

from collections import Counter
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


async def _enqueue(broker: Broker, tenant: str, n: int, *, cost: int = 10, weight: float = 1.0) -> list[str]:
    rids = []
    for i in range(n):
        rid = f"{tenant}-{i}"
        result = await broker.enqueue(
            rid=rid,
            spec=replace(SPEC, tenant=tenant),
            max_queued=1000,
            result_ttl_s=60,
            cost=cost,
            weight=weight,
        )
        assert result.accepted
        rids.append(rid)
    return rids


async def _take(broker: Broker, n: int, worker: str = "w1") -> list[Job]:
    """One job at a time, as a worker with one free slot claims them; each is acked at once."""
    taken = []
    for _ in range(n):
        jobs = await broker.claim("m", "interactive", worker, 1, None)
        assert len(jobs) == 1
        taken.append(jobs[0])
        await broker.ack(jobs[0])
    return taken


async def test_a_tenant_that_floods_does_not_delay_one_that_sends_little(broker: Broker) -> None:
    await _enqueue(broker, "flood", 20)
    await _enqueue(broker, "small", 2)  # queued last, served among the first
    order = [job.tenant for job in await _take(broker, 22)]
    assert order[:4].count("small") == 2  # alternating with the flood, not behind its 20
    assert Counter(order) == {"flood": 20, "small": 2}  # nothing lost, nothing twice


async def test_backlogged_tenants_share_by_weight(broker: Broker) -> None:
    await _enqueue(broker, "heavy", 40, weight=3.0)
    await _enqueue(broker, "light", 40, weight=1.0)
    order = Counter(job.tenant for job in await _take(broker, 40))
    assert order == {"heavy": 30, "light": 10}


async def test_equal_weights_alternate_and_cost_counts(broker: Broker) -> None:
    await _enqueue(broker, "big", 10, cost=30)
    await _enqueue(broker, "small", 30, cost=10)
    tokens: Counter[str] = Counter()
    for job in await _take(broker, 24):
        tokens[job.tenant] += int(job.cost)
    assert tokens["big"] == tokens["small"] == 180  # equal tokens, not equal requests


async def test_work_conserving_and_no_banked_credit(broker: Broker) -> None:
    """A tenant alone gets every slot; one that was idle joins level with the backlogged, without
    credit for the time it sent nothing."""
    await _enqueue(broker, "busy", 30)
    assert {job.tenant for job in await _take(broker, 20)} == {"busy"}
    await _enqueue(broker, "late", 10)
    order = [job.tenant for job in await _take(broker, 10)]
    assert order[0] == "late"  # lifted to the busy one's level, it goes first (it is owed more)
    assert 4 <= order.count("late") <= 6  # then they alternate: not 10 in a row


async def test_a_reclaimed_entry_keeps_its_request(broker: Broker, redis: Redis) -> None:
    await _enqueue(broker, "t", 3)
    first = await broker.claim("m", "interactive", "dead-worker", 1, None)
    reclaimed = await broker.reclaim("m", "interactive", "w2", 0, 10)
    assert [(j.entry_id, j.rid) for j in reclaimed] == [(first[0].entry_id, first[0].rid)]
    rest = await _take(broker, 2, "w2")
    assert sorted(j.rid for j in rest + reclaimed) == ["t-0", "t-1", "t-2"]


async def test_ack_corrects_the_estimate_and_keeps_queue_signals_exact(broker: Broker, redis: Redis) -> None:
    keys = broker.keys
    await _enqueue(broker, "a", 3, cost=100)
    assert await broker.queue_depth("m", "interactive") == (3, 0)  # the stream still counts every job
    assert await broker.tenant_backlog("m", "interactive") == {"a": 3}
    [job] = await broker.claim("m", "interactive", "w1", 1, None)
    assert await broker.queue_depth("m", "interactive") == (2, 1)
    assert float(await redis.hget(keys.fair("m", "interactive"), "c:a") or 0) == 100
    await broker.ack(job, used_tokens=40)  # it used 40 of the 100 estimated
    assert float(await redis.hget(keys.fair("m", "interactive"), "c:a") or 0) == 40
    assert await redis.hlen(keys.bound("m", "interactive")) == 0
    assert await broker.queue_depth("m", "interactive") == (2, 0)
    assert (await redis.xpending(keys.jobs("m", "interactive"), GROUP))["pending"] == 0


async def test_a_second_ack_does_not_correct_the_counter_twice(broker: Broker, redis: Redis) -> None:
    await _enqueue(broker, "a", 1, cost=100)
    [job] = await broker.claim("m", "interactive", "w1", 1, None)
    await broker.ack(job, used_tokens=40)
    await broker.ack(job, used_tokens=40)  # a retry after a lost reply, or a second attempt's ack
    assert float(await redis.hget(broker.keys.fair("m", "interactive"), "c:a") or 0) == 40


async def test_credit_given_up_on_joining_does_not_come_back_with_an_ack(
    broker: Broker, redis: Redis
) -> None:
    """A tenant with a request running rejoins a backlog far ahead of it: the ack of its running
    request corrects its lifted counter, it does not send it back to where it was."""
    await _enqueue(broker, "a", 1, cost=100)
    [running] = await broker.claim("m", "interactive", "w1", 1, None)  # a: counter 100
    await _enqueue(broker, "b", 200, cost=100)
    await _take(broker, 100)  # b alone is served: its counter reaches ~10,000
    await _enqueue(broker, "a", 20, cost=100)  # a rejoins, lifted to b's level
    await broker.ack(running, used_tokens=120)  # +20 for the running one
    order = [job.tenant for job in await _take(broker, 20)]
    assert 9 <= order.count("a") <= 11, order  # they alternate; a does not take all 20


async def test_a_tenant_listed_with_nothing_waiting_does_not_swallow_an_entry(
    broker: Broker, redis: Redis
) -> None:
    await _enqueue(broker, "real", 1)
    await redis.zadd(broker.keys.backlog("m", "interactive"), {"ghost": -1.0})  # least served, empty list
    [job] = await broker.claim("m", "interactive", "w1", 1, None)
    assert (job.tenant, job.rid) == ("real", "real-0")
    assert await redis.zscore(broker.keys.backlog("m", "interactive"), "ghost") is None  # repaired
