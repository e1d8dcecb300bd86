"""OpenAI request fields as the official ``openai`` client sends them, in-process with the sim engine:
what is honoured is honoured, what is not is a 400 naming it (never dropped), and ``null`` where the
SDK types a field optional is the default."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest

from breakwater.engines.sim import SimEngine
from breakwater.gateway.errors import APIError
from breakwater.gateway.models import ModelInfo
from breakwater.gateway.specs import request_spec
from breakwater.protocol.openai import ChatCompletionRequest
from breakwater.protocol.toolformats import SINGLE_NOTE
from breakwater.protocol.tools import AutoCalls
from tests.helpers import expected_sim
from tests.inproc import InProc

HI: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def client(gw: InProc) -> AsyncIterator[openai.AsyncOpenAI]:
    # The openai SDK brings its own httpx (httpx2): its ASGI transport drives the app in-process.
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app), base_url="http://gw")
    async with openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0) as c:
        yield c


async def _refused(client: openai.AsyncOpenAI, param: str, code: str, **kwargs: Any) -> str:
    """Sends a chat completion that must be refused with 400 naming ``param``; its message."""
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="sim", messages=kwargs.pop("messages", HI), **kwargs)
    body = info.value.body
    assert isinstance(body, dict), body
    assert (body["param"], body["code"]) == (param, code), body
    return str(body["message"])


async def test_stream_options_without_stream_are_refused(client: openai.AsyncOpenAI) -> None:
    message = await _refused(
        client, "stream_options", "invalid_value", max_tokens=4, stream_options={"include_usage": True}
    )
    assert "stream" in message


async def test_stream_options_that_ask_for_what_is_not_done_are_refused(client: openai.AsyncOpenAI) -> None:
    await _refused(
        client,
        "stream_options.include_obfuscation",
        "invalid_value",
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": True},
    )
    await _refused(
        client,
        "stream_options.include_timings",
        "unknown_parameter",  # OpenAI's code for a key it does not know
        max_tokens=4,
        stream=True,
        stream_options={"include_timings": True},  # not OpenAI's: not dropped either
    )
    # Obfuscation declined and usage asked: served, with the usage chunk.
    stream = await client.chat.completions.create(
        model="sim",
        messages=HI,
        max_tokens=4,
        seed=1,
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_sim(messages=HI, seed=1, max_tokens=4)[0]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_null_is_the_default_where_the_sdk_types_a_field_optional(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="sim",
        messages=HI,
        max_tokens=4,
        seed=2,
        n=None,
        stream=None,
        extra_body={"verbosity": None, "modalities": ["text"], "function_call": "auto"},
    )
    assert len(resp.choices) == 1
    assert resp.choices[0].message.content == expected_sim(messages=HI, seed=2, max_tokens=4)[0]
    done = await client.completions.create(model="sim", prompt="hi", max_tokens=4, seed=2, echo=None)
    assert done.choices[0].text == expected_sim(prompt="hi", seed=2, max_tokens=4)[0]
    # An output other than text is still asked for: refused.
    await _refused(client, "modalities", "unsupported_parameter", max_tokens=4, modalities=["text", "audio"])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"metadata": {"a": 1}}, "metadata.a"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"safety_identifier": "s" * 65}, "safety_identifier"),
        ({"prompt_cache_key": 7}, "prompt_cache_key"),
    ],
)
async def test_tagging_fields_are_typed(
    client: openai.AsyncOpenAI, fields: dict[str, Any], param: str
) -> None:
    await _refused(client, param, "invalid_value", max_tokens=4, extra_body=fields)


async def test_tagging_fields_of_the_right_shape_are_served(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="sim",
        messages=HI,
        max_tokens=4,
        seed=3,
        metadata={f"k{i}": "v" * 512 for i in range(16)},
        safety_identifier="user-123",
        prompt_cache_key="conversation-9",
    )
    assert resp.choices[0].message.content == expected_sim(messages=HI, seed=3, max_tokens=4)[0]
    emb = await client.embeddings.create(model="sim", input="hi", extra_body={"metadata": {"a": "b"}})
    assert len(emb.data) == 1
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="sim", input="hi", extra_body={"metadata": {"a": 1}})
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "metadata.a"


async def test_a_developer_message_is_the_system_message(client: openai.AsyncOpenAI) -> None:
    """OpenAI's ``developer`` role is ``system`` for models before it: the sim's template shows the
    role it got, so the answer is the one to a system message."""
    messages: list[Any] = [{"role": "developer", "content": "be brief"}, *HI]
    resp = await client.chat.completions.create(model="sim", messages=messages, max_tokens=6, seed=4)
    as_system = [{"role": "system", "content": "be brief"}, *HI]
    assert resp.choices[0].message.content == expected_sim(messages=as_system, seed=4, max_tokens=6)[0]
    assert expected_sim(messages=as_system, seed=4, max_tokens=6) != expected_sim(
        messages=HI, seed=4, max_tokens=6
    )


def test_a_participants_name_goes_with_its_message_to_the_engine() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "sim",
            "messages": [
                {"role": "developer", "content": "rules", "name": "ops"},
                {"role": "user", "content": "hi", "name": "bob"},
                {"role": "assistant", "content": "hello", "refusal": None, "audio": None},
            ],
        }
    )
    spec = request_spec(body, request_id="r", default_timeout_s=60)
    assert spec.messages == [
        {"role": "system", "content": "rules", "name": "ops"},
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": "hello"},
    ]


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "assistant", "content": "no", "refusal": "I can't"}, "messages.1"),
        (
            {"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{}"}},
            "messages.1",
        ),
        ({"role": "user", "content": "hi", "name": ""}, "messages.1.name"),
    ],
)
async def test_message_fields_not_served_are_refused(
    client: openai.AsyncOpenAI, message: dict[str, Any], param: str
) -> None:
    await _refused(client, param, "invalid_value", messages=[*HI, message], max_tokens=4)


SHAPE: Any = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "shema": SHAPE}}},
            "response_format.json_schema.shema",
            "unknown_parameter",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SHAPE}}},
            "response_format.json_schema.name",
            "missing_required_parameter",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "paramters": SHAPE}}],
                "tool_choice": "required",
            },
            "tools[0].function.paramters",
            "unknown_parameter",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "foo": 1}]}]},
            "messages.0.content.0.foo",
            "unknown_parameter",
        ),
    ],
)
async def test_a_misspelt_nested_field_is_refused_by_name(
    client: openai.AsyncOpenAI, fields: dict[str, Any], param: str, code: str
) -> None:
    """Passed over, each was served as its default: ``shema`` as any JSON object, ``paramters`` as a
    call held to an empty object."""
    await _refused(client, param, code, max_tokens=4, **fields)


async def test_an_assistant_message_with_neither_content_nor_calls_is_refused(
    client: openai.AsyncOpenAI,
) -> None:
    """OpenAI refuses it (it says nothing); it was taken as an empty turn."""
    bare: Any = {"role": "assistant", "content": None}
    await _refused(client, "messages.1.content", "missing_required_parameter", messages=[*HI, bare, *HI])


async def test_an_empty_field_a_nested_object_does_not_have_asks_for_nothing(
    client: openai.AsyncOpenAI,
) -> None:
    """A client that writes its unset fields as null (or empty) is served, as for a message's."""
    content: Any = [{"type": "text", "text": "hi", "cache_control": None}]
    tool: Any = {"type": "function", "function": {"name": "f", "parameters": SHAPE, "paramters": {}}, "x": ""}
    answer = await client.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": content}],
        tools=[tool],
        tool_choice="none",
        max_tokens=4,
    )
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"


