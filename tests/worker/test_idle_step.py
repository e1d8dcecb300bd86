"""A streaming engine's step waits for its sequences' next tokens. When the last sequence is cancelled
while a step waits (its client left, or a DELETE), the step waits on with none: the worker took that
for a hung engine once ``step_timeout_s`` had passed, deregistered, stopped taking jobs and failed
``/healthz`` for good (a `openai` engine worker was lost to one client that went away). And a worker
whose step did hang and then came back watches its clients again."""

from __future__ import annotations

import asyncio
from functools import partial

from breakwater.engines.base import EngineInfo, SequenceDelta
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.engines.streams import Flight, StreamingEngine
from tests.helpers import async_wait_for
from tests.inproc import InProc

STEP_TIMEOUT_S = 0.5


class Ticker(StreamingEngine):
    """Streams `` tick`` every ``interval`` s up to ``max_tokens``, as an upstream would."""

    info = EngineInfo(model="ticker", engine="ticker", context_length=4096, capacity=4)
    interval = 0.02

    async def _generate(self, flight: Flight) -> None:
        rid, limit = flight.request.request_id, flight.request.max_tokens or 16
        while flight.tokens < limit:
            await asyncio.sleep(self.interval)
            flight.tokens += 1
            self._emit(SequenceDelta(rid, text=" tick", tokens=1))
        self._emit(
            SequenceDelta(rid, finish_reason="length", usage={"prompt_tokens": 1, "completion_tokens": limit})
        )

    def free_slots(self) -> int:
        return self.info.capacity - self.running()


async def test_cancelling_the_last_sequence_leaves_the_worker_serving(gw_empty: InProc) -> None:
    gw = gw_empty
    engine = Ticker()
    engine.interval = 2.0  # the heartbeat's check finds the cancel while the step waits for a token
    worker = await gw.add_worker(engine, worker_id="ticker", step_timeout_s=STEP_TIMEOUT_S)
    body = {"model": "ticker", "messages": [{"role": "user", "content": "go"}], "max_tokens": 3000}
    long = asyncio.create_task(gw.http.post("/v1/chat/completions", json={**body, "stream": True}))
    await async_wait_for(lambda: engine.running() == 1, 10, what="the sequence running")
    rid = next(iter(worker.inflight))
    assert (await gw.http.delete(f"/v1/requests/{rid}")).json()["status"] == "cancelled"
    await async_wait_for(lambda: engine.running() == 0, 10, what="the sequence dropped")
    assert (await asyncio.wait_for(long, 10)).status_code == 200
    await asyncio.sleep(STEP_TIMEOUT_S * 3)  # the idle step has waited past the step timeout
    engine.interval = 0.02
    assert not worker.step_hung() and not worker.hung
    assert "ticker" in await worker.broker.live_workers()
    answer = await asyncio.wait_for(gw.http.post("/v1/chat/completions", json={**body, "max_tokens": 3}), 10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == " tick tick tick"
    # A sequence added after the idle spell is timed from its start, not from the idle step's.
    assert not worker.step_hung()


async def test_a_worker_whose_step_came_back_watches_its_clients_again(gw_empty: InProc) -> None:
    gw = gw_empty
    engine = Ticker()
    worker = await gw.add_worker(engine, worker_id="ticker", step_timeout_s=STEP_TIMEOUT_S)
    worker.hung = True  # as after a step that hung and then returned
    await async_wait_for(lambda: not worker.hung, 10, what="the hung flag cleared by a heartbeat")
    assert "ticker" in await worker.broker.live_workers()


def _runs(engine: Ticker) -> bool:
    return engine.running() == 1


class Upstream(Ticker):
    """Its sequences wait on a backend with a read timeout of its own (the `openai` engine)."""

    watched_steps = False


async def test_a_silent_backend_is_not_a_hung_step_for_an_engine_not_watched(gw_empty: InProc) -> None:
    """A first token slower than ``step_timeout_s`` (a long prefill, a queue at the upstream): the
    worker stays registered and serves it; it deregistered and failed ``/healthz`` as hung."""
    gw = gw_empty
    engines: list[tuple[Ticker, bool]] = [(Ticker(), True), (Upstream(), False)]
    for engine, hung in engines:
        engine.interval = STEP_TIMEOUT_S * 4
        worker = await gw.add_worker(engine, worker_id=f"w-{hung}", step_timeout_s=STEP_TIMEOUT_S)
        body = {"model": "ticker", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1}
        answer = asyncio.create_task(gw.http.post("/v1/chat/completions", json=body))
        await async_wait_for(partial(_runs, engine), 10, what="the sequence running")
        await asyncio.sleep(STEP_TIMEOUT_S * 2)
        assert worker.step_hung() is hung
        assert (await asyncio.wait_for(answer, 10)).status_code == 200
        await gw.stop_workers()


class EmbeddingHang(SimEngine):
    """A step stuck in an embedding batch (after ``hang_after`` that return): the engine runs no
    sequence (``running()`` is 0)."""

    hang_after = 0

    async def step(self) -> list[SequenceDelta]:
        while not self._seqs and not self._embedded:
            self._work.clear()
            await self._work.wait()
        if self._embedded:
            if self.hang_after <= 0:
                await asyncio.Event().wait()
            self.hang_after -= 1
            done = await super().step()
            await asyncio.sleep(0.3)  # (a second job is taken while this step still runs)
            return done
        return await super().step()


async def test_a_step_stuck_on_an_embedding_is_hung(gw_empty: InProc) -> None:
    """Work is the worker's jobs in the engine, embeddings too (the engine's ``running()`` counts
    sequences only): such a hang must still hand the job over and fail ``/healthz``."""
    gw = gw_empty
    worker = await gw.add_worker(
        EmbeddingHang(SimOptions()), worker_id="embeds", step_timeout_s=STEP_TIMEOUT_S
    )
    asked = asyncio.create_task(gw.http.post("/v1/embeddings", json={"model": "sim", "input": "hello"}))
    await async_wait_for(worker.step_hung, 10, what="the hung step seen")
    assert not asked.done()
    asked.cancel()


async def test_back_to_back_embeddings_are_each_watched(gw_empty: InProc) -> None:
    """The second of two embedding jobs, taken while the first ran, was never timed (the step loop
    timed a step only while the engine ran sequences, which counts no embedding)."""
    gw = gw_empty
    engine = EmbeddingHang(SimOptions())
    engine.hang_after = 1  # the first embedding step returns; the second hangs
    worker = await gw.add_worker(engine, worker_id="embeds", step_timeout_s=STEP_TIMEOUT_S)
    first = asyncio.create_task(gw.http.post("/v1/embeddings", json={"model": "sim", "input": "one"}))
    second = asyncio.create_task(gw.http.post("/v1/embeddings", json={"model": "sim", "input": "two"}))
    await async_wait_for(worker.step_hung, 10, what="the hung step seen")
    for asked in (first, second):
        asked.cancel()


class Unavailable(Ticker):
    """An upstream engine whose backend cannot be reached (it says so: ``available()``)."""

    def available(self) -> bool:
        return False


async def test_a_worker_whose_engine_is_unavailable_does_not_preempt_for_a_job(gw_empty: InProc) -> None:
    """Full by its engine's say (a dead sidecar), it took a joining tenant's job by pausing one of
    its own, and that job waited for the dead upstream (review)."""
    up = await gw_empty.add_worker(Ticker(), worker_id="up", preempt=True)
    down = await gw_empty.add_worker(Unavailable(), worker_id="down", preempt=True)
    assert up._may_preempt() and not down._may_preempt()
