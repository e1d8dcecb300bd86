"""Structured outputs (``response_format``) with the official ``openai`` client against the real stack:
the bundled SmolLM2 on llamacpp workers constrained by a grammar from the JSON Schema, including a
worker SIGKILLed mid-JSON; refusals before queueing (bad schema, an engine that cannot constrain)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, Field
from redis.asyncio import Redis

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, stream_killing_owner

MODEL = "smollm2-135m-instruct"
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France? Answer with the city and country."}
]


class Capital(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int


class Story(BaseModel):
    title: str = Field(max_length=40)
    story: str = Field(max_length=300)


@pytest.fixture(scope="module")
def llama_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    procs = StackProcs(redis_server.url, f"so{uuid.uuid4().hex[:8]}", log_dir)
    try:
        url = procs.add_gateway()
        for _ in range(2):
            procs.add_worker(
                model=MODEL, engine="llamacpp", n_threads=1, capacity=2, context_length=1024, heartbeat_s=0.3
            )
        procs.wait_workers(url, MODEL, count=2)
        yield procs
    finally:
        procs.stop()


def _client(procs: StackProcs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{procs.gateways[0][1]}/v1", api_key="unused", max_retries=0)


def test_parse_returns_the_pydantic_object(llama_stack: StackProcs) -> None:
    client = _client(llama_stack)
    completion = client.chat.completions.parse(
        model=MODEL, messages=QUESTION, response_format=Capital, max_tokens=200, temperature=0.8, seed=7
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Capital)
    assert Capital.model_validate_json(choice.message.content or "") == choice.message.parsed
    extra = client.models.list().data[0].model_extra or {}
    assert "response_format" in extra["features"]


def test_streamed_structured_output_is_assembled_by_the_sdk(llama_stack: StackProcs) -> None:
    client = _client(llama_stack)
    deltas = []
    with client.chat.completions.stream(
        model=MODEL, messages=QUESTION, response_format=Capital, max_tokens=200, temperature=0.8, seed=11
    ) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
        final = stream.get_final_completion()
    assert len(deltas) > 3  # streamed token by token, not in one piece
    parsed = final.choices[0].message.parsed
    assert isinstance(parsed, Capital)
    assert json.loads("".join(deltas)) == parsed.model_dump()


def test_json_object_mode_returns_a_json_object(llama_stack: StackProcs) -> None:
    client = _client(llama_stack)
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Give me a JSON object with the keys name and age for Ann, 30."}
        ],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0.8,
        seed=4,
    )
    assert completion.choices[0].finish_reason == "stop"
    answer = json.loads(completion.choices[0].message.content or "")
    assert isinstance(answer, dict) and answer


def test_an_unusable_schema_is_refused_before_queueing(llama_stack: StackProcs) -> None:
    client = _client(llama_stack)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "frobnicate"}},
            },
        )
    assert err.value.status_code == 400
    body = err.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"]) == ("invalid_response_format", "response_format.json_schema.schema")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, extra_body={"response_format": {"type": "xml"}}
        )
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "response_format.type"
    # Text completions have no response_format in OpenAI's API: named and refused, never ignored.
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=MODEL, prompt="x", extra_body={"response_format": {"type": "json_object"}}
        )
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "response_format"


def test_a_model_whose_engine_cannot_constrain_refuses_response_format(stack: StackProcs) -> None:
    client = openai.OpenAI(base_url=f"{stack.gateways[0][1]}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.parse(model="sim", messages=QUESTION, response_format=Capital)
    body = err.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"]) == ("unsupported_parameter", "response_format")
    assert "features" in (client.models.list().data[0].model_extra or {})


async def test_a_worker_killed_mid_json_is_continued_under_the_same_constraint(
    llama_stack: StackProcs, redis: Redis
) -> None:
    schema = openai.lib._pydantic.to_strict_json_schema(Story)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON."}],
        "temperature": 0,
        "max_tokens": 400,
        "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": schema}},
        "stream_options": {"include_usage": True},
    }
    got = await stream_killing_owner(llama_stack, redis, "/v1/chat/completions", body, kill_after=15)
    assert got.text == got.record.emitted
    story = Story.model_validate_json(got.text)  # the continued half kept to the schema
    assert story.story
    assert got.record.finish_reason == "stop"
