"""The worker in-process with the sim engine: hung engine steps hand their jobs over, a full Redis
never kills the worker or its generations."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.broker import Status
from breakwater.engines.base import SequenceDelta
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.redis_server import RedisServer
from breakwater.tenancy import ANONYMOUS
from breakwater.worker.http import WorkerHTTP
from tests.helpers import async_wait_for, expected_sim
from tests.inproc import InProc, inproc_gateway

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "keep going"}]
BODY = {"model": "sim", "messages": MESSAGES, "max_tokens": 80, "seed": 21, "ignore_eos": True}


class HangingSim(SimEngine):
    """A sim engine whose step blocks forever once ``hang`` is set (a stuck decode or upstream)."""

    def __init__(self) -> None:
        super().__init__(SimOptions(decode_base_ms=20, decode_per_seq_ms=0))
        self.hang = asyncio.Event()

    async def step(self) -> list[SequenceDelta]:
        if self.hang.is_set():
            await asyncio.Event().wait()
        return await super().step()


async def _record(gw: InProc, rid: str) -> tuple[Status | None, int, str, int]:
    broker = gw.broker()
    try:
        record = await broker.get_record(rid)
    finally:
        await broker.aclose()
    return (record.status, record.tokens, record.worker, record.attempt) if record else (None, 0, "", 0)


async def _running_rid(gw: InProc) -> str:
    broker = gw.broker()
    try:
        for _ in range(500):
            keys = [k async for k in broker.redis.scan_iter(match=f"{gw.prefix}:req:*")]
            if keys:
                return str(keys[0]).split("{", 1)[1].rstrip("}")
            await asyncio.sleep(0.01)
    finally:
        await broker.aclose()
    raise AssertionError("no request record appeared")


async def test_a_hung_step_hands_its_jobs_to_another_worker(gw_empty: InProc) -> None:
    gw = gw_empty
    engine = HangingSim()
    hung = await gw.add_worker(engine, worker_id="hung", step_timeout_s=0.5)
    call = asyncio.create_task(gw.http.post(CHAT, json=BODY))
    rid = await _running_rid(gw)
    await async_wait_for(lambda: _progressed(gw, rid), 10, what="tokens from the first worker")
    engine.hang.set()
    await gw.add_worker(worker_id="rescuer")
    resp = await asyncio.wait_for(call, 30)
    assert resp.status_code == 200, resp.text
    expected, _, usage = expected_sim(messages=MESSAGES, seed=21, max_tokens=80, ignore_eos=True)
    assert resp.json()["choices"][0]["message"]["content"] == expected
    status, tokens, worker, attempt = await _record(gw, rid)
    assert (status, tokens, worker, attempt) == (Status.DONE, usage["completion_tokens"], "rescuer", 2)
    assert hung.step_hung() and hung.hung
    http = WorkerHTTP("127.0.0.1", 0)
    http.worker = hung
    assert http.respond("GET", "/healthz")[0] == 503  # the orchestrator restarts it
    assert "hung" not in await hung.broker.live_workers()  # and no longer counts as capacity
    # It takes no new work either: every later request starts, once, on the healthy worker.
    for seed in range(3):
        later = await asyncio.wait_for(gw.http.post(CHAT, json={**BODY, "max_tokens": 3, "seed": seed}), 10)
        assert later.status_code == 200, later.text
        _, _, worker, attempt = await _record(gw, later.json()["id"])
        assert (worker, attempt) == ("rescuer", 1)


async def _progressed(gw: InProc, rid: str) -> bool:
    _, tokens, _, _ = await _record(gw, rid)
    return tokens > 5


async def test_a_full_redis_pauses_the_worker_and_loses_nothing(
    own_redis: tuple[RedisServer, Redis], prefix: str
) -> None:
    server, redis = own_redis
    async with inproc_gateway(server.url, prefix) as gw:
        worker = await gw.add_worker(SimEngine(SimOptions(decode_base_ms=20, decode_per_seq_ms=0)))
        call = asyncio.create_task(gw.http.post(CHAT, json=BODY))
        rid = await _running_rid(gw)
        await async_wait_for(lambda: _progressed(gw, rid), 10, what="first tokens")
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", str(used // 2))
        _, before, _, _ = await _record(gw, rid)
        await asyncio.sleep(1.0)  # the worker meets OOM on every append and heartbeat meanwhile
        _, during, _, _ = await _record(gw, rid)
        assert during == before  # nothing was written while full
        assert not any(task.done() for _, task in gw.workers)  # the worker did not exit
        await redis.config_set("maxmemory", "0")
        resp = await asyncio.wait_for(call, 30)
        expected, _, _ = expected_sim(messages=MESSAGES, seed=21, max_tokens=80, ignore_eos=True)
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == expected
        status, _, _, attempt = await _record(gw, rid)
        assert (status, attempt) == (Status.DONE, 1)  # the same attempt kept its generation
        assert not worker.hung


class GatheringSim(SimEngine):
    """A sim engine whose first step waits until ``hold_for`` sequences are running, so they decode
    in lockstep and finish in the same step."""

    def __init__(self, hold_for: int) -> None:
        super().__init__(SimOptions(decode_base_ms=5, decode_per_seq_ms=0))
        self.hold_for = hold_for

    async def step(self) -> list[SequenceDelta]:
        while self.stats()["running"] < self.hold_for:
            await asyncio.sleep(0.005)
        self.hold_for = 0
        return await super().step()


async def test_requests_finishing_in_one_step_are_finished_together(
    gw_empty: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's finished requests are written together, not one round trip after another while the
    rest of the batch waits for its next step; each still ends exactly as it would alone."""
    worker = await gw_empty.add_worker(GatheringSim(hold_for=3))
    finish_settle = worker.broker.finish_settle
    active, peak = 0, 0

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            return await finish_settle(*args, **kwargs)
        finally:
            active -= 1

    monkeypatch.setattr(worker.broker, "finish_settle", counted)
    seeds = [40, 41, 42]
    bodies = [{**BODY, "max_tokens": 6, "seed": s} for s in seeds]
    answers = await asyncio.wait_for(
        asyncio.gather(*(gw_empty.http.post(CHAT, json=body) for body in bodies)), 30
    )
    for seed, resp in zip(seeds, answers, strict=True):
        text, _, usage = expected_sim(messages=MESSAGES, seed=seed, max_tokens=6, ignore_eos=True)
        assert resp.status_code == 200
        assert resp.json()["choices"][0]["message"]["content"] == text
        assert resp.json()["usage"] == {
            **usage,
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        }
    assert peak == 3


