"""A batch survives its gateway's crash: two gateway processes, the one running the batch SIGKILLed
mid-way; the other takes the batch over once its lease runs out and answers every line once, the
lines that were open by following their requests (still running on the worker), not sending them
again."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path

import openai
import orjson
import pytest
from redis.asyncio import Redis

from breakwater.keys import Keys
from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, async_wait_for, expected_sim

LINES = 8


@pytest.fixture
def two_gateways(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    procs = StackProcs(redis_server.url, f"b{uuid.uuid4().hex[:10]}", log_dir)
    try:
        for _ in range(2):
            procs.add_gateway(batch_lease_s=2, batch_concurrency=2)
        procs.add_worker(sim_decode_base_ms=20, heartbeat_s=0.3)
        procs.wait_workers(procs.gateways[0][1])
        yield procs
    finally:
        procs.stop()


def _row(i: int) -> bytes:
    body = {"model": "sim", "prompt": f"survive {i}", "seed": i, "max_tokens": 25, "ignore_eos": True}
    return orjson.dumps({"custom_id": f"s{i}", "method": "POST", "url": "/v1/completions", "body": body})


async def test_a_batch_whose_gateway_is_killed_is_finished_by_another(
    two_gateways: StackProcs, redis: Redis
) -> None:
    procs = two_gateways
    keys = Keys(procs.prefix)
    clients = [
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) for _, url in procs.gateways
    ]
    data = b"\n".join(_row(i) for i in range(LINES)) + b"\n"
    file = await clients[0].files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await clients[0].batches.create(
        input_file_id=file.id, endpoint="/v1/completions", completion_window="24h"
    )

    async def answered() -> int:
        return int(await redis.hlen(keys.batch_out(batch.id)))

    await async_wait_for(lambda: _at_least(answered(), 2), 30, what="two lines answered")
    owner = await redis.get(keys.batch_lease(batch.id))
    assert isinstance(owner, str)
    pid = int(owner.split(":")[-2])  # <host>:<pid>:<token>
    [running] = [p for p, _ in procs.gateways if p.pid == pid]
    other = next(c for (p, _), c in zip(procs.gateways, clients, strict=True) if p is not running)
    running.kill()
    assert await answered() < LINES  # lines were open when it died
    deadline = time.monotonic() + 60
    while (done := await other.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline, f"batch still {done.status}"
        await asyncio.sleep(0.1)
    assert done.request_counts is not None and done.request_counts.completed == LINES
    assert done.output_file_id is not None and done.error_file_id is None
    content = (await other.files.content(done.output_file_id)).content
    output = [orjson.loads(line) for line in content.splitlines()]
    assert sorted(line["custom_id"] for line in output) == sorted(f"s{i}" for i in range(LINES))
    for line in output:
        i = int(line["custom_id"][1:])
        text, _, _ = expected_sim(prompt=f"survive {i}", seed=i, max_tokens=25, ignore_eos=True)
        assert line["response"]["body"]["choices"][0]["text"] == text
    requests = [k async for k in redis.scan_iter(match=f"{procs.prefix}:req:*")]
    assert len(requests) == LINES  # one request per line: the open ones were followed, not resent
    for client in clients:
        await client.close()


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n
