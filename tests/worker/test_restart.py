"""A request dropped by a worker and started again by the same worker gets none of the dropped
sequence's tokens.

A worker whose engine steps while the last step is published (sim, llama.cpp) holds a computed step
while that publish waits on Redis. If meanwhile the request was taken over (its lease lapsed in a
failover), the worker drops its sequence and may reclaim the same job at once; the held step still
has a token of the dropped sequence, which must not be written as the new attempt's. (A CI run of
tests/cluster/test_cluster_chaos.py saw four answers with one word too many and contiguous seqs.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from breakwater.broker import Append
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.worker.jobs import InFlight
from tests.helpers import async_wait_for, expected_sim
from tests.inproc import InProc


async def test_a_step_held_for_a_dropped_sequence_is_not_written_as_its_restart(
    gw_empty: InProc, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Leases far longer than the test: only the takeover below ends the first attempt. 120 tokens of
    # 20 ms: the held publish comes seconds before the end, however slowly the test polls.
    worker = await gw_empty.add_worker(
        SimEngine(SimOptions(decode_base_ms=20, decode_per_seq_ms=0)), heartbeat_s=10
    )
    assert worker.engine.overlaps_publish
    keys, broker = gw_empty.keys, worker.broker
    body = {"model": "sim", "prompt": "a restart", "seed": 11, "max_tokens": 120, "ignore_eos": True}
    answer = asyncio.create_task(gw_empty.http.post("/v1/completions", json=body))
    rid = ""

    async def midway() -> bool:
        nonlocal rid
        async for key in redis.scan_iter(match=keys.request("*")):
            rid = str(key).split("{")[1][:-1]
        return bool(rid) and int(await redis.hget(keys.request(rid), "seq") or 0) >= 5

    await async_wait_for(midway, 20, what="the request midway")

    # The next publish of its tokens waits (as on a failing-over primary) until the takeover is done.
    gate, blocked = asyncio.Event(), asyncio.Event()
    append_step = broker.append_step

    async def held_append_step(appends: list[Append]) -> list[int]:
        if not blocked.is_set():
            blocked.set()
            await gate.wait()
        return await append_step(appends)

    restarted: list[int] = []  # the attempt dropped
    running: list[int] = []  # the attempt running here after the restart and the second drop
    drop = worker._drop

    async def drop_and_reclaim(flight: InFlight, *, fenced: bool, why: str) -> None:
        """As a reclaim by this worker right after the drop would: the same job started again."""
        await drop(flight, fenced=fenced, why=why)
        if not restarted:
            restarted.append(flight.attempt)
            await worker._start(flight.job)
            # A late second drop of the first attempt (its lease's, say) leaves the restart running.
            await drop(flight, fenced=True, why="dropped again")
            running.append(getattr(worker.inflight.get(flight.job.rid), "attempt", 0))

    monkeypatch.setattr(broker, "append_step", held_append_step)
    monkeypatch.setattr(worker, "_drop", drop_and_reclaim)
    await async_wait_for(blocked.is_set, 10, what="a publish held")
    # The step after the held one computed, waiting for that publish (it holds a token of attempt 1).
    await async_wait_for(lambda: worker._stepped >= worker._steps + 2, 10, what="the next step computed")
    taken = await broker.start_job(rid, "another-worker", 3, result_ttl_s=60)  # the takeover
    gate.set()

    response = await asyncio.wait_for(answer, 30)
    text, finish_reason, _ = expected_sim(prompt="a restart", seed=11, max_tokens=120, ignore_eos=True)
    assert response.status_code == 200, response.text
    assert restarted == [taken.attempt - 1]  # the first attempt was dropped and the job restarted here
    assert running == [taken.attempt + 1]
    record = await redis.hgetall(keys.request(rid))
    assert int(record["attempt"]) == taken.attempt + 1
    choice = response.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text, finish_reason)
    entries: Any = await redis.xrange(keys.tokens(rid))
    seqs = [int(fields["seq"]) for _, fields in entries]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "".join(fields.get("text", "") for _, fields in entries) == text
    assert await redis.get(keys.emitted(rid)) == text
