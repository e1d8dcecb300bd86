"""A conversation's messages checked as OpenAI checks them, through the official ``openai`` client:
a tool result answers a call of the assistant message just before it, every call has its result,
a message's required fields are there. Each refusal is a 400 naming the field, with OpenAI's code,
and queues nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest

from tests.helpers import expected_sim
from tests.inproc import InProc

ASK: dict[str, Any] = {"role": "user", "content": "What is the weather in Paris and in Rome?"}


def _call(call_id: str, city: str) -> dict[str, Any]:
    arguments = f'{{"city": "{city}"}}'
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


CALLS: dict[str, Any] = {
    "role": "assistant",
    "content": None,
    "tool_calls": [_call("c1", "Paris"), _call("c2", "Rome")],
}


def _result(call_id: str, text: str = "sunny") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


@pytest.fixture
async def client(gw: InProc) -> AsyncIterator[openai.AsyncOpenAI]:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app), base_url="http://gw")
    async with openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0) as c:
        yield c


ECHOED: dict[str, Any] = {  # an answer's message as the SDK gives it back (`model_dump()`)
    **CALLS,
    "refusal": None,
    "audio": None,
    "function_call": None,
    "annotations": [],
    "parsed": {"city": "Paris"},  # `parse()`'s copy of the content as an object
}


def _assistant(*calls: Any) -> dict[str, Any]:
    return {"role": "assistant", "tool_calls": list(calls)}


@pytest.mark.parametrize(
    ("messages", "param", "code", "says"),
    [
        # A result without the call it answers, or of a call that was not made.
        (
            [ASK, {"role": "tool", "content": "sunny"}],
            "messages.1.tool_call_id",
            "missing_required_parameter",
            "missing",
        ),
        ([ASK, _result("c1")], "messages.1.role", "invalid_value", "tool_calls"),
        ([ASK, CALLS, _result("c3")], "messages.2.tool_call_id", "invalid_value", "'c3'"),
        (
            [ASK, CALLS, _result("c1"), _result("c2"), ASK, _result("c1")],
            "messages.5.role",
            "invalid_value",
            "tool_calls",
        ),
        # A call without its result before the conversation goes on, or at its end: the first such call.
        ([ASK, CALLS, _result("c2"), ASK], "messages.1.tool_calls.0", "invalid_value", "none: c1"),
        ([ASK, CALLS, _result("c1"), ASK], "messages.1.tool_calls.1", "invalid_value", "none: c2"),
        ([ASK, CALLS], "messages.1.tool_calls.0", "invalid_value", "none: c1, c2"),
        # Calls and results as OpenAI types them.
        (
            [ASK, _assistant({"type": "function", "function": {"name": "f", "arguments": ""}})],
            "messages.1.tool_calls.0.id",
            "missing_required_parameter",
            "missing",
        ),
        (
            [ASK, _assistant({"id": "c1", "type": "function", "function": {"name": "f"}})],
            "messages.1.tool_calls.0.function.arguments",
            "missing_required_parameter",
            "missing",
        ),
        (
            [ASK, _assistant({"id": 7, "type": "function", "function": {"name": "f", "arguments": ""}})],
            "messages.1.tool_calls.0.id",
            "invalid_type",
            "string",
        ),
        (
            [ASK, _assistant({"id": "c1", "type": "custom", "custom": {"name": "f", "input": ""}})],
            "messages.1.tool_calls.0",
            "invalid_value",
            "function",
        ),
        (
            [ASK, {"role": "assistant", "tool_calls": {"id": "c1"}}],
            "messages.1.tool_calls",
            "invalid_value",
            "list",
        ),
        (
            [ASK, CALLS, {**_result("c1"), "tool_call_id": 1}],
            "messages.2.tool_call_id",
            "invalid_type",
            "string",
        ),
        # Content: a user's (and a system's, a tool's) is required; an empty list of parts is no content.
        ([{"role": "user", "content": None}], "messages.0.content", "missing_required_parameter", "missing"),
        ([{"role": "system"}, ASK], "messages.0.content", "missing_required_parameter", "missing"),
        ([{"role": "user", "content": []}], "messages.0.content", "empty_array", "empty"),
        (
            [ASK, CALLS, {"role": "tool", "tool_call_id": "c1"}],
            "messages.2.content",
            "missing_required_parameter",
            "missing",
        ),
    ],
)
async def test_a_malformed_conversation_is_400_naming_the_field(
    gw: InProc, client: openai.AsyncOpenAI, messages: list[Any], param: str, code: str, says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="sim", messages=messages, max_tokens=4)
    body = info.value.body
    assert isinstance(body, dict), body
    assert (body["param"], body["code"], body["type"]) == (param, code, "invalid_request_error"), body
    assert str(body["message"]).startswith(f"{param}: ") and says in str(body["message"]), body
    assert await gw.records() == []


async def test_a_conversation_whose_calls_have_their_results_is_served(client: openai.AsyncOpenAI) -> None:
    """Results in any order, an assistant message with both text and calls (or as the SDK echoes an
    answer back), a conversation going on after its calls' results: served."""
    with_text = {**CALLS, "content": "Let me look."}
    as_object = _assistant({"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}})
    conversations: list[list[Any]] = [
        [ASK, CALLS, _result("c2", "rain"), _result("c1")],
        [ASK, with_text, _result("c1"), _result("c2")],
        [ASK, ECHOED, _result("c1"), _result("c2")],
        [ASK, as_object, _result("c1")],  # arguments as an object, as some clients send them
        [ASK, CALLS, _result("c1"), _result("c2"), {"role": "assistant", "content": "Sunny."}, ASK],
    ]
    for messages in conversations:
        completion = await client.chat.completions.create(
            model="sim", messages=messages, max_tokens=4, seed=3
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "length" and choice.message.content, completion
        assert completion.usage is not None and completion.usage.completion_tokens == 4


async def test_the_served_conversation_is_what_the_engine_reads(client: openai.AsyncOpenAI) -> None:
    """The check changes nothing of what a valid conversation generates."""
    messages: list[Any] = [
        ASK,
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thanks!"},
    ]
    completion = await client.chat.completions.create(model="sim", messages=messages, max_tokens=6, seed=5)
    text, reason, _ = expected_sim(messages=messages, seed=5, max_tokens=6)
    assert (completion.choices[0].message.content, completion.choices[0].finish_reason) == (text, reason)