async def test_response_format_with_a_forced_tool_call_is_refused(client: openai.AsyncOpenAI) -> None:
    """The answer is the call's arguments: a ``response_format`` beside it would be ignored."""
    tools: Any = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    message = await _refused(
        client,
        "response_format",
        "unsupported_parameter",
        max_tokens=4,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "f"}},
        response_format={"type": "json_object"},
    )
    assert "forced tool call" in message


class CallingSim(SimEngine):
    """A sim whose model writes Hermes tool calls: every answer is :data:`TWO_CALLS`, a piece a token."""

    tool_format = "hermes"

    def token_text(self, seq: Any, index: int) -> str:
        return TWO_CALLS[index] if index < len(TWO_CALLS) else ""


TWO_CALLS = [
    "Checking.",
    '<tool_call>\n{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}\n</tool_call>',
    '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
]
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


@pytest.mark.parametrize("parallel", [True, False])
async def test_parallel_tool_calls_false_gives_one_call(gw_empty: InProc, parallel: bool) -> None:
    """With the model's calls parsed by the gateway (Hermes), ``parallel_tool_calls: false`` keeps
    the answer's first call only, streamed and whole, as vLLM does; the model is told so too."""
    await gw_empty.add_worker(CallingSim())
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw_empty.app), base_url="http://gw")
    async with openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0) as c:
        asked: Any = dict(
            model="sim",
            messages=HI,
            tools=TOOLS,
            parallel_tool_calls=parallel,
            max_tokens=4,
            extra_body={"ignore_eos": True},
        )
        whole = await c.chat.completions.create(**asked)
        stream = await c.chat.completions.create(**asked, stream=True)
        streamed = [
            call.function.name
            async for chunk in stream
            if chunk.choices
            for call in chunk.choices[0].delta.tool_calls or ()
            if call.function is not None and call.function.name
        ]
    names = ["get_weather", "get_time"] if parallel else ["get_weather"]
    message = whole.choices[0].message
    assert message.content == "Checking.\n"
    assert [call.function.name for call in message.tool_calls or () if call.type == "function"] == names
    assert streamed == names
    system = AutoCalls((), "hermes", False, parallel).system("")["content"]
    assert (SINGLE_NOTE in system) is not parallel


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "custom", "custom": {"name": "grep"}}]}, "tools[0]"),
        (
            {
                "tools": TOOLS,
                "tool_choice": {
                    "type": "allowed_tools",
                    "allowed_tools": {
                        "mode": "auto",
                        "tools": [{"type": "function", "function": {"name": "get_time"}}],
                    },
                },
            },
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "custom", "custom": {"name": "grep"}}}, "tool_choice"),
    ],
)
async def test_openai_tool_kinds_not_served_are_unsupported_parameters(
    client: openai.AsyncOpenAI, fields: dict[str, Any], param: str
) -> None:
    """Valid OpenAI requests this server does not serve: `unsupported_parameter`, not a malformed value."""
    await _refused(client, param, "unsupported_parameter", max_tokens=4, extra_body=fields)


