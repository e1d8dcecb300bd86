"""Preemption for fair share, in-process worker with the sim engine against the real Redis: a tenant
that joins a full worker runs at once in a slot of the tenant running most, and the paused sequence
is continued later without losing or repeating a token."""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis

from breakwater.broker import Broker, Job, RequestSpec, Status
from breakwater.engines.base import PENALTIES
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.keys import LANES
from breakwater.worker.jobs import InFlight
from breakwater.worker.preemption import Preemption
from tests.helpers import async_wait_for, expected_sim
from tests.inproc import InProc
from tests.worker.test_repair import REWIND

LONG = 30  # tokens of each of the flooding tenant's answers
SHORT = 4


def _spec(tenant: str, i: int, max_tokens: int) -> RequestSpec:
    return RequestSpec(
        model="sim",
        lane="interactive",
        kind="completion",
        request_id=f"{tenant}-{i}",
        timeout_s=60,
        prompt=f"prompt {tenant} {i}",
        max_tokens=max_tokens,
        seed=100 + i,
        ignore_eos=True,
        tenant=tenant,
    )


async def _enqueue(broker: Broker, tenant: str, i: int, max_tokens: int, **asked: Any) -> str:
    rid = f"r-{tenant}-{i}"
    spec = dataclasses.replace(_spec(tenant, i, max_tokens), **asked)
    result = await broker.enqueue(rid=rid, spec=spec, max_queued=100, result_ttl_s=60, cost=max_tokens)
    assert result.accepted
    return rid


async def _status(broker: Broker, rid: str) -> tuple[Status | None, int]:
    record = await broker.get_record(rid)
    return (record.status, record.tokens) if record else (None, 0)


async def _flood_then_join(
    gw: InProc, engine: type[SimEngine] = SimEngine, asked: dict[str, Any] | None = None, **worker: object
) -> tuple[Broker, list[str], str, list[Status | None]]:
    """Two slots; the flooding tenant runs two long answers and has a third waiting (each with
    ``asked``); then a light tenant asks for a short one. Returns the flood's statuses at the
    moment the light one is done."""
    await gw.add_worker(engine(SimOptions(capacity=2, decode_base_ms=20, decode_per_seq_ms=0)), **worker)
    broker = gw.broker()
    flood = [await _enqueue(broker, "flood", i, LONG, **(asked or {})) for i in range(3)]

    async def both_running() -> bool:
        states = [await _status(broker, rid) for rid in flood[:2]]
        return all(s is Status.RUNNING and n >= 2 for s, n in states)

    await async_wait_for(both_running, 10, 0.01, what="the flood's first two answers running")
    light = await _enqueue(broker, "light", 0, SHORT)
    await async_wait_for(lambda: _done(broker, light), 20, 0.005, what="the light tenant's answer")
    states = [(await _status(broker, rid))[0] for rid in flood]
    return broker, flood, light, states


async def _done(broker: Broker, rid: str) -> bool:
    return (await _status(broker, rid))[0] is Status.DONE


async def _text(broker: Broker, rid: str) -> tuple[str, list[int]]:
    events = await broker.read_events(rid, 0, 1000)
    return "".join(e.text for e in events), [e.seq for e in events]


async def test_a_joining_tenant_runs_at_once_and_the_paused_answer_continues_exactly(
    gw_empty: InProc,
) -> None:
    broker, flood, light, states = await _flood_then_join(gw_empty)
    try:
        # The light tenant did not wait for a slot to free: both running answers were still running.
        assert states[:2].count(Status.RUNNING) == 2, states
        worker = gw_empty.workers[0][0]
        assert (
            worker.metrics.registry.get_sample_value("breakwater_worker_preemptions_total", {"model": "sim"})
            == 1
        )
        for rid in flood:
            await async_wait_for(functools.partial(_done, broker, rid), 20, what=f"{rid} done")
        # Every answer, the paused one too, is exactly the undisturbed one: no token lost or repeated.
        for i, rid in enumerate([*flood, light]):
            tenant, n = ("light", SHORT) if rid == light else ("flood", LONG)
            i = 0 if rid == light else i
            text, seqs = await _text(broker, rid)
            expected, _, usage = expected_sim(
                prompt=f"prompt {tenant} {i}", seed=100 + i, max_tokens=n, ignore_eos=True
            )
            assert text == expected, rid
            assert seqs == list(range(1, len(seqs) + 1)), rid
            record = await broker.get_record(rid)
            assert record is not None
            assert (record.tokens, record.usage, record.attempt) == (n, usage, 1), rid
        assert not worker.preemption.paused and not worker.inflight
    finally:
        await broker.aclose()


async def test_without_preemption_the_joining_tenant_waits_for_a_slot(gw_empty: InProc) -> None:
    broker, _, _, states = await _flood_then_join(gw_empty, preempt=False)
    try:
        # Fair order still puts it first in line, but only once a running answer has ended.
        assert Status.DONE in states[:2], states
    finally:
        await broker.aclose()


class PenalisingSim(SimEngine):
    """Takes penalties (ignores them: the pause decision is what is tested) and continues by a new
    prompt, as vLLM and an upstream do: their penalties would count only what comes after a pause."""

    features = SimEngine.features | {PENALTIES}


