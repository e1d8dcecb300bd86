"""A lane's deadlines (enqueue.lua, bind.lua, unqueue.lua): every request waiting for a worker is on
them until a worker binds it; one that ended while it waited (its deadline passed, or cancelled) is
taken out of its lane, so that it no longer counts toward the lane's depth and ``max_queued``, and no
worker binds it: its stream entry stays (the consumer group's lag stays known) and binds to nothing."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis

from breakwater.broker import Broker, RequestSpec
from breakwater.broker.admission import Lane, Waiting
from breakwater.keys import GROUP
from breakwater.tenancy.limits import Limits
from tests.helpers import queued_spec

LANE = "interactive"


def _spec(timeout_s: float, tenant: str = "t") -> RequestSpec:
    return queued_spec(timeout_s, tenant=tenant)


async def _queued(broker: Broker, rid: str, timeout_s: float, tenant: str = "t", limit: int = 10) -> bool:
    result = await broker.enqueue(rid=rid, spec=_spec(timeout_s, tenant), max_queued=limit, result_ttl_s=60)
    return result.accepted


async def _due(broker: Broker, count: int) -> list[Waiting]:
    deadline = time.monotonic() + 5
    while len(due := await broker.past_deadline("m", LANE, 100)) < count:
        assert time.monotonic() < deadline, f"{len(due)} of {count} requests came due"
        await asyncio.sleep(0.01)
    return due


async def test_requests_past_their_deadline_come_due_oldest_first_and_leave_the_lane(
    broker: Broker, redis: Redis
) -> None:
    for rid, tenant in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        assert await _queued(broker, rid, 0.05, tenant)
    assert await _queued(broker, "later", 60, "c")
    due = await _due(broker, 3)
    assert [w.rid for w in due] == ["a1", "a2", "b1"]
    assert [await broker.expire(w.rid, 60, queued_only=True) for w in due] == [1, 1, 1]
    assert await broker.unqueue("m", LANE, due) == ["a1", "a2", "b1"]
    # Only the request that can still run counts: its tenant, its deadline; the entries stay.
    assert await broker.queue_depth("m", LANE) == (1, 0)
    assert await redis.zrange(broker.keys.backlog("m", LANE), 0, -1) == ["c"]
    members = await redis.zrange(broker.keys.deadlines("m", LANE), 0, -1)
    assert [Waiting.of(str(m)).rid for m in members] == ["later"]
    for tenant in "ab":
        assert await redis.llen(broker.keys.waiting_prefix("m", LANE) + tenant) == 0
    stream = broker.keys.jobs("m", LANE)
    assert await redis.xlen(stream) == 4
    ((_, lag),) = [(g["name"], g["lag"]) for g in await redis.xinfo_groups(stream)]
    assert lag == 4  # known (an unread entry deleted would leave it NULL until read past)
    jobs = await broker.claim("m", LANE, "w", 10, None)
    assert [j.rid for j in jobs] == ["later", "", "", ""]  # the entries left bind to nothing
    assert await redis.hget(broker.keys.fair("m", LANE), "dead") == "0"
    assert await broker.unqueue("m", LANE, due) == []  # a second call finds nothing to take


async def test_a_lane_full_of_ended_requests_admits_again(broker: Broker) -> None:
    """They held ``max_queued`` until a worker read their jobs: a lane with no worker stayed full."""
    assert await _queued(broker, "q1", 0.05, limit=2)
    assert await _queued(broker, "q2", 0.05, limit=2)
    assert not await _queued(broker, "q3", 60, limit=2)
    due = await _due(broker, 2)
    for w in due:
        await broker.expire(w.rid, 60, queued_only=True)
    await broker.unqueue("m", LANE, due)
    assert await _queued(broker, "q3", 60, limit=2)


async def test_a_bound_request_leaves_the_deadlines_its_worker_keeps_it(broker: Broker, redis: Redis) -> None:
    assert await _queued(broker, "b", 0.05)
    (job,) = await broker.claim("m", LANE, "w", 1, None)
    assert job.rid == "b"
    assert await redis.zcard(broker.keys.deadlines("m", LANE)) == 0
    await asyncio.sleep(0.1)
    assert await broker.past_deadline("m", LANE, 100) == []


async def test_an_entry_a_worker_read_before_its_request_ended_binds_to_nothing(
    broker: Broker, redis: Redis
) -> None:
    """Read (``XREADGROUP``) and bound are two calls: the entry read meanwhile finds no request."""
    assert await _queued(broker, "r", 0.05)
    stream = broker.keys.jobs("m", LANE)
    read: Any = await redis.xreadgroup(GROUP, "w", {stream: ">"}, count=1)
    ((_, entries),) = read
    due = await _due(broker, 1)
    await broker.expire("r", 60, queued_only=True)
    assert await broker.unqueue("m", LANE, due) == ["r"]
    assert await broker.queue_depth("m", LANE) == (0, 1)
    (job,) = await broker._bind("m", LANE, entries)
    assert job.rid == ""
    assert await redis.hget(broker.keys.fair("m", LANE), "dead") == "0"
    assert await _queued(broker, "next", 60)
    assert await broker.queue_depth("m", LANE) == (1, 1)


async def test_a_request_cancelled_while_queued_leaves_the_lane_at_its_deadline(broker: Broker) -> None:
    assert await _queued(broker, "c", 0.05)
    assert await broker.cancel("c", 60) == 1
    due = await _due(broker, 1)
    assert await broker.expire("c", 60, queued_only=True) == -2
    assert await broker.unqueue("m", LANE, due) == ["c"]
    assert await broker.queue_depth("m", LANE) == (0, 0)


async def test_every_lane_queued_on_is_listed_for_the_reaper(broker: Broker) -> None:
    assert await _queued(broker, "l", 60)
    batch = RequestSpec(model="m", lane="batch", kind="completion", request_id="x", timeout_s=60, prompt="p")
    assert (
        await broker.enqueue(rid="l2", spec=batch, max_queued=10, result_ttl_s=60, queues=["m#1.0"])
    ).accepted
    assert await broker.lanes() == [Lane("m", "m", LANE), Lane("m", "m#1.0", "batch")]


async def test_a_retried_admission_on_one_redis_adds_no_second_deadline(broker: Broker, redis: Redis) -> None:
    spec = replace(_spec(60), tenant="t")
    assert (await broker.enqueue(rid="once", spec=spec, max_queued=10, result_ttl_s=60)).accepted
    await broker.enqueue(rid="once", spec=spec, max_queued=10, result_ttl_s=60)
    assert await redis.zcard(broker.keys.deadlines("m", LANE)) == 1


async def test_a_request_cancelled_while_queued_is_withdrawn_at_once(broker: Broker) -> None:
    """Out of its lane and metered at the cancel, not when a worker reads its job or at its deadline."""
    one = Limits(max_concurrent=1)
    far = int((time.time() + 600) * 1000)
    assert (await broker.ledger.admit("t", "k", one, rids=("c",), tokens=0, deadline_ms=far)).admitted
    spec = replace(_spec(600), key_id="k")
    assert (await broker.enqueue(rid="c", spec=spec, max_queued=1, result_ttl_s=60)).accepted
    assert not await _queued(broker, "full", 600, limit=1)
    assert await broker.cancel("c", 60) == 1
    record = await broker.get_record("c")
    assert record is not None
    assert await broker.withdraw("c", LANE, record.deadline_ms, ["m"]) is True
    assert await broker.queue_depth("m", LANE) == (0, 0)
    assert (await broker.ledger.admit("t", "k", one, rids=("r",), tokens=0, deadline_ms=far)).admitted
    assert await _queued(broker, "room", 600, limit=1)
    assert await broker.withdraw("c", LANE, record.deadline_ms, ["m"]) is False  # once


async def test_a_bound_request_is_not_withdrawn_its_worker_settles_it(broker: Broker) -> None:
    assert await _queued(broker, "b", 600)
    (job,) = await broker.claim("m", LANE, "w", 1, None)
    assert await broker.cancel("b", 60) == 1
    record = await broker.get_record("b")
    assert record is not None
    assert await broker.withdraw("b", LANE, record.deadline_ms, ["m"]) is False
    assert job.rid == "b" and await broker.queue_depth("m", LANE) == (0, 1)
