"""200 concurrent streaming requests through one gateway and two sim workers all complete correctly."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, expected_sim

N = 200


@pytest.fixture(scope="module")
def wide_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    procs = StackProcs(redis_server.url, f"c{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        for _ in range(2):
            procs.add_worker(sim_decode_base_ms=2, sim_decode_per_seq_ms=0.05, capacity=64, heartbeat_s=0.5)
        procs.wait_workers(url, count=2)
        yield procs
    finally:
        procs.stop()


async def test_200_concurrent_streams_complete_exactly(wide_stack: StackProcs) -> None:
    client = openai.AsyncOpenAI(
        base_url=f"{wide_stack.gateways[0][1]}/v1", api_key="unused", max_retries=0, timeout=120
    )

    async def one(i: int) -> tuple[int, str, str | None, int]:
        stream = await client.completions.create(
            model="sim",
            prompt=f"concurrent request {i}",
            seed=i,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, reason, tokens = "", None, -1
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return i, text, reason, tokens

    results = await asyncio.gather(*(one(i) for i in range(N)))
    await client.close()
    assert len(results) == N
    for i, text, reason, tokens in results:
        expected, exp_reason, usage = expected_sim(prompt=f"concurrent request {i}", seed=i, max_tokens=24)
        assert text == expected, i
        assert reason == exp_reason, i
        assert tokens == usage["completion_tokens"], i
    served = {w.args[-1] for w in wide_stack.workers if '"job finished"' in w.log()}
    assert len(served) == 2, "both workers should have taken jobs"
