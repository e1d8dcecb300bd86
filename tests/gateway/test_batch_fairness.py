"""A gateway runs a few batches at a time; a batch its owner's limits hold back gives its place up
meanwhile, so one tenant's refused batches never keep another tenant's waiting (they did, for up to
the batch's 24 h window)."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import httpx2
import openai
import orjson

from breakwater.redis_server import RedisServer
from breakwater.tenancy.apikeys import ApiKey
from tests.inproc import InProc, inproc_gateway

PEPPER = "batch-fairness-pepper-0123456789ab"


def _client(gw: InProc, key: str) -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app), base_url="http://gw")
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key=key, http_client=http, max_retries=0)


async def _batch(client: openai.AsyncOpenAI, lines: int) -> Any:
    rows = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "sim", "prompt": f"line {i}", "max_tokens": 2},
        }
        for i in range(lines)
    ]
    data = b"".join(orjson.dumps(row) + b"\n" for row in rows)
    file = await client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    return await client.batches.create(
        input_file_id=file.id, endpoint="/v1/completions", completion_window="24h"
    )


async def test_a_batch_held_back_by_its_owners_limits_lets_another_tenants_run(
    redis_server: RedisServer, prefix: str
) -> None:
    async with inproc_gateway(
        redis_server.url, prefix, auth="keys", auth_pepper=PEPPER, auth_cache_s=0, batch_max_running=1
    ) as gw:
        await gw.add_worker()
        keys = gw.app.state.service.broker.api_keys(PEPPER.encode())
        slow, _ = await keys.create(ApiKey(id="", tenant="carol", rpm=1))
        free, _ = await keys.create(ApiKey(id="", tenant="bob"))
        async with _client(gw, slow) as carol, _client(gw, free) as bob:
            held = await _batch(carol, 5)  # one line a minute: the rest refused for now
            deadline = time.monotonic() + 20
            while (await carol.batches.retrieve(held.id)).request_counts.completed < 1:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "carol's first line was not answered"
                await asyncio.sleep(0.05)
            other = await _batch(bob, 1)
            while (done := await bob.batches.retrieve(other.id)).status != "completed":
                assert time.monotonic() < deadline, f"bob's batch waited behind carol's: {done.status}"
                await asyncio.sleep(0.05)
            assert done.request_counts is not None and done.request_counts.completed == 1
            still = await carol.batches.retrieve(held.id)
            assert still.status == "in_progress" and still.request_counts is not None
            assert still.request_counts.completed == 1 and still.request_counts.failed == 0