async def test_a_slow_finish_does_not_hold_up_the_batch(
    gw_empty: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's finish (its final event, metering, the ack: a few round trips) is written while
    the batch goes on: the others' tokens, and requests that start meanwhile, do not wait for it."""
    worker = await gw_empty.add_worker(SimEngine(SimOptions(decode_base_ms=5, decode_per_seq_ms=0)))
    finish_settle = worker.broker.finish_settle
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_first(*args: Any, **kwargs: Any) -> Any:
        if not entered.is_set():  # the first request to end: its finish waits for the test
            entered.set()
            await release.wait()
        return await finish_settle(*args, **kwargs)

    monkeypatch.setattr(worker.broker, "finish_settle", slow_first)
    short = asyncio.create_task(gw_empty.http.post(CHAT, json={**BODY, "max_tokens": 2, "seed": 50}))
    await asyncio.wait_for(entered.wait(), 30)
    assert not short.done()
    # Started after the first one ended, generated and finished while its finish still waits.
    long = await asyncio.wait_for(gw_empty.http.post(CHAT, json={**BODY, "max_tokens": 12, "seed": 51}), 30)
    text, _, _ = expected_sim(messages=MESSAGES, seed=51, max_tokens=12, ignore_eos=True)
    assert long.status_code == 200 and long.json()["choices"][0]["message"]["content"] == text
    assert not short.done() and worker.inflight  # its slot still counts until it is acked
    release.set()
    first = await asyncio.wait_for(short, 30)
    text, _, _ = expected_sim(messages=MESSAGES, seed=50, max_tokens=2, ignore_eos=True)
    assert first.status_code == 200 and first.json()["choices"][0]["message"]["content"] == text
    await async_wait_for(lambda: not worker.inflight, 10, what="every job acked")


async def test_a_finish_that_cannot_settle_reads_the_record_and_settles_after_it(
    gw_empty: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the finish cannot settle in its own call (a Redis Cluster, which this stands in for),
    the terminal record is read back with the finish and the job settled from it: metered, acked."""
    worker = await gw_empty.add_worker(SimEngine(SimOptions(decode_base_ms=5, decode_per_seq_ms=0)))
    monkeypatch.setattr(worker.broker, "_finish_settle", None)
    assert not worker.broker.settles_in_finish
    finish_read, settle = worker.broker.finish_read, worker.broker.settle
    calls: list[Any] = []

    async def reading(*args: Any, **kwargs: Any) -> Any:
        calls.append("finish_read")
        return await finish_read(*args, **kwargs)

    async def settling(job: Any, record: Any = None) -> Any:
        metered = await settle(job, record)
        calls.append(("settle", record is not None, metered is not None))
        return metered

    monkeypatch.setattr(worker.broker, "finish_read", reading)
    monkeypatch.setattr(worker.broker, "settle", settling)
    resp = await asyncio.wait_for(gw_empty.http.post(CHAT, json={**BODY, "max_tokens": 3, "seed": 60}), 30)
    text, _, usage = expected_sim(messages=MESSAGES, seed=60, max_tokens=3, ignore_eos=True)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == text
    await async_wait_for(lambda: not worker.inflight, 10, what="its job acked")
    assert calls == ["finish_read", ("settle", True, True)]  # from the record read with it; metered now
    tenant = worker.settings.tenant_label(ANONYMOUS.tenant)
    completion = worker.metrics.tenant_tokens.labels(tenant, "completion")._value.get()
    assert completion == usage["completion_tokens"]
    broker = gw_empty.broker()
    try:
        assert await broker.redis.xlen(gw_empty.keys.jobs("sim", "interactive")) == 0  # acknowledged
    finally:
        await broker.aclose()


async def _stops_with(gw: InProc, error: str) -> None:
    """A short request to the newest worker, which stops with ``ValueError(error)``."""
    run = gw.workers[-1][1]
    request = asyncio.create_task(gw.http.post(CHAT, json={**BODY, "max_tokens": 2}))
    with pytest.raises(ValueError, match=error):
        await asyncio.wait_for(asyncio.shield(run), 30)
    request.cancel()


async def test_a_failed_finish_stops_the_worker_with_its_error(
    gw_empty: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finish that fails other than transiently (a bug, a script error) is not left behind in a
    background task: the worker stops with that error, as when finishes ran inside the step, and its
    jobs are left to be reclaimed."""
    worker = await gw_empty.add_worker(SimEngine(SimOptions(decode_base_ms=5, decode_per_seq_ms=0)))

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("finish script broke")

    monkeypatch.setattr(worker.broker, "finish_settle", broken)
    await _stops_with(gw_empty, "finish script broke")


async def test_a_finish_failing_while_draining_stops_the_worker_with_its_error(
    gw_empty: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a drain that waits out its grace for a slot that will never free, then exits as if
    nothing happened."""
    worker = await gw_empty.add_worker(SimEngine(SimOptions(decode_base_ms=5, decode_per_seq_ms=0)))
    entered, release = asyncio.Event(), asyncio.Event()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await release.wait()
        raise ValueError("finish script broke")

    monkeypatch.setattr(worker.broker, "finish_settle", broken)
    draining = asyncio.Event()
    finish_in_flight = worker._finish_in_flight

    async def watched() -> None:
        draining.set()
        await finish_in_flight()

    monkeypatch.setattr(worker, "_finish_in_flight", watched)
    run = gw_empty.workers[-1][1]
    request = asyncio.create_task(gw_empty.http.post(CHAT, json={**BODY, "max_tokens": 2}))
    await asyncio.wait_for(entered.wait(), 30)
    worker.drain()  # drain_grace_s: 30 s
    await asyncio.wait_for(draining.wait(), 10)  # the worker waits for its jobs to end
    release.set()
    with pytest.raises(ValueError, match="finish script broke"):
        await asyncio.wait_for(asyncio.shield(run), 10)
    request.cancel()


class CountingSim(SimEngine):
    """A sim engine that counts the steps it has returned."""

    def __init__(self, capacity: int = 32) -> None:
        super().__init__(SimOptions(capacity=capacity, decode_base_ms=5, decode_per_seq_ms=0))
        self.steps = 0

    async def step(self) -> list[SequenceDelta]:
        deltas = await super().step()
        self.steps += 1
        return deltas


async def test_the_engine_steps_while_its_last_step_is_published(
    gw_empty: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine that computes its batch (sim, llama.cpp) runs its next step while Redis takes the
    last step's tokens; the next publish waits for that one, so each request's tokens stay in order
    and exactly once."""
    engine = CountingSim()
    worker = await gw_empty.add_worker(engine)
    append_step = worker.broker.append_step
    entered, release = asyncio.Event(), asyncio.Event()
    active, peak, stepped = 0, 0, 0

    async def slow_first(appends: Any) -> Any:
        nonlocal active, peak, stepped
        active += 1
        peak = max(peak, active)
        try:
            if appends and not entered.is_set():
                stepped = engine.steps  # taken here: the next step may end before the test wakes
                entered.set()
                await release.wait()
            return await append_step(appends)
        finally:
            active -= 1

    monkeypatch.setattr(worker.broker, "append_step", slow_first)
    call = asyncio.create_task(gw_empty.http.post(CHAT, json={**BODY, "max_tokens": 12, "seed": 60}))
    await asyncio.wait_for(entered.wait(), 30)
    await async_wait_for(lambda: engine.steps > stepped, 10, what="a step while the last one is published")
    assert engine.steps == stepped + 1  # one step ahead, no more: its publish waits for the last one's
    release.set()
    resp = await asyncio.wait_for(call, 30)
    text, _, _ = expected_sim(messages=MESSAGES, seed=60, max_tokens=12, ignore_eos=True)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == text
    assert peak == 1


async def test_a_failed_publish_stops_the_worker_even_with_nothing_left_to_step(
    gw_empty: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step published beside the engine's next one that fails other than transiently stops the
    worker with its error, also when that was the last step (the engine waits for work)."""
    worker = await gw_empty.add_worker(CountingSim())
    append_step = worker.broker.append_step

    async def broken_last(appends: Any) -> Any:
        if not appends:  # the step with the request's end only: nothing steps after it
            raise ValueError("publish broke")
        return await append_step(appends)

    monkeypatch.setattr(worker.broker, "append_step", broken_last)
    await _stops_with(gw_empty, "publish broke")


async def test_a_sequence_paused_while_its_held_back_token_waits_to_be_published_counts_it_once(
    gw_empty: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine holds a token's text back (it may begin a stop string) in a step that returned
    while the step before is still being published; the sequence is paused (preempted) just then.
    Continued from its record, it generates that text again: the count it held is forgotten, not
    added to the continuation's (a token counted twice: record, usage and the sim's next word)."""
    body = {**BODY, "max_tokens": 10, "seed": 61}
    text, _, usage = expected_sim(messages=MESSAGES, seed=61, max_tokens=10, ignore_eos=True)
    words = text.split(" ")
    stop = [f" {words[3]}\u2603"]  # never met; token 3's text may begin it, so it is held back
    assert expected_sim(messages=MESSAGES, seed=61, max_tokens=10, ignore_eos=True, stop=stop)[0] == text
    engine = CountingSim(capacity=1)  # full: a paused sequence continues as soon as it may
    worker = await gw_empty.add_worker(engine)
    append_step = worker.broker.append_step
    writes, stepped, entered, release = 0, 0, asyncio.Event(), asyncio.Event()

    async def slow_third(appends: Any) -> Any:
        nonlocal writes, stepped
        writes += len(appends)
        if writes == 3 and not entered.is_set():  # token 2's step: token 3's (held) returns meanwhile
            stepped = engine.steps  # taken here: the held token's step may end before the test wakes
            entered.set()
            await release.wait()
        return await append_step(appends)

    monkeypatch.setattr(worker.broker, "append_step", slow_third)
    call = asyncio.create_task(gw_empty.http.post(CHAT, json={**body, "stop": stop}))
    await asyncio.wait_for(entered.wait(), 30)
    await async_wait_for(lambda: engine.steps > stepped, 10, what="the held token's step")
    (flight,) = worker.inflight.values()
    worker._pause(flight, flight.job)
    release.set()
    resp = await asyncio.wait_for(call, 30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == text
    assert resp.json()["usage"]["completion_tokens"] == usage["completion_tokens"]
    status, tokens, _, attempt = await _record(gw_empty, resp.json()["id"])
    assert (status, tokens, attempt) == (Status.DONE, usage["completion_tokens"], 1)


async def test_a_retried_finish_sends_the_held_tokens_logprobs_again(
    gw_empty: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text held back to the end (it might have begun a stop string) goes out with the finish, its
    tokens' logprobs with it. A finish that meets a transient error is retried whole: the retry
    carries those logprobs too (it sent none: the first try had taken them)."""
    worker = await gw_empty.add_worker(SimEngine(SimOptions(decode_base_ms=5, decode_per_seq_ms=0)))
    held = [{"token": " end", "logprob": -0.5, "bytes": list(b" end"), "top_logprobs": []}]
    finish_later = worker._finish_later

    def holding(finishes: Any) -> None:
        for flight, _ in finishes:
            flight.held_logprobs = list(held)  # as the engine's last, held-back token left them
        finish_later(finishes)

    finish_settle = worker.broker.finish_settle
    sent: list[str] = []

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        sent.append(kwargs["logprobs"])
        if len(sent) == 1:
            raise RedisConnectionError("connection reset by peer")
        return await finish_settle(*args, **kwargs)

    monkeypatch.setattr(worker, "_finish_later", holding)
    monkeypatch.setattr(worker.broker, "finish_settle", flaky)
    resp = await asyncio.wait_for(gw_empty.http.post(CHAT, json={**BODY, "max_tokens": 3}), 30)
    assert resp.status_code == 200, resp.text
    assert len(sent) == 2 and sent[0] == sent[1] == orjson.dumps(held).decode()


async def test_a_sequence_whose_text_is_dropped_in_a_step_is_not_finished_in_it_too(
    gw_empty: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step may carry a sequence's text and, apart, its finish (engines.streams.merge_deltas keeps
    tokens without text after the text). When the text's append finds the request no longer running,
    the sequence is dropped (and its job settled); its finish in the same step is not written too."""
    engine = HangingSim()
    engine.hang.set()  # no step of its own: the test publishes the one step
    worker = await gw_empty.add_worker(engine)
    call = asyncio.create_task(gw_empty.http.post(CHAT, json=BODY))
    try:
        await async_wait_for(lambda: bool(worker.inflight), 10, what="the sequence started")
        (rid,) = worker.inflight
        finished: list[str] = []
        monkeypatch.setattr(worker.broker, "append_step", lambda appends: _all(appends, -2))

        def finish_all(finishes: list[tuple[Any, SequenceDelta]]) -> Coroutine[Any, Any, None]:
            finished.extend(flight.job.rid for flight, _ in finishes)  # when the finishing is made
            return asyncio.sleep(0)

        monkeypatch.setattr(worker, "_finish_all", finish_all)
        end = SequenceDelta(rid, tokens=1, finish_reason="stop", usage={"completion_tokens": 2})
        await worker._publish(worker._owned([SequenceDelta(rid, text="late", tokens=1), end]))
        assert rid not in worker.inflight  # dropped
        assert finished == []  # and not finished as well
    finally:
        call.cancel()


async def _all(appends: list[Any], seq: int) -> list[int]:
    return [seq] * len(appends)