async def test_a_penalised_answer_is_not_paused_where_its_continuation_would_drop_the_counts(
    gw_empty: InProc,
) -> None:
    broker, _, _, states = await _flood_then_join(gw_empty, PenalisingSim, {"frequency_penalty": 1.0})
    try:
        assert Status.DONE in states[:2], states  # the light tenant waited for a slot instead
        worker = gw_empty.workers[0][0]
        assert not worker.metrics.registry.get_sample_value(
            "breakwater_worker_preemptions_total", {"model": "sim"}
        )
    finally:
        await broker.aclose()


async def test_a_paused_request_cancelled_while_paused_is_dropped_and_settled(gw_empty: InProc) -> None:
    engine = SimEngine(SimOptions(capacity=2, decode_base_ms=20, decode_per_seq_ms=0))
    worker = await gw_empty.add_worker(engine)
    broker = gw_empty.broker()
    try:
        flood = [await _enqueue(broker, "flood", i, 200) for i in range(2)]
        await async_wait_for(
            lambda: all(f in worker.inflight for f in flood), 10, 0.01, what="both flood answers running"
        )
        light = await _enqueue(broker, "light", 0, 200)
        await async_wait_for(lambda: bool(worker.preemption.paused), 10, 0.01, what="a sequence paused")
        paused = worker.preemption.paused[0].job.rid
        assert paused in flood
        resp = await gw_empty.http.delete(f"/v1/requests/{paused}")
        assert resp.status_code == 200, resp.text
        # The worker drops it (its heartbeat sees the cancel) and never continues it.
        await async_wait_for(lambda: paused not in worker.inflight, 10, what="the paused request dropped")
        assert not worker.preemption.paused
        assert (await _status(broker, paused))[0] is Status.CANCELLED
        for rid in [r for r in flood if r != paused] + [light]:
            assert rid in worker.inflight
    finally:
        await broker.aclose()


@pytest.mark.parametrize("mark", ["finishing", "tools"])
async def test_a_sequence_that_cannot_be_continued_is_never_paused(gw_empty: InProc, mark: str) -> None:
    """``finishing``: its generation ended, and pausing it would continue a finished answer
    (finishes are written while the batch goes on, so the pull loop's preemption can meet one).
    ``tools``: its tools went to the engine (the ``openai`` engine, vLLM with its tool parser), and
    no engine continues such an answer (jobs.refusal), so pausing it would end it with an error."""
    broker = gw_empty.broker()
    try:
        preemption = Preemption(broker, ("sim",))
        stream = broker.keys.jobs("sim", LANES[0])
        plain = InFlight(Job(stream, "1-0", "a", "x", tenant="t1"), 1, "sim")
        kept = InFlight(Job(stream, "2-0", "b", "x", tenant="t1"), 1, "sim")
        setattr(kept, mark, True)
        assert preemption.victim([plain, kept], "t1", LANES[0], True) is plain
        assert preemption.running([plain, kept], LANES[0], True) == Counter({"t1": 1})
        assert preemption.victim([kept], "t1", LANES[0], True) is None
    finally:
        await broker.aclose()


async def test_writes_lost_while_a_sequence_is_paused_are_sent_again_before_it_continues(
    gw_empty: InProc, redis: Redis
) -> None:
    """A Redis failover can lose a paused sequence's last writes (REWIND, as in test_repair): they
    are sent again before the engine continues from the record, so the continuation starts where
    clients left off. The answer is exact and stays in its first attempt (a continuation from the
    rewound text would be refused as out of step, and the request would wait for its lease to
    lapse and be taken over)."""
    engine = SimEngine(SimOptions(capacity=2, decode_base_ms=20, decode_per_seq_ms=0))
    worker = await gw_empty.add_worker(engine)
    broker = gw_empty.broker()
    try:
        flood = [await _enqueue(broker, "flood", i, 200) for i in range(2)]

        async def both_written() -> bool:  # enough writes that four of them can be lost
            return all([(await _status(broker, rid))[1] >= 10 for rid in flood])

        await async_wait_for(both_written, 10, 0.01, what="both flood answers past 10 tokens")
        await _enqueue(broker, "light", 0, 200)  # ~4 s: the paused one waits for it
        await async_wait_for(lambda: bool(worker.preemption.paused), 10, 0.01, what="a sequence paused")
        flight = worker.preemption.paused[0]
        rid = flight.job.rid
        await async_wait_for(
            lambda: worker._steps >= flight.paused_at, 10, 0.005, what="its last steps published"
        )
        keys = gw_empty.keys
        left = await redis.eval(REWIND, 3, keys.request(rid), keys.tokens(rid), keys.emitted(rid), "4")
        assert int(left) >= 6, f"the request was no longer running when its writes were lost ({left})"
        assert flight in worker.preemption.paused  # the loss came while it was paused
        record = await broker.get_record(rid)
        assert record is not None and record.wseq == flight.writes - 4

        await async_wait_for(functools.partial(_done, broker, rid), 30, what=f"{rid} done")
        i = flood.index(rid)
        expected, _, _ = expected_sim(
            prompt=f"prompt flood {i}", seed=100 + i, max_tokens=200, ignore_eos=True
        )
        text, seqs = await _text(broker, rid)
        assert text == expected
        assert seqs == list(range(1, len(seqs) + 1))  # no hole, no duplicate
        record = await broker.get_record(rid)
        assert record is not None
        assert (record.tokens, record.attempt, record.emitted) == (200, 1, expected)
    finally:
        await broker.aclose()
