"""Broker scripts against a real Redis: bounded admission, fencing, finish, reclaim, bounded memory."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio import Redis

from breakwater.broker import Broker
from breakwater.broker.broker import Append
from breakwater.keys import GROUP, Keys


def _record(model: str = "m") -> dict[str, str]:
    return {
        "model": model,
        "lane": "interactive",
        "status": "queued",
        "attempt": "0",
        "seq": "0",
        "tokens": "0",
        "emitted": "",
        "watchers": "1",
        "kind": "completion",
        "prompt": "p",
    }


@pytest.fixture
def broker(redis: Redis, prefix: str) -> Broker:
    return Broker(redis, Keys(prefix))


async def test_full_lane_refuses_and_writes_nothing(broker: Broker, redis: Redis, prefix: str) -> None:
    for i in range(3):
        res = await broker.enqueue(
            rid=f"r{i}",
            model="m",
            lane="interactive",
            record=_record(),
            max_queued=3,
            request_id="x",
            ttl_s=60,
        )
        assert res.accepted and res.waiting == i + 1
    refused = await broker.enqueue(
        rid="r3", model="m", lane="interactive", record=_record(), max_queued=3, request_id="x", ttl_s=60
    )
    assert not refused.accepted and refused.waiting == 3
    assert not await redis.exists(broker.keys.request("r3"))
    assert await redis.xlen(broker.keys.jobs("m", "interactive")) == 3
    # Claimed (in-flight) jobs do not count against the queue bound.
    jobs = await broker.claim("m", "interactive", "w1", 2, None)
    assert [j.rid for j in jobs] == ["r0", "r1"]
    assert await broker.queue_depth("m", "interactive") == (1, 2)
    again = await broker.enqueue(
        rid="r3", model="m", lane="interactive", record=_record(), max_queued=3, request_id="x", ttl_s=60
    )
    assert again.accepted


async def test_fencing_stops_a_zombie_attempt(broker: Broker, redis: Redis) -> None:
    await broker.enqueue(
        rid="z", model="m", lane="interactive", record=_record(), max_queued=10, request_id="x", ttl_s=60
    )
    first = await broker.start_job("z", "w1", 3)
    assert first.outcome == "run" and first.attempt == 1
    assert await broker.append_step([Append("z", 1, "Hello", 1)]) == [1]
    second = await broker.start_job("z", "w2", 3)  # reclaimed by another worker
    assert second.attempt == 2 and second.record["emitted"] == "Hello"
    assert await broker.append_step([Append("z", 1, " zombie", 1), Append("z", 2, " world", 1)]) == [-1, 2]
    assert await broker.finish("z", attempt=1, kind="done", status="done", ttl_s=60) == -1
    seq = await broker.finish(
        "z",
        attempt=2,
        kind="done",
        status="done",
        ttl_s=60,
        text="!",
        tokens=1,
        finish_reason="stop",
        usage={"prompt_tokens": 1, "completion_tokens": 3},
    )
    assert seq == 4
    events = await broker.read_events("z", 0)
    assert [(e.seq, e.kind, e.text) for e in events] == [
        (1, "token", "Hello"),
        (2, "token", " world"),
        (3, "token", "!"),
        (4, "done", ""),
    ]
    assert events[-1].usage == {"prompt_tokens": 1, "completion_tokens": 3}
    assert await redis.hget(broker.keys.request("z"), "emitted") == "Hello world!"
    assert 0 < await redis.ttl(broker.keys.tokens("z")) <= 60
    assert await broker.append_step([Append("z", 2, "late", 1)]) == [-2]


async def test_cancel_is_terminal_and_idempotent(broker: Broker) -> None:
    await broker.enqueue(
        rid="c", model="m", lane="batch", record=_record(), max_queued=10, request_id="x", ttl_s=60
    )
    assert await broker.cancel("c", 60) == 1
    assert await broker.cancel("c", 60) == -2
    assert (await broker.start_job("c", "w", 3)).outcome == "terminal"
    events = await broker.read_events("c", 0)
    assert [e.kind for e in events] == ["error"]
    assert events[0].error is not None and events[0].error["code"] == "cancelled"


async def test_reclaim_after_lease_lapse_and_ack_deletes(broker: Broker, redis: Redis) -> None:
    await broker.enqueue(
        rid="l", model="m", lane="interactive", record=_record(), max_queued=10, request_id="x", ttl_s=60
    )
    [job] = await broker.claim("m", "interactive", "dead", 1, None)
    assert await broker.reclaim("m", "interactive", "alive", 60_000, 10) == []  # lease still fresh
    [taken] = await broker.reclaim("m", "interactive", "alive", 0, 10)
    assert taken.rid == "l" and taken.entry_id == job.entry_id
    pending = await redis.xpending_range(taken.stream, GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == ["alive"]
    await broker.ack(taken)
    assert await redis.xlen(taken.stream) == 0
    assert await broker.queue_depth("m", "interactive") == (0, 0)


async def test_registry_drops_dead_workers(broker: Broker, redis: Redis) -> None:
    await broker.heartbeat("w-live", {"model": "m", "capacity": 4}, ttl_s=30)
    await broker.heartbeat("w-dead", {"model": "m", "capacity": 4}, ttl_s=30)
    await redis.delete(broker.keys.worker_alive("w-dead"))
    live = await broker.live_workers()
    assert list(live) == ["w-live"]
    assert list(await redis.hkeys(broker.keys.workers())) == ["w-live"]
    assert orjson.loads(await redis.hget(broker.keys.workers(), "w-live") or "{}")["capacity"] == 4


async def test_poison_counts_attempts_without_progress(broker: Broker) -> None:
    """A crash after progress does not count; one without makes the job a suspect that runs alone;
    max_attempts of them in a row dead-letter it."""
    for rid in ("bystander", "poison"):
        await broker.enqueue(
            rid=rid, model="m", lane="interactive", record=_record(), max_queued=10, request_id="x", ttl_s=60
        )
    # attempt 1 of both; the bystander emits a token, then the worker crashes
    assert (await broker.start_job("bystander", "w1", 3)).attempt == 1
    assert (await broker.start_job("poison", "w1", 3)).attempt == 1
    assert await broker.append_step([Append("bystander", 1, "a", 1)]) == [1]
    run = await broker.start_job("bystander", "w2", 3, alone=False)
    assert run.outcome == "run" and run.record["failures"] == "0"  # progress: not a suspect
    assert (
        await broker.start_job("poison", "w2", 3, alone=False)
    ).outcome == "suspect"  # a busy worker holds it
    for attempt in (2, 3):  # alone, it crashes again without a token
        started = await broker.start_job("poison", "w3", 3, alone=True)
        assert (started.outcome, started.attempt, started.record["failures"]) == (
            "run",
            attempt,
            str(attempt - 1),
        )
    dead = await broker.start_job("poison", "w4", 3)
    assert (dead.outcome, dead.attempt) == ("poison", 3)
