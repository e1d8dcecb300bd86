"""Broker scripts against a real Redis: bounded admission, fencing, idempotent writes, finish,
reclaim, leases, bounded memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from breakwater.broker import (
    Admission,
    Append,
    Billing,
    Broker,
    Fence,
    Lease,
    RequestSpec,
    StartOutcome,
    Status,
)
from breakwater.broker.errors import ReplicaAckError
from breakwater.broker.idempotency import Binding, IdempotencyKey
from breakwater.broker.ledger import day_of
from breakwater.broker.record import RequestRecord
from breakwater.broker.types import BEHIND, MISALIGNED
from breakwater.keys import GROUP, Keys
from breakwater.tenancy.limits import Limits
from tests.helpers import async_wait_for


def _spec(model: str = "m", lane: str = "interactive", timeout_s: float = 60.0) -> RequestSpec:
    return RequestSpec(
        model=model, lane=lane, kind="completion", request_id="x", timeout_s=timeout_s, prompt="p"
    )


async def _enqueue(broker: Broker, rid: str, max_queued: int = 10, **spec: Any) -> Any:
    return await broker.enqueue(rid=rid, spec=_spec(**spec), max_queued=max_queued, result_ttl_s=60)


async def _start(broker: Broker, rid: str, worker: str, *, alone: bool = True) -> Any:
    return await broker.start_job(rid, worker, 3, result_ttl_s=60, alone=alone)


async def _running(broker: Broker, rid: str) -> Any:
    """``rid`` queued, its job claimed and its first attempt started by worker ``w``: the job."""
    await _enqueue(broker, rid)
    (job,) = await broker.claim("m", "interactive", "w", 1, None)
    await _start(broker, rid, "w")
    return job


def _record_pipelines(broker: Broker) -> list[list[Any]]:
    """From now on, the commands of each write on the hot path's connection (sent as before)."""
    sent: list[list[Any]] = []
    pipeline = broker.fast.pipeline

    async def spy(commands: Any) -> Any:
        sent.append([c[0] for c in commands])
        return await pipeline(commands)

    broker.fast.pipeline = spy  # type: ignore[method-assign]
    return sent


@pytest.fixture
async def broker(redis: Redis, prefix: str) -> AsyncIterator[Broker]:
    broker = Broker(redis, Keys(prefix))
    yield broker
    await broker.fast.aclose()


async def test_full_lane_refuses_and_writes_nothing(broker: Broker, redis: Redis) -> None:
    for i in range(3):
        res = await _enqueue(broker, f"r{i}", max_queued=3)
        assert res.accepted and res.waiting == i + 1
    refused = await _enqueue(broker, "r3", max_queued=3)
    assert not refused.accepted and refused.waiting == 3
    assert not await redis.exists(broker.keys.request("r3"))
    assert await redis.xlen(broker.keys.jobs("m", "interactive")) == 3
    # Claimed (in-flight) jobs do not count against the queue bound.
    jobs = await broker.claim("m", "interactive", "w1", 2, None)
    assert [j.rid for j in jobs] == ["r0", "r1"]
    assert await broker.queue_depth("m", "interactive") == (1, 2)
    assert (await _enqueue(broker, "r3", max_queued=3)).accepted


async def test_a_full_partition_passes_the_job_on_and_all_full_refuses(broker: Broker, redis: Redis) -> None:
    """A hot model's partitions tried in turn: the job joins the first with room; refused only when
    every one is full, with their total waiting and nothing written."""
    queues = ["m", "m#1.0", "m#2.0"]
    spec = _spec()
    for i in range(2):
        res = await broker.enqueue(rid=f"p{i}", spec=spec, max_queued=1, result_ttl_s=60, queues=queues)
        assert res.accepted and res.queue == queues[i] and res.waiting == 1
    third = await broker.enqueue(rid="p2", spec=spec, max_queued=1, result_ttl_s=60, queues=queues[::-1])
    assert third.queue == "m#2.0"
    refused = await broker.enqueue(rid="p3", spec=spec, max_queued=1, result_ttl_s=60, queues=queues)
    assert not refused.accepted and refused.waiting == 3
    assert not await redis.exists(broker.keys.request("p3"))
    assert [await redis.xlen(broker.keys.jobs(q, "interactive")) for q in queues] == [1, 1, 1]
    again = await broker.enqueue(rid="p0", spec=spec, max_queued=1, result_ttl_s=60, queues=queues)
    assert again.admission is Admission.ALREADY_QUEUED  # a retry, not a second job


async def test_retried_enqueue_is_admitted_once(broker: Broker, redis: Redis) -> None:
    """A retry whose first reply was lost must not answer 429 while the job runs unwatched."""
    first = await _enqueue(broker, "dup", max_queued=1)
    again = await _enqueue(broker, "dup", max_queued=1)  # the lane is full now, but this is the same job
    assert first.admission is Admission.QUEUED
    assert again.admission is Admission.ALREADY_QUEUED and again.accepted
    assert await redis.xlen(broker.keys.jobs("m", "interactive")) == 1


@pytest.mark.parametrize("timeout_s", [1e16, float("inf")])
async def test_invalid_timeout_writes_nothing(broker: Broker, redis: Redis, timeout_s: float) -> None:
    with pytest.raises((ResponseError, OverflowError)):
        await _enqueue(broker, "bad", timeout_s=timeout_s)
    assert not await redis.exists(broker.keys.request("bad"))
    assert not await redis.exists(broker.keys.jobs("m", "interactive"))


async def test_record_has_a_ttl_and_redis_clock_deadline(broker: Broker, redis: Redis) -> None:
    await _enqueue(broker, "t", timeout_s=30)
    assert 60 < await redis.ttl(broker.keys.request("t")) <= 90
    record = await broker.get_record("t")
    assert record is not None and record.status is Status.QUEUED
    assert record.deadline_ms - record.created_ms == 30_000
    assert abs(record.created_ms - await broker.now_ms()) < 5_000


