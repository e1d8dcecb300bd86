"""Crashed workers' jobs are continued by others; cancel and detach free the batch slot."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from redis.asyncio import Redis

from breakwater.redis_server import RedisServer
from tests.helpers import (
    StackProcs,
    async_wait_for,
    expected_sim,
    sse_started,
    stream_killing_owner,
    wait_for,
)


@pytest.fixture
def two_workers(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    procs = StackProcs(redis_server.url, f"k{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        for _ in range(2):
            procs.add_worker(sim_decode_base_ms=40, heartbeat_s=0.3, capacity=4, detach_grace_s=1.0)
        procs.wait_workers(url, count=2)
        yield procs
    finally:
        procs.stop()


def _worker_of(url: str, rid: str) -> str:
    return str(httpx.get(f"{url}/v1/requests/{rid}").json().get("status"))


async def test_sigkilled_worker_job_is_continued_seamlessly(two_workers: StackProcs, redis: Redis) -> None:
    messages = [{"role": "user", "content": "survive a crash"}]
    body = {
        "model": "sim",
        "messages": messages,
        "seed": 4242,
        "max_tokens": 60,
        "ignore_eos": True,
    }
    got = await stream_killing_owner(two_workers, redis, "/v1/chat/completions", body, kill_after=10)
    assert not got.killed.alive()
    expected, _, usage = expected_sim(messages=messages, seed=4242, max_tokens=60, ignore_eos=True)
    assert got.text == expected
    assert got.record.tokens == usage["completion_tokens"] == 60


async def test_delete_cancels_and_frees_the_slot(two_workers: StackProcs, redis: Redis) -> None:
    url = two_workers.gateways[0][1]
    body = {
        "model": "sim",
        "prompt": "long running",
        "seed": 1,
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    with sse_started(url, "/v1/completions", body) as (rid, lines):
        cancel = httpx.delete(f"{url}/v1/requests/{rid}")
        assert cancel.status_code == 200
        assert cancel.json()["status"] == "cancelled"
        rest = list(lines)
    errors = [orjson.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert errors[-1]["error"]["code"] == "cancelled"
    assert "data: [DONE]" not in rest

    async def slot_free_and_acked() -> bool:
        workers = await redis.hgetall(f"{two_workers.prefix}:workers")
        streams = [k async for k in redis.scan_iter(match=f"{two_workers.prefix}:jobs:*")]
        queued = [await redis.xlen(k) for k in streams]
        return all(orjson.loads(v)["active"] == 0 for v in workers.values()) and queued == [0] * len(queued)

    await async_wait_for(slot_free_and_acked, 10, what="cancelled sequence left the batch and was acked")
    assert await redis.hget(two_workers.keys_request(rid), "status") == "cancelled"
    last: Any = await redis.xrevrange(f"{two_workers.prefix}:tok:{{{rid}}}", count=1)
    assert last[0][1]["kind"] == "error", "tokens were appended after the cancel"


async def test_detached_request_keeps_running_then_is_cancelled(
    two_workers: StackProcs, redis: Redis
) -> None:
    url = two_workers.gateways[0][1]
    body = {
        "model": "sim",
        "prompt": "walk away",
        "seed": 9,
        "max_tokens": 3000,
        "stream": True,
        "ignore_eos": True,
    }
    with sse_started(url, "/v1/completions", body) as (rid, _):
        pass
    key = two_workers.keys_request(rid)
    await async_wait_for(lambda: _detached(redis, key), 5, what="detach recorded")
    # Still generating right after the client left (grace period is 1 s here)...
    t0 = int(await redis.hget(key, "tokens") or 0)
    await async_wait_for(lambda: _tokens_above(redis, key, t0), 5, what="generation continues while detached")
    # ...then cancelled because nobody reattached.
    await async_wait_for(lambda: _status_is(redis, key, "cancelled"), 10, what="cancel after grace")
    tail: Any = await redis.xrevrange(f"{two_workers.prefix}:tok:{{{rid}}}", count=1)
    last = orjson.loads(tail[0][1]["error"])
    assert last["code"] == "cancelled"


async def test_a_streamed_background_response_is_never_detached(
    two_workers: StackProcs, redis: Redis
) -> None:
    """The Responses API's ``background``: a client that leaves its stream does not detach the
    response (it completes, its watcher kept); without it the same departure detaches the request
    (and the grace period then cancels it, as above)."""
    url = two_workers.gateways[0][1]
    ids: dict[bool, str] = {}
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        for background in (True, False):
            with client.responses.create(
                model="sim", input="a while", stream=True, background=background, extra_body={"seed": 127}
            ) as stream:
                for event in stream:
                    if event.type == "response.created":
                        ids[background] = event.response.id
                    if event.type == "response.output_text.delta":
                        break  # the client leaves mid-answer
        plain, kept = two_workers.keys_request(ids[False]), two_workers.keys_request(ids[True])
        await async_wait_for(lambda: _detached(redis, plain), 5, what="the plain stream detached")
        await async_wait_for(lambda: _status_is(redis, kept, "done"), 20, what="the background one done")
        assert int(await redis.hget(kept, "watchers") or 0) == 1  # never detached
        text, _, _ = expected_sim(messages=[{"role": "user", "content": "a while"}], seed=127)
        assert client.responses.retrieve(ids[True]).output_text == text


async def _detached(redis: Redis, key: str) -> bool:
    return int(await redis.hget(key, "watchers") or 1) == 0


async def _tokens_above(redis: Redis, key: str, n: int) -> bool:
    return int(await redis.hget(key, "tokens") or 0) > n


async def _status_is(redis: Redis, key: str, status: str) -> bool:
    return await redis.hget(key, "status") == status


def test_killed_worker_leaves_registry(two_workers: StackProcs) -> None:
    url = two_workers.gateways[0][1]
    two_workers.workers[0].kill()
    wait_for(
        lambda: httpx.get(f"{url}/v1/models").json()["data"][0]["workers"] == 1,
        10,
        what="dead worker dropped from /v1/models",
    )
