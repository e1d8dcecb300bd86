"""Structured outputs (``response_format``) and forced tool calls with the official ``openai`` client
against the real stack: the bundled SmolLM2 on llamacpp workers constrained by a grammar from the
JSON Schema, including a worker SIGKILLed mid-JSON; refusals before queueing (bad schema, an engine
that cannot constrain, a tool choice not served)."""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionNamedToolChoiceParam
from pydantic import BaseModel, Field
from redis.asyncio import Redis

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
def llama_stack(shared_llama_stack: StackProcs) -> StackProcs:
    return shared_llama_stack  # the session's (conftest): this module never stops its processes


def test_parse_returns_the_pydantic_object(llama_stack: StackProcs, client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=QUESTION, response_format=Capital, max_tokens=200, temperature=0.8, seed=7
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Capital)
    assert Capital.model_validate_json(choice.message.content or "") == choice.message.parsed
    extra = client.models.list().data[0].model_extra or {}
    assert "response_format" in extra["features"]


def test_streamed_structured_output_is_assembled_by_the_sdk(
    llama_stack: StackProcs, client: openai.OpenAI
) -> None:
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


def test_json_object_mode_returns_a_json_object(llama_stack: StackProcs, client: openai.OpenAI) -> None:
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


def test_an_unusable_schema_is_refused_before_queueing(
    llama_stack: StackProcs, client: openai.OpenAI
) -> None:
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
    with openai.OpenAI(base_url=f"{stack.gateways[0][1]}/v1", api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.parse(model="sim", messages=QUESTION, response_format=Capital)
        assert "features" in (client.models.list().data[0].model_extra or {})
    body = err.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"]) == ("unsupported_parameter", "response_format")


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


# -- tool calling: a named (or the only `required`) function, its arguments under a grammar -------


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


WEATHER_TOOL = openai.pydantic_function_tool(GetWeather, name="get_weather")
WEATHER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather like in Paris?"}
]
NAMED: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "get_weather"}}


def test_a_named_tool_choice_returns_a_call_whose_arguments_validate(
    llama_stack: StackProcs, client: openai.OpenAI
) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=NAMED, max_tokens=100, seed=5
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = GetWeather.model_validate_json(call.function.arguments)
    assert args.unit in ("celsius", "fahrenheit")
    # The stored stream renders the same call on resume (first chunk names it, then the arguments).
    url = llama_stack.gateways[0][1]
    lines = httpx.get(f"{url}/v1/requests/{completion.id}/events", timeout=30).text.splitlines()
    chunks = [orjson.loads(line[6:]) for line in lines if line.startswith("data: {")]
    head = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert (head["id"], head["function"]["name"]) == (call.id, "get_weather")
    pieces = [
        c["choices"][0]["delta"].get("tool_calls", [{}])[0].get("function", {}).get("arguments", "")
        for c in chunks
        if c["choices"]
    ]
    assert "".join(pieces) == call.function.arguments
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_sdk_stream_helper_reconstructs_a_required_call(
    llama_stack: StackProcs, client: openai.OpenAI
) -> None:
    pieces = []
    with client.chat.completions.stream(
        model=MODEL, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=100, seed=6
    ) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                pieces.append(event.arguments_delta)
        final = stream.get_final_completion()
    assert len(pieces) > 3  # the arguments arrive in pieces
    (call,) = final.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert "".join(pieces) == call.function.arguments
    assert final.choices[0].finish_reason == "tool_calls"


def test_two_choices_each_a_call_of_its_own_streamed_by_index(
    llama_stack: StackProcs, client: openai.OpenAI
) -> None:
    """n=2 with a forced call: each choice is a constrained call with its own id; the SDK's stream
    helper assembles both from chunks interleaved by index."""
    with client.chat.completions.stream(
        model=MODEL, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=NAMED, max_tokens=100, seed=9, n=2
    ) as stream:
        final = stream.get_final_completion()
    assert [c.index for c in final.choices] == [0, 1]
    calls = [(c.message.tool_calls or [])[0] for c in final.choices]
    assert all(isinstance(c.function.parsed_arguments, GetWeather) for c in calls)
    assert calls[0].id != calls[1].id
    assert [c.finish_reason for c in final.choices] == ["tool_calls", "tool_calls"]
    parsed = client.chat.completions.parse(
        model=MODEL, messages=QUESTION, response_format=Capital, max_tokens=200, temperature=0.8, seed=3, n=2
    )
    assert all(isinstance(c.message.parsed, Capital) for c in parsed.choices) and len(parsed.choices) == 2


