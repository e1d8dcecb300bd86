"""A worker rates itself: it fits its engine's step cost from the steps it runs, reports the jobs
per second it would finish with its slots full (its registry entry and its /metrics), and the
gateway sizes the fleet by it (``ModelInfo.rated``). Real Redis, the in-process gateway, a sim
engine with known step costs."""

from __future__ import annotations

import asyncio

import pytest

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.engines.stepcost import StepCost
from breakwater.gateway.models import ModelRegistry
from tests.helpers import async_wait_for
from tests.inproc import InProc

CHAT = "/v1/chat/completions"
# 20 ms a step, 1 ms per running sequence, 0.02 ms per prompt token joining (1,000 words: 20 ms).
COST = SimOptions(capacity=8, decode_base_ms=20, decode_per_seq_ms=1, prefill_ms_per_token=0.02)
TRUE = StepCost(0.020, 0.001, 0.00002)
LONG = " ".join(["word"] * 1000)


async def _wave(gw: InProc, size: int, long: bool) -> None:
    bodies = [
        {
            "model": "sim",
            "messages": [{"role": "user", "content": f"{LONG if long and i % 2 == 0 else 'hi'} {size} {i}"}],
            "max_tokens": 12,
            "ignore_eos": True,
        }
        for i in range(size)
    ]
    answers = await asyncio.gather(*(gw.http.post(CHAT, json=body) for body in bodies))
    assert [a.status_code for a in answers] == [200] * size, [a.text for a in answers if a.status_code != 200]


async def test_a_worker_reports_the_rating_its_steps_give(gw_empty: InProc) -> None:
    gw = gw_empty
    worker = await gw.add_worker(SimEngine(COST), worker_id="fitted")
    live = await worker.broker.live_workers()
    assert "rated" not in live["fitted"]  # nothing measured yet: nothing claimed
    for size in (1, 2, 4, 8, 3, 6, 8, 5):
        await _wave(gw, size, long=size % 2 == 0)
    cost = worker.rating.fit.cost()
    assert cost is not None, f"{worker.rating.fit.steps} steps gave no fit"
    # Measured step times carry the event loop's lag (the gateway shares it here): loose bounds,
    # but they tell the three costs apart.
    assert cost.per_prompt_token_s == pytest.approx(TRUE.per_prompt_token_s, rel=0.35)
    assert cost.job_s(8, 12, 0) == pytest.approx(TRUE.job_s(8, 12, 0), rel=0.35)
    lengths = (worker.rating.prompt_tokens, worker.rating.output_tokens)
    assert lengths[1] == pytest.approx(12)
    assert 4 < lengths[0] < 1010
    rated = worker.rating.jobs_per_s()
    assert rated == pytest.approx(TRUE.jobs_per_s(8, *reversed(lengths)), rel=0.35)

    async def reported() -> bool:
        # A heartbeat with the worker's rating as it stands: a client's answer can end before the
        # worker has fitted that answer's last step (fitted once its writes are published), so the
        # rating read above may still move a little; once idle, it does not.
        info = (await worker.broker.live_workers())["fitted"]
        return float(info.get("rated", 0)) == pytest.approx(worker.rating.jobs_per_s(), rel=0.001)

    await async_wait_for(reported, 10, what="a heartbeat with the rating")
    info = (await worker.broker.live_workers())["fitted"]
    metrics = worker.metrics.rated.labels("sim")._value.get()
    assert metrics == pytest.approx(float(info["rated"]), rel=0.01)
    # The gateway reads it into the model's figures, which its autoscaling signal sizes by.
    registry: ModelRegistry = gw.app.state.service.registry
    model = (await registry.models(fresh=True))["sim"]
    assert model.rated == pytest.approx(float(info["rated"]), rel=0.01)