async def test_echo_is_an_unsupported_parameter(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="sim", prompt="hi", max_tokens=4, echo=True)
    assert isinstance(info.value.body, dict)
    assert (info.value.body["param"], info.value.body["code"]) == ("echo", "unsupported_parameter")


async def test_a_text_completion_without_max_tokens_stops_at_sixteen_as_openais(
    client: openai.AsyncOpenAI,
) -> None:
    """OpenAI's (and vLLM's) legacy default for ``/v1/completions``: 16 tokens; ``null`` is no bound
    (the answer runs to the model's end token, here 34 tokens)."""
    text, reason, usage = expected_sim(prompt="sixteen", seed=0, max_tokens=16)
    short = await client.completions.create(model="sim", prompt="sixteen", seed=0)
    assert (short.choices[0].text, short.choices[0].finish_reason) == (text, reason) == (text, "length")
    assert short.usage is not None and short.usage.completion_tokens == usage["completion_tokens"] == 16
    text, reason, usage = expected_sim(prompt="sixteen", seed=0, max_tokens=None)
    whole = await client.completions.create(model="sim", prompt="sixteen", seed=0, max_tokens=None)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (text, reason) == (text, "stop")
    assert whole.usage is not None and whole.usage.completion_tokens == usage["completion_tokens"] == 34


@pytest.mark.parametrize("schema", [{"type": "array", "items": {"type": "integer"}}, {"type": "string"}])
async def test_a_function_whose_parameters_are_not_an_object_is_refused(
    client: openai.AsyncOpenAI, schema: dict[str, Any]
) -> None:
    """A call's arguments are a JSON object (OpenAI refuses other schemas): with an array schema a
    forced call came back as ``[]`` and an `auto` one as markup in ``content``."""
    tool: Any = {"type": "function", "function": {"name": "f", "parameters": schema}}
    message = await _refused(
        client,
        "tools[0].function.parameters",
        "invalid_function_parameters",
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "f"}},
        max_tokens=4,
    )
    assert 'type: "object"' in message and f'`type: "{schema["type"]}"`' in message


BOUNDED: Any = {
    "type": "object",
    "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["qty"],
}


async def test_a_schema_keyword_the_grammar_cannot_keep_is_refused_where_it_would_be_enforced(
    client: openai.AsyncOpenAI,
) -> None:
    """``maximum: 9`` was answered with 12: the grammar passed over it. Refused by name for a
    structured output and a forced call, whose grammar would promise it."""
    message = await _refused(
        client,
        "response_format.json_schema.schema",
        "invalid_response_format",
        response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": BOUNDED}},
        max_tokens=4,
    )
    assert "`maximum` at `properties.qty`" in message
    tool: Any = {"type": "function", "function": {"name": "order", "parameters": BOUNDED}}
    message = await _refused(
        client,
        "tools",
        "invalid_function_parameters",
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "order"}},
        max_tokens=4,
    )
    assert "the parameters of `order` use `maximum` at `properties.qty`" in message


