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
import orjson
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


LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
NOTE = {"type": "function", "function": {"name": "note", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("choice", [None, "required"])
def test_tools_pass_through_to_the_upstream_and_its_calls_come_back(
    up_stack: StackProcs, upstream: str, choice: str | None
) -> None:
    """`tool_choice` auto (the default) and `required` with several tools: the upstream gets the
    tools and the history as sent, and its calls (streamed in pieces) reach the client as the
    upstream made them, streamed and whole (the sim-server answers with a call to the first tool)."""
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "look it up"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "note", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "noted"},
    ]
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": history,
        "tools": [LOOKUP, NOTE],
        "seed": 4,
    }
    if choice:
        kwargs["tool_choice"] = choice
    with (
        openai.OpenAI(base_url=f"{up_stack.gateways[0][1]}/v1", api_key="x", max_retries=0) as client,
        openai.OpenAI(base_url=f"{upstream}/v1", api_key="x", max_retries=0) as direct,
    ):
        reference = direct.chat.completions.create(**kwargs).choices[0]
        whole = client.chat.completions.create(**kwargs)
        with client.chat.completions.stream(**kwargs) as stream:
            streamed = stream.get_final_completion()
    assert reference.finish_reason == "tool_calls" and reference.message.tool_calls
    want = [
        (c.function.name, c.function.arguments) for c in reference.message.tool_calls if c.type == "function"
    ]
    for got in (whole, streamed):
        choice_ = got.choices[0]
        assert choice_.finish_reason == "tool_calls" and not choice_.message.content
        calls = [c for c in choice_.message.tool_calls or [] if c.type == "function"]
        assert [(c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
            (name, orjson.loads(args)) for name, args in want
        ]
    assert whole.usage is not None and whole.usage.completion_tokens == reference_usage(upstream, kwargs)


def reference_usage(upstream: str, kwargs: dict[str, Any]) -> int:
    body = httpx.post(f"{upstream}/v1/chat/completions", json=kwargs, timeout=30).json()
    return int(body["usage"]["completion_tokens"])


def test_embeddings_pass_through_to_the_upstream(up_stack: StackProcs, upstream: str) -> None:
    """The upstream's vectors (order, values to float32), its usage, and `dimensions` applied here."""
    texts = ["the harbor at night", "ships in the harbor", "a recipe for soup"]
    with (
        openai.OpenAI(base_url=f"{up_stack.gateways[0][1]}/v1", api_key="x", max_retries=0) as client,
        openai.OpenAI(base_url=f"{upstream}/v1", api_key="x", max_retries=0) as direct,
    ):
        got = client.embeddings.create(model=MODEL, input=texts)
        want = direct.embeddings.create(model=MODEL, input=texts)
        short = client.embeddings.create(model=MODEL, input=texts[0], dimensions=8).data[0].embedding
    assert [d.index for d in got.data] == [0, 1, 2]
    for mine, theirs in zip(got.data, want.data, strict=True):
        assert mine.embedding == pytest.approx(theirs.embedding, abs=1e-6)
    assert got.usage.prompt_tokens == want.usage.prompt_tokens > 0
    assert len(short) == 8 and sum(x * x for x in short) == pytest.approx(1.0, abs=1e-5)


def test_a_list_of_prompts_goes_upstream_one_choice_at_a_time(up_stack: StackProcs, upstream: str) -> None:
    """The sim server answers one choice of one prompt (a group is refused by name there, never
    answered in part); through Breakwater each choice is a request of its own to it."""
    prompts = ["upstream one", "upstream two"]
    with (
        openai.OpenAI(base_url=f"{up_stack.gateways[0][1]}/v1", api_key="x", max_retries=0) as client,
        openai.OpenAI(base_url=f"{upstream}/v1", api_key="x", max_retries=0) as direct,
    ):
        for kwargs, param in (({"prompt": prompts}, "prompt"), ({"prompt": prompts[0], "n": 2}, "n")):
            with pytest.raises(openai.BadRequestError) as err:
                direct.completions.create(model=MODEL, max_tokens=4, **kwargs)
            assert (err.value.code, err.value.param) == ("unsupported_parameter", param)
        got = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, seed=3)
    expected = [expected_sim(prompt=p, seed=3 + j, max_tokens=5)[0] for p in prompts for j in range(2)]
    assert [c.text for c in got.choices] == expected


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
    waits in Redis, not inside a 2-slot upstream. Without them (``off``) it all goes upstream. The
    worker asks for the load metrics by name (vLLM's ``/metrics/?name[]=...``), never for the whole
    page, which vLLM renders in ~14 ms of its API server's CPU."""
    sim, sim_url = start_sim_server(log_dir, capacity=2, sim_decode_base_ms=10)
    procs = StackProcs(redis_server.url, f"u{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        extra: dict[str, Any] = {} if metrics == "auto" else {"upstream_metrics_url": "off"}
        procs.add_worker(MODEL, "openai", upstream_url=sim_url, capacity=32, upstream_pull_burst=2, **extra)
        procs.wait_workers(url, MODEL)
        texts = await _burst(url, 16)
        assert texts == [expected_sim(prompt=f"burst {i}", seed=i, max_tokens=20)[0] for i in range(16)]
        gauges = upstream_gauges(sim_url)  # this read is not in its own counts
        peak = gauges["breakwater_sim_peak_requests_waiting"]
        if metrics == "auto":
            assert peak <= 4  # at most a burst sent per scrape, plus one still in transit
            assert gauges["breakwater_sim_named_scrapes"] >= 2
        else:
            assert peak >= 8
            assert gauges["breakwater_sim_named_scrapes"] == 0
        assert gauges["breakwater_sim_whole_scrapes"] == 0
    finally:
        procs.stop()
        sim.stop()
