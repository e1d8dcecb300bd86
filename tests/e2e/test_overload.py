"""Overload: far more requests than the layer can run. Each one either streams to its end or is
refused up front with 429 and Retry-After (the lane bound); none gets a 5xx and no stream breaks."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, one_gateway_one_worker

pytestmark = pytest.mark.timeout(180)

TOKENS = 16


@dataclass
class Outcome:
    status: int
    retry_after: str | None = None
    tokens: int = 0
    done: bool = False
    broken: str = ""


@pytest.fixture
def small_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[tuple[StackProcs, str]]:
    """Two slots of 16 tokens at ~10 ms a token: it holds ~12 requests a second."""
    gateway = {"lane_max_queued": 20}
    with one_gateway_one_worker(
        redis_server.url, "o", log_dir, gateway, sim_decode_base_ms=10, capacity=2, heartbeat_s=0.3
    ) as procs:
        yield procs, procs.gateways[0][1]


async def _one(client: httpx.AsyncClient, seed: int) -> Outcome:
    body = {"model": "sim", "prompt": "overload", "max_tokens": TOKENS, "ignore_eos": True, "stream": True}
    try:
        async with client.stream("POST", "/v1/completions", json={**body, "seed": seed}) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Outcome(resp.status_code, resp.headers.get("retry-after"))
            out = Outcome(200)
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    out.done = True
                elif line.startswith("data: "):
                    choices = orjson.loads(line[6:]).get("choices") or []
                    out.tokens += sum(1 for c in choices if c.get("text"))
            return out
    except httpx.HTTPError as exc:  # a stream cut mid-body
        return Outcome(200, broken=f"{type(exc).__name__}: {exc}")


async def test_five_times_capacity_queues_or_refuses_and_never_breaks(
    small_stack: tuple[StackProcs, str],
) -> None:
    procs, url = small_stack
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        tasks = []
        for seed in range(240):  # ~60 req/s for ~4 s: five times what it holds
            tasks.append(asyncio.create_task(_one(client, seed)))
            await asyncio.sleep(rng.expovariate(60))
        outcomes = await asyncio.gather(*tasks)
    statuses = sorted({o.status for o in outcomes})
    assert set(statuses) <= {200, 429}, statuses
    refused = [o for o in outcomes if o.status == 429]
    served = [o for o in outcomes if o.status == 200]
    assert refused and served, statuses  # it was overloaded, and it kept serving
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in refused)
    assert [o.broken for o in served if o.broken] == []
    assert all(o.done and o.tokens == TOKENS for o in served), [o for o in served if not o.done][:3]
    assert all(proc.alive() for proc, _ in procs.gateways) and all(w.alive() for w in procs.workers)
