"""The Responses API's structured outputs and function calls with the official ``openai`` client
against the real stack (the bundled SmolLM2 on llamacpp workers, constrained by a grammar): the
SDK's ``responses.parse`` and stream helper, a named function's call, and a conversation that goes
on after the call's output by ``previous_response_id``."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from tests.e2e.test_structured_outputs import ARGUMENTS, Capital, GetTime, GetWeather
from tests.helpers import StackProcs

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer with the city and country."
WEATHER = "What is the weather like in Paris?"


def _tool(model: type[BaseModel], name: str) -> Any:
    """A function tool in the Responses API's flat shape (chat's nests it under ``function``)."""
    return {"type": "function", **openai.pydantic_function_tool(model, name=name)["function"]}


WEATHER_TOOL, TIME_TOOL = _tool(GetWeather, "get_weather"), _tool(GetTime, "get_time")


@pytest.fixture(scope="module")
def llama_stack(shared_llama_stack: StackProcs) -> StackProcs:
    return shared_llama_stack  # the session's (conftest): this module never stops its processes


def test_parse_returns_the_text_formats_object(llama_stack: StackProcs, client: openai.OpenAI) -> None:
    response = client.responses.parse(
        model=MODEL,
        input=QUESTION,
        text_format=Capital,
        max_output_tokens=200,
        temperature=0.8,
        extra_body={"seed": 7},
    )
    assert response.status == "completed"
    assert isinstance(response.output_parsed, Capital)
    assert Capital.model_validate_json(response.output_text) == response.output_parsed
    fmt = response.text.format if response.text else None
    assert fmt is not None and fmt.type == "json_schema"


def test_a_named_function_is_called_and_the_conversation_goes_on_after_its_output(
    llama_stack: StackProcs, client: openai.OpenAI
) -> None:
    first = client.responses.create(
        model=MODEL,
        input=WEATHER,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=100,
        extra_body={"seed": 5},
    )
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert GetWeather.model_validate_json(call.arguments).unit in ("celsius", "fahrenheit")
    assert first.output_text == ""
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_output_tokens=40,
        extra_body={"seed": 5},
    )
    assert second.status in ("completed", "incomplete")
    (item,) = second.output
    assert item.type == "message" and second.output_text
    assert second.previous_response_id == first.id
    (given,) = client.responses.input_items.list(second.id).data  # its own input: the call's output
    assert given.type == "function_call_output" and given.call_id == call.call_id


def test_the_sdk_stream_helper_assembles_a_streamed_call(
    llama_stack: StackProcs, client: openai.OpenAI
) -> None:
    pieces = []
    with client.responses.stream(
        model=MODEL,
        input=WEATHER,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_output_tokens=100,
        extra_body={"seed": 6},
    ) as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                pieces.append(event.delta)
        final = stream.get_final_response()
    assert len(pieces) > 3  # the arguments arrive in pieces
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert "".join(pieces) == call.arguments
    GetWeather.model_validate(json.loads(call.arguments))
    (stored,) = client.responses.retrieve(final.id).output
    assert stored.model_dump() == call.model_dump(exclude={"parsed_arguments"})


def test_the_models_own_choice_streamed_and_whole_agree(
    llama_stack: StackProcs, client: openai.OpenAI
) -> None:
    """``tool_choice: auto``: the model decides (text, calls, or both); the streamed response ends
    with the same output items as the whole one, and every call validates."""
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "input": WEATHER,
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "max_output_tokens": 120,
        "temperature": 0.9,
        "extra_body": {"seed": 2},  # a call (seed 1: a text answer cut at max_output_tokens)
    }
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    last = events[-1]
    assert last.type == f"response.{whole.status}"
    assert last.type in ("response.completed", "response.incomplete")
    ids = {"id", "call_id"}  # two responses: their own ids
    assert [i.model_dump(exclude=ids) for i in last.response.output] == [
        i.model_dump(exclude=ids) for i in whole.output
    ]
    retrieved = client.responses.retrieve(whole.id)  # rendered from the stored text in one piece
    assert [i.model_dump() for i in retrieved.output] == [i.model_dump() for i in whole.output]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    for item in whole.output:
        if item.type == "function_call":
            ARGUMENTS[item.name].model_validate_json(item.arguments)
            assert item.call_id.startswith("call_")


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([{"type": "function", "name": "bad name!"}], "tools[0].name"),
        ([{"type": "function", "name": "f", "parameters": {"type": "frobnicate"}}], "tools[0].parameters"),
    ],
)
def test_function_tools_it_cannot_serve_are_refused_by_name(
    llama_stack: StackProcs, client: openai.OpenAI, tools: Any, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=WEATHER, tools=tools, tool_choice="required")
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body
