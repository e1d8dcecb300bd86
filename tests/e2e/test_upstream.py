"""The ``openai`` engine: workers forwarding to an OpenAI-compatible upstream (``breakwater sim-server``).

The sim-server exports vLLM's load metrics and continues a final assistant message like vLLM's
``continue_final_message``, so these tests check the whole upstream path: content and usage, stop
strings, upstream 4xx mapped to the client, cancel reaching the upstream, SIGKILL continuation, and
pulling by the upstream's own queue so that the backlog waits in Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from breakwater.redis_server import RedisServer
from tests.helpers import (
    StackProcs,
    async_wait_for,
    expected_sim,
    start_sim_server,
    stream_killing_owner,
    upstream_gauges,
)

MODEL = "up-sim"


@pytest.fixture(scope="module")
def upstream(log_dir: Path) -> Iterator[str]:
    proc, url = start_sim_server(log_dir, capacity=8, sim_decode_base_ms=20)
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def up_stack(redis_server: RedisServer, log_dir: Path, upstream: str) -> Iterator[StackProcs]:
    procs = StackProcs(redis_server.url, f"u{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        for _ in range(2):
            procs.add_worker(MODEL, "openai", upstream_url=f"{upstream}/v1", heartbeat_s=0.3, capacity=8)
        procs.wait_workers(url, MODEL, count=2)
        yield procs
    finally:
        procs.stop()


def test_registers_the_upstream_limits(up_stack: StackProcs) -> None:
    url = up_stack.gateways[0][1]
    models = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert models[MODEL]["workers"] == 2
    assert models[MODEL]["max_model_len"] == 4096  # read from the upstream's /v1/models


async def test_chat_and_completion_match_the_engine(up_stack: StackProcs) -> None:
    url = up_stack.gateways[0][1]
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x")
    messages = [{"role": "user", "content": "through the upstream"}]
    expected, finish, usage = expected_sim(messages=messages, seed=11, max_tokens=40)
    chat = await client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        seed=11,
        max_tokens=40,
    )
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].finish_reason == finish
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )

    expected, _, usage = expected_sim(prompt="plain completion", seed=12, max_tokens=25, stop=["tide"])
    stream = await client.completions.create(
        model=MODEL,
        prompt="plain completion",
        seed=12,
        max_tokens=25,
        stop=["tide"],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    final_usage = None
    async for chunk in stream:
        parts.extend(c.text for c in chunk.choices)
        final_usage = chunk.usage or final_usage
    assert "".join(parts) == expected
    assert "tide" not in "".join(parts)
    assert final_usage is not None and final_usage.completion_tokens == usage["completion_tokens"]
    await client.close()


def test_upstream_rejection_reaches_the_client(
    redis_server: RedisServer, log_dir: Path, upstream: str
) -> None:
    """The worker claims a longer context than the upstream has: the upstream's 400 reaches the client."""
    procs = StackProcs(redis_server.url, f"u{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        procs.add_worker(MODEL, "openai", upstream_url=upstream, context_length=100_000)
        procs.wait_workers(url, MODEL)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=5)
        assert err.value.code == "context_length_exceeded"
        assert "4096" in err.value.message
        ok = client.completions.create(model=MODEL, prompt="still serving", max_tokens=5, seed=1)
        assert ok.choices[0].text == expected_sim(prompt="still serving", seed=1, max_tokens=5)[0]
    finally:
        procs.stop()


async def test_cancel_aborts_the_upstream_request(up_stack: StackProcs, upstream: str) -> None:
    url = up_stack.gateways[0][1]
    body = {"model": MODEL, "prompt": "cancel me upstream", "max_tokens": 3000, "ignore_eos": True}
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp,
    ):
        rid = resp.headers["x-breakwater-request-id"]
        await async_wait_for(
            lambda: upstream_gauges(upstream)["vllm:num_requests_running"] >= 1, 10, what="running upstream"
        )
        assert (await http.delete(f"/v1/requests/{rid}")).status_code == 200
    await async_wait_for(
        lambda: upstream_gauges(upstream)["vllm:num_requests_running"] == 0, 10, what="upstream aborted"
    )


async def test_sigkilled_worker_is_continued_through_the_upstream(up_stack: StackProcs, redis: Redis) -> None:
    messages = [{"role": "user", "content": "survive a crash upstream"}]
    body = {"model": MODEL, "messages": messages, "seed": 77, "max_tokens": 60, "ignore_eos": True}
    got = await stream_killing_owner(up_stack, redis, "/v1/chat/completions", body, kill_after=10)
    expected, _, usage = expected_sim(messages=messages, seed=77, max_tokens=60, ignore_eos=True)
    assert got.text == expected
    assert got.record.usage == usage  # the continuation's prompt is not counted twice


async def _burst(url: str, n: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    try:
        results = await asyncio.gather(
            *(
                client.completions.create(model=MODEL, prompt=f"burst {i}", seed=i, max_tokens=20)
                for i in range(n)
            )
        )
    finally:
        await client.close()
    return [r.choices[0].text for r in results]


@pytest.mark.parametrize("metrics", ["auto", "off"])
async def test_pulls_by_the_upstream_queue(
    redis_server: RedisServer, log_dir: Path, redis: Redis, metrics: str
) -> None:
    """With vLLM metrics, the worker sends only while the upstream has nothing waiting: a burst of 16
    waits in Redis, not inside a 2-slot upstream. Without them (``off``) it all goes upstream."""
    sim, sim_url = start_sim_server(log_dir, capacity=2, sim_decode_base_ms=10)
    procs = StackProcs(redis_server.url, f"u{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        extra: dict[str, Any] = {} if metrics == "auto" else {"upstream_metrics_url": "off"}
        procs.add_worker(MODEL, "openai", upstream_url=sim_url, capacity=32, upstream_pull_burst=2, **extra)
        procs.wait_workers(url, MODEL)
        texts = await _burst(url, 16)
        assert texts == [expected_sim(prompt=f"burst {i}", seed=i, max_tokens=20)[0] for i in range(16)]
        peak = upstream_gauges(sim_url)["breakwater_sim_peak_requests_waiting"]
        if metrics == "auto":
            assert peak <= 4  # at most a burst sent per scrape, plus one still in transit
        else:
            assert peak >= 8
    finally:
        procs.stop()
        sim.stop()