def test_a_conversation_continues_after_a_tool_result(llama_stack: StackProcs, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=NAMED, max_tokens=100, seed=5
    )
    (call,) = first.choices[0].message.tool_calls or []
    assert call.type == "function"
    history: list[ChatCompletionMessageParam] = [
        *WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=40, seed=5
    )
    choice = second.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content and choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}
                ]
            },
            "tools[0].function.parameters",
        ),
    ],
)
def test_tool_requests_it_cannot_serve_are_refused_by_name(
    llama_stack: StackProcs, change: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "messages": WEATHER, "tools": [WEATHER_TOOL], "tool_choice": NAMED, **change}
    if not change:
        del body["tool_choice"]
    resp = httpx.post(f"{llama_stack.gateways[0][1]}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_a_model_whose_engine_cannot_constrain_refuses_a_forced_call(stack: StackProcs) -> None:
    with (
        openai.OpenAI(base_url=f"{stack.gateways[0][1]}/v1", api_key="unused", max_retries=0) as client,
        pytest.raises(openai.BadRequestError) as err,
    ):
        client.chat.completions.create(model="sim", messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=NAMED)
    assert isinstance(err.value.body, dict)
    assert (err.value.body["code"], err.value.body["param"]) == ("unsupported_parameter", "tool_choice")


@pytest.mark.parametrize("choice", ["auto", None, "required"])
def test_a_model_without_a_tool_format_refuses_the_models_own_choice(
    stack: StackProcs, choice: str | None
) -> None:
    """The sim workers publish no tool-call format: `auto` (also implied by `tools` alone) and
    `required` with several tools are refused by name, before queueing."""
    body: dict[str, Any] = {"model": "sim", "messages": WEATHER, "tools": [WEATHER_TOOL, TIME_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    resp = httpx.post(f"{stack.gateways[0][1]}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert (resp.json()["error"]["code"], resp.json()["error"]["param"]) == (
        "unsupported_parameter",
        "tool_choice",
    )


# -- tool calling: the model's own choice (`auto`, `required`), in SmolLM2's format under a grammar --


class GetTime(BaseModel):
    """Get the current local time in a city."""

    city: str = Field(max_length=30)


TIME_TOOL = openai.pydantic_function_tool(GetTime, name="get_time")
ARGUMENTS: dict[str, type[BaseModel]] = {"get_weather": GetWeather, "get_time": GetTime}


def _check_calls(calls: list[Any]) -> None:
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        ARGUMENTS[call.function.name].model_validate_json(call.function.arguments)
    assert len({call.id for call in calls}) == len(calls)


def _named(calls: list[Any]) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in calls]


def test_required_with_two_tools_calls_one_of_them(llama_stack: StackProcs, client: openai.OpenAI) -> None:
    """One choice, then n=2 (each choice a call of its own, by the model's format)."""
    for n in (1, 2):
        completion = client.chat.completions.create(
            model=MODEL,
            messages=WEATHER,
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice="required",
            max_tokens=120,
            seed=4,
            n=n,
        )
        assert len(completion.choices) == n
        for choice in completion.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            assert choice.message.tool_calls
            _check_calls(choice.message.tool_calls)
    models = {m.id: m.model_extra or {} for m in client.models.list().data}
    assert "tool_format:smollm2" in models[MODEL]["features"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_auto_streamed_and_whole_answers_agree_and_are_well_formed(
    llama_stack: StackProcs, client: openai.OpenAI, seed: int
) -> None:
    """The model decides (maybe no call: an empty list); whatever it decides, the streamed answer,
    assembled by the SDK's helper, equals the whole one, and every call validates."""
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": WEATHER,
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "max_tokens": 120,
        "seed": seed,
        "temperature": 0.9,
    }
    whole = client.chat.completions.create(**kwargs).choices[0]
    if whole.finish_reason == "length":  # cut by max_tokens (CPU-dependent): the calls it finished
        assert "<tool_call>" not in (whole.message.content or "")  # never the markup of one cut short
        _check_calls(whole.message.tool_calls or [])
        with (
            pytest.raises(openai.LengthFinishReasonError) as cut,
            client.chat.completions.stream(**kwargs) as stream,
        ):
            stream.get_final_completion()
        got = cut.value.completion.choices[0].message
        assert got.content == whole.message.content
        assert _named(got.tool_calls or []) == _named(whole.message.tool_calls or [])
        return
    with client.chat.completions.stream(**kwargs) as stream:
        streamed = stream.get_final_completion().choices[0]
    calls = whole.message.tool_calls or []
    _check_calls(calls)
    assert whole.finish_reason == ("tool_calls" if calls else "stop")
    assert streamed.finish_reason == whole.finish_reason
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls or []] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    assert (streamed.message.content or None) == (whole.message.content or None)


def test_auto_continues_a_conversation_after_a_tool_result(
    llama_stack: StackProcs, client: openai.OpenAI
) -> None:
    """History in SmolLM2's format (the call as <tool_call>[...], the result as <tool_response>)."""
    history: list[ChatCompletionMessageParam] = [
        *WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    completion = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=120, seed=8
    )
    choice = completion.choices[0]
    _check_calls(choice.message.tool_calls or [])
    assert choice.finish_reason in ("stop", "tool_calls")


def test_auto_may_answer_in_text(llama_stack: StackProcs, client: openai.OpenAI) -> None:
    """``auto`` is the model's choice between a call and a reply: a greeting is answered in text
    (the grammar once admitted calls only, so this was a made-up `get_weather` call), whole and
    streamed alike."""
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello! How are you today?"}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "max_tokens": 40,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.message.tool_calls is None and whole.message.content
    assert "<tool_call>" not in whole.message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == whole.message.content
    assert not any(d.tool_calls for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
