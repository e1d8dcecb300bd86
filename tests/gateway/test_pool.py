"""A burst wider than the gateway's Redis pool waits for a connection instead of failing: with two
connections, sixty concurrent requests are all admitted and answered."""

from __future__ import annotations

import asyncio

from breakwater.redis_server import RedisServer
from tests.inproc import inproc_gateway


async def test_a_burst_wider_than_the_pool_waits_for_connections(
    redis_server: RedisServer, prefix: str
) -> None:
    async with inproc_gateway(redis_server.url, prefix, redis_max_connections=2) as gw:
        await gw.add_worker(capacity=64)
        body = {"model": "sim", "prompt": "burst", "max_tokens": 4, "ignore_eos": True}
        replies = await asyncio.gather(
            *(gw.http.post("/v1/completions", json={**body, "seed": i}) for i in range(60))
        )
    assert [r.status_code for r in replies] == [200] * 60, {r.status_code: r.text for r in replies}
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in replies)