async def test_a_schema_keyword_is_no_reason_to_refuse_calls_nothing_enforces(gw_empty: InProc) -> None:
    """With the model's own (Hermes) calls nothing constrains the arguments: such a tool is served."""
    await gw_empty.add_worker(CallingSim())
    tool: Any = {"type": "function", "function": {"name": "get_weather", "parameters": BOUNDED}}
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw_empty.app), base_url="http://gw")
    async with openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0) as c:
        answer = await c.chat.completions.create(
            model="sim", messages=HI, tools=[tool], max_tokens=4, extra_body={"ignore_eos": True}
        )
    assert [
        call.function.name for call in answer.choices[0].message.tool_calls or () if call.type == "function"
    ]


def test_the_websocket_refuses_the_models_own_calls_for_what_they_are() -> None:
    """The model publishes its tool-call format; the socket's refusal said it did not."""
    body = ChatCompletionRequest.model_validate({"model": "sim", "messages": HI, "tools": TOOLS})
    model = ModelInfo("sim", 2048, 1, 4, 0, features=frozenset({"tool_format:hermes"}))
    assert request_spec(body, request_id="r", default_timeout_s=60, model=model).tool_format == "hermes"
    with pytest.raises(APIError) as refused:
        request_spec(body, request_id="r", default_timeout_s=60, model=model, auto_tools=False)
    assert (refused.value.param, refused.value.code) == ("tool_choice", "unsupported_parameter")
    assert "not served over the WebSocket" in refused.value.message


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


async def test_a_schema_nested_past_what_json_encodes_is_a_400(client: openai.AsyncOpenAI) -> None:
    """300 levels (within the body's 1,024) was a 500: the JSON encoder stops at 255."""
    message = await _refused(
        client,
        "response_format.json_schema.schema",
        "invalid_response_format",
        response_format={"type": "json_schema", "json_schema": {"name": "deep", "schema": _nested(300)}},
        max_tokens=4,
    )
    assert "nests more than 64 levels" in message
    tool: Any = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": _nested(300)}}},
    }
    await _refused(
        client,
        "tools[0].function.parameters",
        "invalid_value",
        tools=[tool],
        tool_choice="none",
        max_tokens=4,
    )
    shallow: Any = {"type": "object", "properties": {"a": _nested(60)}}
    served: Any = {**tool, "function": {**tool["function"], "parameters": shallow}}
    answer = await client.chat.completions.create(  # 60 levels are served
        model="sim", messages=HI, tools=[served], tool_choice="none", max_tokens=4
    )
    assert answer.choices[0].message.content


async def test_a_schema_too_large_to_enforce_is_refused_and_the_gateway_keeps_serving(
    client: openai.AsyncOpenAI, gw: InProc
) -> None:
    """``maxLength: 10**9`` held the gateway's event loop (every tenant's streams stalled) while the
    grammar grew to gigabytes; refused by name before anything is built or queued."""
    huge: Any = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**9}}}
    message = await _refused(
        client,
        "response_format.json_schema.schema",
        "invalid_response_format",
        response_format={"type": "json_schema", "json_schema": {"name": "huge", "schema": huge}},
        max_tokens=4,
    )
    assert "`maxLength` at `properties.a`" in message and "up to 1000" in message, message
    assert await gw.records() == []
    answer = await client.chat.completions.create(model="sim", messages=HI, max_tokens=2)
    assert answer.choices[0].finish_reason == "length"


async def test_tool_choice_auto_needs_a_list_of_tools_as_vllm_asks(client: openai.AsyncOpenAI) -> None:
    """``auto`` asks the model to choose among tools: without any it was accepted and meant nothing.
    An empty list and ``none`` ask for text; the Responses API's default ``auto`` needs none."""
    message = await _refused(client, "tool_choice", "invalid_value", tool_choice="auto", max_tokens=2)
    assert "`tool_choice: auto` needs `tools`" in message
    for kwargs in ({"tool_choice": "auto", "tools": []}, {"tool_choice": "none"}):
        answer = await client.chat.completions.create(model="sim", messages=HI, max_tokens=2, **kwargs)
        assert answer.choices[0].finish_reason == "length"
    response = await client.responses.create(
        model="sim", input="hi", tool_choice="auto", max_output_tokens=16
    )
    # Answered (by its end or at max_output_tokens: the sim's length is seeded by the response's id).
    assert response.status in ("completed", "incomplete") and response.tool_choice == "auto"