async def test_fencing_stops_a_zombie_attempt(broker: Broker, redis: Redis) -> None:
    await _enqueue(broker, "z")
    first = await _start(broker, "z", "w1")
    assert first.outcome is StartOutcome.RUN and first.attempt == 1
    assert await broker.append_step([Append("z", 1, 1, "Hello", 1)]) == [1]
    second = await _start(broker, "z", "w2")  # reclaimed by another worker
    assert second.attempt == 2 and second.record.emitted == "Hello" and second.record.tokens == 1
    zombie, fresh = Append("z", 1, 2, " zombie", 1), Append("z", 2, 1, " world", 1)
    assert await broker.append_step([zombie, fresh]) == [-1, 2]
    assert await broker.finish("z", attempt=1, kind="done", status=Status.DONE, ttl_s=60) == -1
    seq = await broker.finish(
        "z",
        attempt=2,
        kind="done",
        status=Status.DONE,
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
    record = await broker.get_record("z")
    assert record is not None and record.emitted == "Hello world!" and record.status is Status.DONE
    for key in (broker.keys.tokens("z"), broker.keys.emitted("z"), broker.keys.request("z")):
        assert 0 < await redis.ttl(key) <= 60
    assert await broker.append_step([Append("z", 2, 2, "late", 1)]) == [-2]


async def test_a_write_out_of_step_with_the_records_text_is_refused_and_writes_nothing(
    broker: Broker, redis: Redis
) -> None:
    """Each write says where it starts (the record's token count before it): one that would not
    continue the text exactly (a worker out of step with the record) is refused, in its batch alone."""
    for rid in ("p", "q"):
        await _enqueue(broker, rid)
        await _start(broker, rid, "w1")
    first = [Append("p", 1, 1, "Hello", 2, at=0), Append("q", 1, 1, "Hi", 1, at=0)]
    assert await broker.append_step(first) == [1, 1]
    stale = Append("p", 1, 2, " again", 1, at=0)  # starts where the text began, not where it ends
    assert await broker.append_step([stale, Append("q", 1, 2, " there", 1, at=1)]) == [MISALIGNED, 2]
    record = await broker.get_record("p")
    assert record is not None and (record.emitted, record.tokens, record.seq) == ("Hello", 2, 1)
    assert [e.text for e in await broker.read_events("p", 0)] == ["Hello"]
    assert await broker.append_step([Append("p", 1, 2, " world", 1, at=2)]) == [2]  # in step: taken
    assert await broker.append_step([Append("p", 1, 2, " world", 1, at=2)]) == [2]  # a retry: once
    record = await broker.get_record("p")
    assert record is not None and (record.emitted, record.tokens) == ("Hello world", 3)


async def test_a_step_is_one_round_trip_even_after_a_lost_script_cache(broker: Broker, redis: Redis) -> None:
    """A step's appends for all sequences go out as one EVALSHA (no SCRIPT EXISTS before it); a Redis
    that restarted with an empty script cache (the chaos suite's restart) is answered by loading the
    script and resending, not by a crash."""
    await _enqueue(broker, "sc")
    await _enqueue(broker, "sd")
    await _start(broker, "sc", "w1")
    await _start(broker, "sd", "w1")
    await redis.script_flush()
    await redis.config_resetstat()
    step = [Append("sc", 1, 1, "a", 1), Append("sd", 1, 1, "b", 1)]
    assert await broker.append_step(step) == [1, 1]
    assert await broker.append_step([Append("sc", 1, 2, "c", 1), Append("sd", 1, 2, "d", 1)]) == [2, 2]
    stats = await redis.info("commandstats")
    assert "cmdstat_script|exists" not in stats
    assert stats["cmdstat_script|load"]["calls"] == 1
    assert stats["cmdstat_evalsha"]["calls"] == 3  # refused (NOSCRIPT), resent, the next step
    assert [e.text for e in await broker.read_events("sc", 0)] == ["a", "c"]


async def test_a_retried_append_is_applied_once(broker: Broker) -> None:
    """The reply of an append is lost and the worker sends it again: one event, not two."""
    await _enqueue(broker, "a")
    await _start(broker, "a", "w1")
    write = Append("a", 1, 1, "Hello", 1)
    assert await broker.append_step([write]) == [1]
    assert await broker.append_step([write]) == [1]  # the retry
    assert await broker.append_step([Append("a", 1, 2, " there", 1)]) == [2]
    assert [e.text for e in await broker.read_events("a", 0)] == ["Hello", " there"]
    record = await broker.get_record("a")
    assert record is not None and (record.emitted, record.tokens, record.seq) == ("Hello there", 2, 2)


async def test_emitted_text_is_appended_not_rewritten(broker: Broker, redis: Redis) -> None:
    """O(1) per token: the text lives in its own string key, the hash never holds it."""
    await _enqueue(broker, "long")
    await _start(broker, "long", "w1")
    for i in range(1, 201):
        await broker.append_step([Append("long", 1, i, "x", 1)])
    assert await redis.strlen(broker.keys.emitted("long")) == 200
    assert not await redis.hexists(broker.keys.request("long"), "emitted")


async def test_cancel_is_terminal_and_idempotent(broker: Broker) -> None:
    await _enqueue(broker, "c", lane="batch")
    assert await broker.cancel("c", 60) == 1
    assert await broker.cancel("c", 60) == -2
    assert (await _start(broker, "c", "w")).outcome is StartOutcome.TERMINAL
    events = await broker.read_events("c", 0)
    assert [e.kind for e in events] == ["error"]
    assert events[0].error is not None and events[0].error["code"] == "cancelled"


async def test_reclaim_after_lease_lapse_and_ack_deletes(broker: Broker, redis: Redis) -> None:
    await _enqueue(broker, "l")
    [job] = await broker.claim("m", "interactive", "dead", 1, None)
    assert await broker.reclaim("m", "interactive", "alive", 60_000, 10) == []  # lease still fresh
    [taken] = await broker.reclaim("m", "interactive", "alive", 0, 10)
    assert taken.rid == "l" and taken.entry_id == job.entry_id
    pending = await redis.xpending_range(taken.stream, GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == ["alive"]
    await broker.ack(taken)
    assert await redis.xlen(taken.stream) == 0
    assert await broker.queue_depth("m", "interactive") == (0, 0)


async def test_the_queue_lag_stays_known_when_jobs_end_out_of_order(broker: Broker, redis: Redis) -> None:
    """The job read last ends first while an older one runs and three wait: the consumer group's
    lag (what KEDA's redis-streams trigger reads) stays 3, not NULL, and new entries still get
    later ids."""
    for i in range(5):
        await _enqueue(broker, f"o{i}")
    older, last = await broker.claim("m", "interactive", "w", 2, None)
    stream = broker.keys.jobs("m", "interactive")

    async def lag() -> Any:
        ((name, value),) = [(g["name"], g["lag"]) for g in await redis.xinfo_groups(stream)]
        assert name == GROUP
        return value

    assert await lag() == 3
    await broker.ack(last)
    assert await lag() == 3
    assert await broker.queue_depth("m", "interactive") == (3, 1)
    await _enqueue(broker, "o5")
    newest: Any = await redis.xrevrange(stream, count=1)
    assert tuple(map(int, str(newest[0][0]).split("-"))) > tuple(map(int, last.entry_id.split("-")))
    assert await lag() == 4
    await broker.ack(older)
    assert await lag() == 4
    assert [j.rid for j in await broker.claim("m", "interactive", "w", 4, None)] == ["o2", "o3", "o4", "o5"]
    assert await lag() == 0


async def test_the_queue_lag_stays_known_when_the_newest_job_ends_first(broker: Broker, redis: Redis) -> None:
    """The job read last, the stream's newest entry, ends while an older one runs; then jobs queue
    behind it before any worker reads: the lag counts them (it was NULL until a worker read)."""
    for i in range(2):
        await _enqueue(broker, f"n{i}")
    older, newest = await broker.claim("m", "interactive", "w", 2, None)
    await broker.ack(newest)
    stream = broker.keys.jobs("m", "interactive")
    for i in range(2, 6):
        await _enqueue(broker, f"n{i}")
        ((lag,),) = [(g["lag"],) for g in await redis.xinfo_groups(stream)]
        assert lag == i - 1
    await broker.ack(older)
    assert [g["lag"] for g in await redis.xinfo_groups(stream)] == [4]


async def test_too_few_replica_acks_cancel_a_request_that_has_not_ended(redis: Redis, prefix: str) -> None:
    """``replica_ack`` on a Redis without replicas: the wait times out, the request is cancelled
    and the caller told to retry."""
    broker = Broker(redis, Keys(prefix), replica_ack=1, replica_ack_ms=50)
    try:
        with pytest.raises(ReplicaAckError, match="0 of 1 replicas"):
            await _enqueue(broker, "unacked")
        record = await broker.get_record("unacked")
        assert record is not None and record.status is Status.CANCELLED
    finally:
        await _close(broker)


async def _close(broker: Broker) -> None:
    """A broker's own connections (not the shared client the fixture closes)."""
    if broker._admit is not broker.fast:
        await broker._admit.aclose()
    await broker.fast.aclose()


async def test_a_request_that_ended_during_the_replica_wait_stands(redis: Redis, prefix: str) -> None:
    """The job is visible to workers during the wait: one ran it to its end before too few replicas
    answered. Its answer is written, so it is not cancelled nor the client told to retry (a retry
    would generate it twice)."""
    broker = Broker(redis, Keys(prefix), replica_ack=1, replica_ack_ms=1500)
    worker = Broker(redis, Keys(prefix))
    try:
        await _ended_during_the_wait(broker, worker, redis)
    finally:
        for b in (broker, worker):
            await _close(b)


async def _ended_during_the_wait(broker: Broker, worker: Broker, redis: Redis) -> None:
    admitted = asyncio.create_task(_enqueue(broker, "quick"))
    jobs: list[Any] = []

    async def claimed() -> bool:
        if await redis.exists(worker.keys.jobs("m", "interactive")):  # (queued: the group exists)
            jobs.extend(await worker.claim("m", "interactive", "w", 1, None))
        return bool(jobs)

    await async_wait_for(claimed, timeout_s=1)
    assert [j.rid for j in jobs] == ["quick"] and not admitted.done()
    await _start(worker, "quick", "w")
    await worker.finish("quick", attempt=1, text="hi", tokens=1, kind="done", status=Status.DONE, ttl_s=60)
    result = await admitted
    assert result.admission is Admission.QUEUED
    record = await worker.get_record("quick")
    assert record is not None and record.status is Status.DONE
    assert [e.kind for e in await worker.read_events("quick", 0)] == ["token", "done"]


async def test_reclaim_reaches_dead_jobs_behind_many_healthy_ones(broker: Broker, redis: Redis) -> None:
    """Lapsed entries are found wherever they sit in the pending list: one call for each of them,
    with a long run of healthy pending entries before them (``XAUTOCLAIM``, used before, scanned at
    most 10 x COUNT entries a call and needed a cursor to get past them)."""
    for i in range(100):
        await _enqueue(broker, f"h{i}", max_queued=1000)
    for i in range(3):
        await _enqueue(broker, f"d{i}", max_queued=1000)
    healthy = await broker.claim("m", "interactive", "busy", 100, None)
    dead = await broker.claim("m", "interactive", "dead", 3, None)
    stream = broker.keys.jobs("m", "interactive")
    # The dead worker's entries have been idle for a minute; the busy worker's are fresh.
    await redis.xclaim(stream, GROUP, "dead", 0, [j.entry_id for j in dead], idle=60_000, justid=True)
    got: list[str] = []
    for _ in range(3):
        got += [j.rid for j in await broker.reclaim("m", "interactive", "rescuer", 30_000, 1)]
    assert got == ["d0", "d1", "d2"] and len(healthy) == 100
    assert await broker.reclaim("m", "interactive", "rescuer", 30_000, 1) == []


async def test_reclaim_drops_entries_deleted_from_the_stream(broker: Broker, redis: Redis) -> None:
    """A lapsed entry whose stream entry is gone is not handed out, and leaves the pending list."""
    for rid in ("gone", "kept"):
        await _enqueue(broker, rid)
    jobs = {j.rid: j for j in await broker.claim("m", "interactive", "dead", 2, None)}
    stream = broker.keys.jobs("m", "interactive")
    await redis.xdel(stream, jobs["gone"].entry_id)
    [taken] = await broker.reclaim("m", "interactive", "rescuer", 0, 2)
    assert taken.rid == "kept"
    pending = await redis.xpending_range(stream, GROUP, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(jobs["kept"].entry_id, "rescuer")]


async def test_lease_refresh_never_takes_back_a_newer_attempt(broker: Broker, redis: Redis) -> None:
    await _enqueue(broker, "own")
    [job] = await broker.claim("m", "interactive", "old", 1, None)
    await _start(broker, "own", "old")
    [taken] = await broker.reclaim("m", "interactive", "new", 0, 1)
    await _start(broker, "own", "new")  # attempt 2 runs on "new"
    lost = await broker.refresh_leases([Lease(job, 1)], "old", result_ttl_s=60)
    assert lost == [Lease(job, 1)]
    pending = await redis.xpending_range(taken.stream, GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == ["new"]
    assert await broker.refresh_leases([Lease(taken, 2)], "new", result_ttl_s=60) == []


async def test_a_running_request_outlives_its_first_ttl(broker: Broker, redis: Redis) -> None:
    """The TTL set at admission must not expire a record while its job still runs."""
    job = await _running(broker, "slow")
    await broker.append_step([Append("slow", 1, 1, "a", 1)])
    for key in (broker.keys.request("slow"), broker.keys.emitted("slow"), broker.keys.tokens("slow")):
        await redis.expire(key, 2)  # about to expire
    assert await broker.refresh_leases([Lease(job, 1)], "w", result_ttl_s=3600) == []
    for key in (broker.keys.request("slow"), broker.keys.emitted("slow"), broker.keys.tokens("slow")):
        assert await redis.ttl(key) > 3000


async def test_one_refresh_answers_each_lease_and_extends_only_ttls_running_low(
    broker: Broker, redis: Redis
) -> None:
    """All of a worker's leases in one call: each answered on its own (kept, taken over, ended), and
    a long TTL is set again only when it ran a minute below full, not at every beat."""
    for rid in ("taken", "low", "fresh", "ended"):  # "taken" first: the reclaim below finds it
        await _enqueue(broker, rid)
    jobs = {j.rid: j for j in await broker.claim("m", "interactive", "w", 4, None)}
    for rid in jobs:
        await _start(broker, rid, "w")
        await broker.append_step([Append(rid, 1, 1, "a", 1)])
    [retaken] = await broker.reclaim("m", "interactive", "other", 0, 1)
    assert retaken.rid == "taken"
    await _start(broker, "taken", "other")  # its attempt 2 runs elsewhere
    await broker.finish("ended", attempt=1, kind="done", status=Status.DONE, ttl_s=60)
    keys = broker.keys
    low = (keys.request("low"), keys.emitted("low"), keys.tokens("low"))
    fresh = (keys.request("fresh"), keys.emitted("fresh"), keys.tokens("fresh"))
    for key in low:
        await redis.expire(key, 100)
    for key in fresh:
        await redis.expire(key, 3590)
    leases = [Lease(jobs[rid], 1) for rid in ("low", "fresh", "taken", "ended")]
    lost = await broker.refresh_leases(leases, "w", result_ttl_s=3600)
    assert lost == [Lease(jobs["taken"], 1)]
    assert [await redis.ttl(key) > 3590 for key in low] == [True] * 3
    assert [3580 < await redis.ttl(key) <= 3590 for key in fresh] == [True] * 3


async def test_attach_and_detach_never_recreate_an_expired_record(broker: Broker, redis: Redis) -> None:
    assert await broker.attach("gone") is False
    await broker.detach("gone")
    assert not await redis.exists(broker.keys.request("gone"))
    await _enqueue(broker, "here")
    assert await broker.attach("here") is True
    await broker.detach("here")
    now_ms, [watch] = await broker.watch(["here"])
    assert watch.watchers == 1 and abs(watch.detached_ms - now_ms) < 5_000


async def test_idempotency_key_claim_rebind_release(broker: Broker) -> None:
    k = IdempotencyKey("tenant-a", "k", "body1")
    assert await broker.claim_idempotency_key(k, "r1", 60) is None
    assert await broker.claim_idempotency_key(k, "r2", 60) == Binding("r1", "body1")
    assert await broker.rebind_idempotency_key(k, "r2", 60, was="r0") is False  # not bound to r0
    assert await broker.rebind_idempotency_key(k, "r2", 60, was="r1") is True
    await broker.release_idempotency_key(k, "r1")  # not its holder: kept
    assert await broker.claim_idempotency_key(k, "r3", 60) == Binding("r2", "body1")
    await broker.release_idempotency_key(k, "r2")
    assert await broker.claim_idempotency_key(k, "r3", 60) is None


async def test_idempotency_keys_are_per_tenant_and_remember_the_body(broker: Broker) -> None:
    a, b = IdempotencyKey("tenant-a", "k", "body1"), IdempotencyKey("tenant-b", "k", "body1")
    assert await broker.claim_idempotency_key(a, "ra", 60) is None
    assert await broker.claim_idempotency_key(b, "rb", 60) is None  # the same key, another tenant
    other_body = IdempotencyKey("tenant-a", "k", "body2")
    found = await broker.claim_idempotency_key(other_body, "rc", 60)
    assert found == Binding("ra", "body1") and not other_body.matches(found)


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
        await _enqueue(broker, rid)
    # attempt 1 of both; the bystander emits a token, then the worker crashes
    assert (await _start(broker, "bystander", "w1")).attempt == 1
    assert (await _start(broker, "poison", "w1")).attempt == 1
    assert await broker.append_step([Append("bystander", 1, 1, "a", 1)]) == [1]
    run = await _start(broker, "bystander", "w2", alone=False)
    assert run.outcome is StartOutcome.RUN and run.record.failures == 0  # progress: not a suspect
    suspect = await _start(broker, "poison", "w2", alone=False)
    assert suspect.outcome is StartOutcome.SUSPECT  # a busy worker holds it
    for attempt in (2, 3):  # alone, it crashes again without a token
        started = await _start(broker, "poison", "w3", alone=True)
        assert (started.outcome, started.attempt, started.record.failures) == (
            StartOutcome.RUN,
            attempt,
            attempt - 1,
        )
    dead = await _start(broker, "poison", "w4")
    assert (dead.outcome, dead.attempt) == (StartOutcome.POISON, 3)


async def test_lease_refresh_keeps_finished_and_cancelled_jobs_for_their_ack(
    broker: Broker, redis: Redis
) -> None:
    """Only a newer attempt takes a lease away; a job that just finished or was cancelled stays this
    worker's to acknowledge (dropping it unacknowledged would leave its entry pending)."""
    for rid in ("fin", "can"):
        await _enqueue(broker, rid)
    jobs = {j.rid: j for j in await broker.claim("m", "interactive", "w", 2, None)}
    for rid in ("fin", "can"):
        await _start(broker, rid, "w")
    await broker.finish("fin", attempt=1, kind="done", status=Status.DONE, ttl_s=60)
    await broker.cancel("can", 60)
    leases = [Lease(jobs["fin"], 1), Lease(jobs["can"], 1)]
    assert await broker.refresh_leases(leases, "w", result_ttl_s=60) == []
    pending = await redis.xpending_range(broker.keys.jobs("m", "interactive"), GROUP, "-", "+", 10)
    assert sorted(p["consumer"] for p in pending) == ["w", "w"]


async def test_writes_a_failover_lost_are_reported_behind_then_resent(broker: Broker, redis: Redis) -> None:
    """A promoted replica lacks the attempt's last writes: the next append and the finish report
    how far the record got (BEHIND - its last write) and write nothing; the writes sent again from
    there get their seqs back, and then the finish lands (worker/repair.py)."""
    await _enqueue(broker, "f")
    await _start(broker, "f", "w1")
    writes = [Append("f", 1, i, text, 1) for i, text in enumerate(["a", "b", "c"], 1)]
    assert await broker.append_step(writes) == [1, 2, 3]
    keys = broker.keys  # as the replica holds it: only the first write arrived
    await redis.hset(keys.request("f"), mapping={"seq": 1, "wseq": 1, "tokens": 1})
    # Its stream holds only the first entry and has never seen the others (rebuilt: Valkey refuses
    # the XSETID back that would follow an XDEL on Redis).
    raw: Any = redis  # redis-py 8 types XRANGE's reply as optional
    [(first_id, first)] = await raw.xrange(keys.tokens("f"), "1-0", "1-0")
    await redis.delete(keys.tokens("f"))
    await raw.xadd(keys.tokens("f"), first, id=first_id)
    await redis.set(keys.emitted("f"), "a")

    def finish() -> Any:
        return broker.finish("f", attempt=1, kind="done", status=Status.DONE, ttl_s=60, written=4)

    assert await broker.append_step([Append("f", 1, 4, "d", 1)]) == [BEHIND - 1]
    assert await finish() == BEHIND - 1
    assert [(e.seq, e.text) for e in await broker.read_events("f", 0)] == [(1, "a")]
    assert await broker.append_step([*writes[1:], Append("f", 1, 4, "d", 1)]) == [2, 3, 4]
    assert await finish() == 5
    events = await broker.read_events("f", 0)
    assert [(e.seq, e.kind, e.text) for e in events][:4] == [(i, "token", t) for i, t in enumerate("abcd", 1)]
    record = await broker.get_record("f")
    assert record is not None and record.status is Status.DONE and record.emitted == "abcd"


async def test_finish_read_gives_the_terminal_record_settle_meters_without_reading_again(
    broker: Broker, redis: Redis
) -> None:
    job = await _running(broker, "fr")
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    end: dict[str, Any] = {"kind": "done", "status": Status.DONE, "ttl_s": 60, "usage": usage}
    seq, record = await broker.finish_read("fr", attempt=1, text="hi", tokens=5, finish_reason="stop", **end)
    assert seq == 2  # the text, then the terminal event
    assert record is not None and record.status is Status.DONE and record.usage == usage
    assert (record.spec.model, record.spec.lane, record.tokens) == ("m", "interactive", 5)
    sent: list[tuple[Any, ...]] = []
    execute = broker.fast.execute

    async def spy(*args: Any) -> Any:  # the real call, recorded
        sent.append(args)
        return await execute(*args)

    broker.fast.execute = spy  # type: ignore[method-assign]
    metered = await broker.settle(job, record)
    assert metered is record  # counted now, from the record the finish read
    assert not [c for c in sent if c[0] == "HMGET"]  # no second read of the record
    assert await redis.xlen(broker.keys.jobs("m", "interactive")) == 0  # acknowledged
    assert await broker.settle(job) is None  # settled once: metering is not repeated
    # A fenced-off attempt's finish writes nothing; what it read is the record as it stands.
    seq, record = await broker.finish_read("fr", attempt=7, **end)
    assert seq == -1 and record is not None and record.status is Status.DONE


async def test_a_finish_without_text_counts_its_tokens_and_writes_no_token_event(broker: Broker) -> None:
    """An answer that ends on a token with no text (end of sequence): the record counts it, as the
    usage does; no token event is written for it, nor its logprobs entry (an entry is a token of the
    text)."""
    await _running(broker, "eos")
    await broker.append_step([Append("eos", 1, 1, "Hi", 1, "")])
    end: dict[str, Any] = {"kind": "done", "status": Status.DONE, "ttl_s": 60, "finish_reason": "stop"}
    lp = '[{"token": "<eos>", "logprob": -0.1, "bytes": [], "top_logprobs": []}]'
    seq = await broker.finish("eos", attempt=1, text="", tokens=1, logprobs=lp, written=1, **end)
    assert seq == 2  # the text's event, then the terminal one: none between
    record = await broker.get_record("eos")
    assert record is not None and record.tokens == 2
    events = await broker.read_events("eos", 0, 10)
    assert [(e.kind, e.text, e.logprobs) for e in events] == [("token", "Hi", None), ("done", "", None)]


async def test_settle_meters_and_acks_in_one_call_and_never_acks_what_it_could_not_meter(
    broker: Broker, redis: Redis
) -> None:
    """settle.lua (one Redis): metering and the ack go in one round trip, the metering first, so a
    settle whose metering fails leaves the job pending (reclaimed and settled again), as two calls did.
    meter.lua checks its arguments before its first write: the failed call counted nothing, so the
    settle that follows meters the request, once."""
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    end: dict[str, Any] = {"kind": "done", "status": Status.DONE, "ttl_s": 60, "usage": usage}
    jobs = []
    for rid in ("s1", "s2"):
        job = await _running(broker, rid)
        _, record = await broker.finish_read(rid, attempt=1, text="hi", tokens=5, finish_reason="stop", **end)
        assert record is not None
        jobs.append((job, record))
    assert broker._settle is not None
    await broker._settle.load()  # in Redis's script cache whatever ran before: one call, not a reload
    sent = _record_pipelines(broker)
    (job, record), (bad_job, bad_record) = jobs
    assert await broker.settle(job, record) is record
    assert sent == [["EVALSHA"]]  # one call for both
    day_usage = broker.keys.usage(record.spec.tenant, day_of(record.created))
    assert await redis.hmget(day_usage, "*:completed", "*:prompt_tokens", "*:completion_tokens") == [
        "1",
        "3",
        "5",
    ]
    assert await redis.xlen(broker.keys.jobs("m", "interactive")) == 1  # s1's entry acked; s2's waits
    # A reservation metering cannot read fails the script in its metering: nothing is acknowledged.
    broken = replace(bad_record, spec=replace(bad_record.spec, reserved_tokens="many"))  # type: ignore[arg-type]
    with pytest.raises(ResponseError):
        await broker.settle(bad_job, broken)
    assert await redis.xlen(broker.keys.jobs("m", "interactive")) == 1
    assert [p["message_id"] for p in await redis.xpending_range(bad_job.stream, GROUP, "-", "+", 5)] == [
        bad_job.entry_id
    ]
    assert await redis.hmget(day_usage, "*:completed", "*:prompt_tokens", "*:completion_tokens") == [
        "1",
        "3",
        "5",
    ]  # nothing of it counted
    assert not await redis.sismember(broker.keys.metered(record.spec.tenant, day_of(record.created)), "s2")
    assert await broker.settle(bad_job, bad_record) is bad_record  # metered now, once
    assert await redis.hmget(day_usage, "*:completed", "*:prompt_tokens", "*:completion_tokens") == [
        "2",
        "6",
        "10",
    ]
    assert await broker.settle(bad_job, bad_record) is None
    assert await redis.xlen(broker.keys.jobs("m", "interactive")) == 0


async def test_a_completed_finish_settles_its_job_in_the_same_call(broker: Broker, redis: Redis) -> None:
    """finish_settle.lua (one Redis): the finish of a completed request, its metering and its ack in
    one round trip. A call that wrote no terminal event (a retry after a lost reply, a fenced-off
    attempt) settles nothing: the job stays pending for the settle that follows, as before."""
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    end: dict[str, Any] = {"kind": "done", "status": Status.DONE, "ttl_s": 60, "usage": usage}
    jobs = []
    for rid in ("c1", "c2"):
        job = await _running(broker, rid)
        record = await broker.get_record(rid)
        assert record is not None
        jobs.append((job, Billing.of(record)))
    assert broker.settles_in_finish and broker._finish_settle is not None
    await broker._finish_settle.load()  # in the script cache: one call, not a reload
    sent = _record_pipelines(broker)
    (job, billing), (other_job, other_billing) = jobs
    done = await broker.finish_settle(
        job, billing, 3, 5, attempt=1, text="hi", tokens=5, finish_reason="stop", **end
    )
    assert done == (2, True)  # the text, then the terminal event; metered now
    assert sent == [["EVALSHA"]]
    events = await broker.read_events("c1", 0)
    assert [(e.seq, e.kind, e.text) for e in events] == [(1, "token", "hi"), (2, "done", "")]
    record = await broker.get_record("c1")
    assert record is not None and record.status is Status.DONE and record.usage == usage
    day_usage = broker.keys.usage(billing.tenant, day_of(billing.created))
    counted = ["1", "3", "5"]
    assert await redis.hmget(day_usage, "*:completed", "*:prompt_tokens", "*:completion_tokens") == counted
    pending = await redis.xpending_range(job.stream, GROUP, "-", "+", 5)
    assert [p["message_id"] for p in pending] == [other_job.entry_id]  # c1's entry acked, c2's not
    # Sent again (its reply lost): already terminal, so nothing is written, metered or acked again.
    again = await broker.finish_settle(job, billing, 3, 5, attempt=1, text="hi", tokens=5, **end)
    assert again == (-2, None)
    assert len(await broker.read_events("c1", 0)) == 2
    assert await redis.hmget(day_usage, "*:completed", "*:prompt_tokens", "*:completion_tokens") == counted
    # A fenced-off attempt writes nothing and settles nothing: its job stays pending.
    assert await broker.finish_settle(other_job, other_billing, 3, 5, attempt=7, **end) == (-1, None)
    assert await redis.hget(broker.keys.request("c2"), "status") == "running"
    assert await redis.hmget(day_usage, "*:completed") == ["1"]
    assert await redis.xlen(broker.keys.jobs("m", "interactive")) == 1


async def test_a_budget_hold_apart_from_the_rate_reservation_is_given_back_whole(
    broker: Broker, redis: Redis
) -> None:
    """A request without max_tokens reserves a little against tokens per minute and holds its whole
    context against the budgets (gateway.limits.hold): admission takes each where it belongs, and
    metering, in settle.lua and in finish_settle.lua, gives the hold back whole and refunds the
    rate what was reserved beyond the use."""
    limits = Limits(tpm=60_000, budget_day=10_000)
    for rid, in_finish in (("h1", False), ("h2", True)):
        decision = await broker.ledger.admit(
            "t", "k", limits, rids=[rid], tokens=10, held=4_000, deadline_ms=2**50, tenant_limits=None
        )
        assert decision.admitted
        day_usage = broker.keys.usage("t", day_of(time.time()))
        assert await redis.hmget(day_usage, "k:held", "*:held") == ["4000", "4000"]
        limiter = broker.keys.limiter("t", "k")
        ahead = float(await redis.hget(limiter, "tok_tat") or 0) - time.time() * 1000
        assert 0 < ahead <= 60  # 10 tokens at 1 ms each (60,000 a minute), not 4,000
        spec = replace(_spec(), tenant="t", key_id="k", reserved_tokens=10, held_tokens=4_000)
        await broker.enqueue(rid=rid, spec=spec, max_queued=10, result_ttl_s=60)
        (job,) = await broker.claim("m", "interactive", "w", 1, None)
        await _start(broker, rid, "w")
        usage = {"prompt_tokens": 2, "completion_tokens": 3}
        end: dict[str, Any] = {"kind": "done", "status": Status.DONE, "ttl_s": 60, "usage": usage}
        record = await broker.get_record(rid)
        assert record is not None and Billing.of(record).held_tokens == 4_000
        if in_finish:
            done = await broker.finish_settle(job, Billing.of(record), 2, 3, attempt=1, text="hi", **end)
            assert done[1] is True
        else:
            _, record = await broker.finish_read(rid, attempt=1, text="hi", tokens=3, **end)
            assert record is not None and await broker.settle(job, record) is record
        assert await redis.hmget(day_usage, "k:held", "*:held") == ["0", "0"]
        assert float(await redis.hget(limiter, "tok_tat") or 0) <= time.time() * 1000 + 10  # refunded


async def test_a_hold_given_back_across_midnight_never_lowers_the_budgets_count(
    broker: Broker, redis: Redis
) -> None:
    """A hold taken just before midnight and given back just after (its request refused by a full
    lane, or metered) leaves the new day's held count below zero: the budget's check counts it as
    none, so the key is not let past what it was metered today (250 of 200), nor, the same way,
    past its month's."""
    day = day_of(time.time())
    day_usage, month_usage = broker.keys.usage("t", day), broker.keys.usage_month("t", day[:7])
    await redis.hset(day_usage, mapping={"k:prompt_tokens": 250, "k:held": -4_000})
    await redis.hset(month_usage, mapping={"k:tokens": 900, "k:held": -4_000})
    budgets = ((Limits(budget_day=200), "budget_day"), (Limits(budget_month=800), "budget_month"))
    for limits, reason in budgets:
        decision = await broker.ledger.admit("t", "k", limits, rids=["m"], tokens=10, deadline_ms=2**50)
        assert not decision.admitted and decision.reason == reason


async def test_a_hold_of_a_request_never_queued_is_given_back(broker: Broker, redis: Redis) -> None:
    """Admitted by the limits, then refused by a full lane: no record, no metering; unhold gives its
    budget hold back, the key's and the tenant's, day and month."""
    limits = Limits(budget_day=10_000, budget_month=100_000)
    await broker.ledger.admit("t", "k", limits, rids=["q"], tokens=10, held=4_000, deadline_ms=2**50)
    day = day_of(time.time())
    day_usage, month_usage = broker.keys.usage("t", day), broker.keys.usage_month("t", day[:7])
    assert await redis.hmget(month_usage, "k:held", "*:held") == ["4000", "4000"]
    await broker.ledger.unhold("t", "k", 4_000)
    assert await redis.hmget(day_usage, "k:held", "*:held") == ["0", "0"]
    assert await redis.hmget(month_usage, "k:held", "*:held") == ["0", "0"]


def test_a_record_from_before_budget_holds_holds_its_reservation() -> None:
    """A record written before held_tokens existed: its admission held what it reserved, so that is
    what its metering gives back."""
    spec = replace(_spec(), tenant="t", key_id="k", reserved_tokens=300)
    record = RequestRecord.from_hash({**spec.to_hash(), "status": "done", "created": "1"})
    assert (record.spec.held_tokens, Billing.of(record).held_tokens) == (0, 300)


FENCE = Fence("w", 3, 60, alone=False)


async def test_a_fenced_claim_starts_the_first_fresh_request_in_the_same_call(
    broker: Broker, redis: Redis
) -> None:
    """bind_start.lua: the first request a claim binds is fenced with its first attempt, as start.lua
    would; the others are left to start.lua (the worker checks each before it fences it)."""
    await _enqueue(broker, "a")
    await _enqueue(broker, "b")
    first, second = await broker.claim("m", "interactive", "w", 2, None, FENCE)
    assert (first.rid, second.rid, second.started) == ("a", "b", None)
    assert first.started is not None and first.started.outcome is StartOutcome.RUN
    assert first.started.attempt == 1
    assert first.started.record is not None and first.started.record.spec.prompt == "p"
    assert await redis.hmget(broker.keys.request("a"), "status", "attempt", "worker") == ["running", "1", "w"]
    assert await redis.hmget(broker.keys.request("b"), "status", "attempt") == ["queued", "0"]
    assert (await _start(broker, "b", "w")).attempt == 1  # the second one: start.lua, once
    assert first == replace(first, started=None)  # the fence is not part of the job's identity


async def test_a_fenced_claim_leaves_a_request_that_is_not_fresh_to_start_lua(
    broker: Broker, redis: Redis
) -> None:
    """A cancelled request, or one that ran before, is not fenced by the claim: nothing is written to
    its record, and the worker's own checks and start.lua decide."""
    await _enqueue(broker, "gone")
    await broker.cancel("gone", 60)
    await _enqueue(broker, "ran")
    await _start(broker, "ran", "old")  # attempt 1 ran elsewhere before this entry is read
    for rid in ("gone", "ran"):
        before = await redis.hgetall(broker.keys.request(rid))
        [job] = await broker.claim("m", "interactive", "w", 1, None, FENCE)
        assert (job.rid, job.started) == (rid, None)
        assert await redis.hgetall(broker.keys.request(rid)) == before


async def test_a_fenced_claim_reports_a_request_whose_deadline_passed(broker: Broker, redis: Redis) -> None:
    await _enqueue(broker, "late")
    await redis.hset(broker.keys.request("late"), "deadline_ms", 1)
    [job] = await broker.claim("m", "interactive", "w", 1, None, FENCE)
    assert job.started is not None and job.started.outcome is StartOutcome.EXPIRED
    assert await redis.hget(broker.keys.request("late"), "status") == "queued"


async def test_a_cancelled_blocking_read_lets_go_of_the_next_job(broker: Broker, redis: Redis) -> None:
    """A worker's blocking read cancelled (shutdown) must not stay armed in Redis: a job queued
    afterwards goes to a live consumer, not to the read nobody waits for."""
    await broker.ensure_groups("m")
    before = await _blocked(redis)
    reading = asyncio.create_task(broker.claim("m", "interactive", "gone", 1, 5000))  # the longest
    await async_wait_for(lambda: _blocked(redis, before + 1), what="the read to block")
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    await async_wait_for(lambda: _blocked(redis, before), timeout_s=2, what="the read to let go")
    await _enqueue(broker, "next")
    [job] = await broker.claim("m", "interactive", "alive", 1, None)
    assert job.rid == "next"


async def _blocked(redis: Redis, n: int | None = None) -> Any:
    """Redis's count of blocked clients; with ``n``: whether it is ``n``."""
    blocked = int((await redis.info("clients"))["blocked_clients"])
    return blocked if n is None else blocked == n


@pytest.mark.parametrize("fenced_by_the_claim", [True, False])
async def test_a_request_nobody_followed_for_the_grace_is_detached_not_started(
    broker: Broker, redis: Redis, fenced_by_the_claim: bool
) -> None:
    """Its client left while it was queued, longer ago than the grace: start.lua (alone, or in the
    claim's bind_start.lua) answers 'detached' and fences nothing; within the grace, or followed
    again, or asked without a grace, it starts."""
    for rid in ("left", "back", "recent", "unasked"):
        await _enqueue(broker, rid)
        await broker.detach(rid)
    await redis.hset(broker.keys.request("left"), "detached_ms", 1)  # long ago
    await redis.hset(broker.keys.request("back"), "detached_ms", 1)
    await broker.attach("back")  # a client followed it again
    await redis.hset(broker.keys.request("unasked"), "detached_ms", 1)
    fence = replace(FENCE, detach_grace_s=15.0)
    for rid, outcome in (
        ("left", StartOutcome.DETACHED),
        ("back", StartOutcome.RUN),
        ("recent", StartOutcome.RUN),  # detached just now: within the grace
    ):
        if fenced_by_the_claim:
            [job] = await broker.claim("m", "interactive", "w", 1, None, fence)
            assert job.rid == rid and job.started is not None
            result = job.started
        else:
            result = await broker.start_job(rid, "w", 3, result_ttl_s=60, detach_grace_s=15.0)
        assert result.outcome is outcome, rid
        attempt = "0" if outcome is StartOutcome.DETACHED else "1"  # nothing fenced when detached
        assert await redis.hget(broker.keys.request(rid), "attempt") == attempt
    assert (await broker.start_job("unasked", "w", 3, result_ttl_s=60)).outcome is StartOutcome.RUN
