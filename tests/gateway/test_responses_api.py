"""The Responses API (``/v1/responses``) with the official ``openai`` client, in-process with the sim
engine: a response is the chat answer to its input and instructions, streamed as OpenAI's events
(and resumed by ``starting_after``), retrieved later, continued by ``previous_response_id``, run in
the background and cancelled; what it cannot serve is a 400 naming the parameter."""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from openai.types.responses import ResponseUsage

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.protocol.responses import Stored
from tests.helpers import async_wait_for, expected_sim
from tests.inproc import InProc


@pytest.fixture
async def client(gw: InProc) -> AsyncIterator[openai.AsyncOpenAI]:
    async with gw.sdk() as c:
        yield c


def _expected(
    rid: str, messages: list[dict[str, Any]], max_tokens: int | None = None
) -> tuple[str, str, Any]:
    """The sim's answer to ``messages`` for the response ``rid`` (seeded by its id, as unseeded
    requests are)."""
    return expected_sim(messages=messages, seed=zlib.crc32(rid.encode()), max_tokens=max_tokens)


async def test_a_response_is_the_answer_to_its_input_and_instructions(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="sim", input="hi there", instructions="Be brief.")
    assert response.id.startswith("resp_")
    text, reason, usage = _expected(
        response.id, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    )
    assert reason == "stop"
    assert (response.status, response.output_text, response.instructions) == ("completed", text, "Be brief.")
    [item] = response.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    again = await client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    # Every field the SDK's type requires: its lenient parse left `cache_write_tokens` None, not an int.
    ResponseUsage.model_validate(response.usage.model_dump(exclude_unset=True))


async def test_the_response_echoes_its_identifiers_and_tier(client: openai.AsyncOpenAI) -> None:
    """``safety_identifier`` and ``prompt_cache_key`` were accepted and answered null, as OpenAI does not."""
    response = await client.responses.create(
        model="sim", input="hi", safety_identifier="s1", prompt_cache_key="pk", service_tier="auto"
    )
    again = await client.responses.retrieve(response.id)
    for got in (response, again):
        assert (got.safety_identifier, got.prompt_cache_key, got.service_tier) == ("s1", "pk", "default")


async def test_a_finished_response_says_when_it_completed(client: openai.AsyncOpenAI) -> None:
    """``completed_at`` was never set (OpenAI sets it once a response completes): the same when
    created, streamed and retrieved (the request's end on Redis's clock)."""
    response = await client.responses.create(model="sim", input="hi")
    assert response.status == "completed" and response.completed_at is not None
    assert response.created_at <= response.completed_at <= time.time() + 1
    assert (await client.responses.retrieve(response.id)).completed_at == response.completed_at
    async with client.responses.stream(model="sim", input="hi") as stream:
        streamed = await stream.get_final_response()
    assert streamed.completed_at is not None and streamed.created_at <= streamed.completed_at
    assert (await client.responses.retrieve(streamed.id)).completed_at == streamed.completed_at


async def test_max_output_tokens_makes_an_incomplete_response(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="sim", input="hi", max_output_tokens=3)
    text, reason, _ = _expected(response.id, [{"role": "user", "content": "hi"}], 3)
    assert reason == "length"
    assert (response.status, response.output_text) == ("incomplete", text)
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.max_output_tokens == 3
    assert [item.model_dump()["status"] for item in response.output] == ["incomplete"]  # cut short, as OpenAI
    assert (await client.responses.retrieve(response.id)).model_dump() == response.model_dump()


async def test_the_sdks_stream_helper_assembles_the_streamed_response(client: openai.AsyncOpenAI) -> None:
    kinds: list[str] = []
    numbers: list[int] = []
    deltas: list[str] = []
    async with client.responses.stream(
        model="sim", input=[{"role": "user", "content": "stream it"}]
    ) as stream:
        async for event in stream:
            kinds.append(event.type)
            numbers.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    text, _, _ = _expected(final.id, [{"role": "user", "content": "stream it"}])
    assert final.output_text == "".join(deltas) == text
    assert len(deltas) > 3  # token by token
    assert numbers == list(range(len(numbers)))
    opening = ["response.created", "response.in_progress", "response.output_item.added"]
    closing = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[:4] == [*opening, "response.content_part.added"]
    assert kinds[-4:] == [*closing, "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert (await client.responses.retrieve(final.id)).output_text == text


async def test_a_broken_stream_resumes_after_the_last_event_it_got(client: openai.AsyncOpenAI) -> None:
    stream = await client.responses.create(model="sim", input="resume me", stream=True)
    first: list[dict[str, Any]] = []
    async for event in stream:
        first.append(event.model_dump())
        if len(first) == 7:
            break
    await stream.close()  # the client went away mid-answer
    rid = first[0]["response"]["id"]
    resumed = await client.responses.retrieve(rid, stream=True, starting_after=6)
    rest = [event.model_dump() async for event in resumed]
    assert rest[0]["sequence_number"] == 7 and rest[-1]["type"] == "response.completed"
    whole = await client.responses.retrieve(rid, stream=True)  # the whole stream, again
    assert [e.model_dump() async for e in whole] == first + rest
    text, _, _ = _expected(rid, [{"role": "user", "content": "resume me"}])
    assert "".join(e["delta"] for e in first + rest if e["type"] == "response.output_text.delta") == text


async def test_previous_response_id_continues_the_conversation(client: openai.AsyncOpenAI) -> None:
    first = await client.responses.create(model="sim", input="my name is Ann", instructions="Be kind.")
    second = await client.responses.create(
        model="sim", input="what is my name?", previous_response_id=first.id, instructions="Be terse."
    )
    # The earlier turns and their answers, not the earlier instructions (OpenAI's rule).
    conversation = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "my name is Ann"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "what is my name?"},
    ]
    text, _, _ = _expected(second.id, conversation)
    assert (second.output_text, second.previous_response_id) == (text, first.id)


async def test_input_items_list_a_responses_own_input_page_by_page(client: openai.AsyncOpenAI) -> None:
    first = await client.responses.create(model="sim", input="one")
    second = await client.responses.create(
        model="sim",
        previous_response_id=first.id,
        instructions="not an input item",
        input=[
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "input_text", "text": "three"}]},
        ],
    )

    def texts(items: list[Any]) -> list[tuple[str, str]]:
        return [(item.role, item.content[0].text) for item in items]

    newest_first = await client.responses.input_items.list(second.id)  # OpenAI's default order
    assert texts(newest_first.data) == [("user", "three"), ("assistant", "ok"), ("user", "two")]
    assert not newest_first.has_more
    # Two at a time, the SDK following `after` from page to page.
    pages = [item async for item in client.responses.input_items.list(second.id, order="asc", limit=2)]
    assert texts(pages) == [("user", "two"), ("assistant", "ok"), ("user", "three")]
    assert len({item.id for item in pages}) == 3
    assert texts((await client.responses.input_items.list(first.id)).data) == [("user", "one")]
    for query, param in ((dict(limit=0), "limit"), (dict(order="sideways"), "order")):  # as OpenAI names them
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.input_items.list(first.id, **query)
        assert isinstance(refused.value.body, dict) and refused.value.body["param"] == param


async def test_background_responses_run_without_a_client_and_can_be_cancelled(gw_empty: InProc) -> None:
    await gw_empty.add_worker(SimEngine(SimOptions(decode_base_ms=20, decode_per_seq_ms=0)))
    async with gw_empty.sdk() as client:
        queued = await client.responses.create(model="sim", input="in the background", background=True)
        assert (queued.status, queued.background, queued.output) == ("queued", True, [])

        async def done() -> bool:
            return (await client.responses.retrieve(queued.id)).status == "completed"

        await async_wait_for(done, 30, what="the background response completed")
        text, _, _ = _expected(queued.id, [{"role": "user", "content": "in the background"}])
        assert (await client.responses.retrieve(queued.id)).output_text == text

        long = await client.responses.create(
            model="sim", input="a long one", background=True, max_output_tokens=2000
        )
        cancelled = await client.responses.cancel(long.id)
        assert (cancelled.status, cancelled.error) == ("cancelled", None)
        assert (await client.responses.retrieve(long.id)).status == "cancelled"
        again = await client.responses.cancel(long.id)  # idempotent
        assert (again.status, again.output_text) == ("cancelled", cancelled.output_text)

        # As OpenAI: a response created without `background` is not one to cancel, and stays as it is.
        foreground = await client.responses.create(model="sim", input="hi")
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.cancel(foreground.id)
        assert isinstance(info.value.body, dict) and info.value.body["param"] == "response_id"
        assert "background" in str(info.value.body["message"])
        assert (await client.responses.retrieve(foreground.id)).status == "completed"


async def test_an_idempotency_key_replays_the_same_response(client: openai.AsyncOpenAI) -> None:
    key = {"Idempotency-Key": "k-1"}
    first = await client.responses.create(model="sim", input="once", extra_headers=key)
    again = await client.responses.create(model="sim", input="once", extra_headers=key)
    assert (again.id, again.output_text) == (first.id, first.output_text)
    # The response as first made (its created_at was the replay's own clock) and as retrieved.
    retrieved = await client.responses.retrieve(first.id)
    assert again.model_dump() == first.model_dump() == retrieved.model_dump()
    chat = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "once"}], extra_headers=key
    )
    assert chat.id.startswith("chatcmpl-")  # the same key on chat is chat's own
    # Nor is the key a Responses key became inside: "responses:k-1" on chat was a 422 reuse.
    prefixed = {"Idempotency-Key": "responses:k-1"}
    chat = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "twice"}], extra_headers=prefixed
    )
    assert chat.id.startswith("chatcmpl-")


async def test_an_idempotency_key_is_bound_to_how_the_response_was_asked_for(
    client: openai.AsyncOpenAI,
) -> None:
    """The same key with another ``stream`` or ``background`` is another request (422), as on chat:
    it was taken, and answered with the replay's settings (``background: false`` for a background
    response, a stream's events for a whole one's)."""
    key = {"Idempotency-Key": "k-bound"}
    first = await client.responses.create(model="sim", input="once", background=True, extra_headers=key)
    for other in ({"background": False}, {"stream": True}):
        with pytest.raises(openai.UnprocessableEntityError) as info:
            await client.responses.create(model="sim", input="once", extra_headers=key, **other)  # type: ignore[call-overload]
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "idempotency_key_reuse"
    # A background replay answers the response as it stands, not as a new one ("queued", empty).
    await async_wait_for(lambda: _completed(client, first.id), 10)
    done = await client.responses.retrieve(first.id)
    again = await client.responses.create(model="sim", input="once", background=True, extra_headers=key)
    assert (again.id, again.status, again.background) == (first.id, "completed", True)
    assert again.output_text == done.output_text and again.created_at == first.created_at


async def _completed(client: openai.AsyncOpenAI, rid: str) -> bool:
    return (await client.responses.retrieve(rid)).status == "completed"


def test_a_records_response_from_another_version_is_read_or_left() -> None:
    """A record written by an older or newer gateway (a rolling deploy): unknown fields are left out;
    what is not a response's at all is None (404), never a 500."""
    stored = Stored.from_json('{"messages": [], "store": false, "added_later": 1}')
    assert stored is not None and stored.store is False
    assert Stored.from_json("not json") is None
    assert Stored.from_json("[1, 2]") is None


async def test_a_response_not_stored_cannot_be_retrieved_or_continued(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="sim", input="forget me", store=False)
    assert (response.model_extra or {})["store"] is False and response.status == "completed"
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="sim", input="again", previous_response_id=response.id)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "previous_response_id"


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"truncation": "auto"}, "truncation"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"include": ["message.output_text.logprobs"]}, "include"),  # the sim has none: was `logprobs`
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),  # without `stream`
        # An unknown field of an input item or part was ignored (a chat message's is refused).
        ({"input": [{"role": "user", "content": "x", "foo": "bar"}]}, "input[0].foo"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x", "foo": 1}]}]},
            "input[0].content[0].foo",
        ),
        (
            {
                "input": [
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c", "output": "1", "foo": 1},
                ]
            },
            "input[1].foo",
        ),
    ],
)
async def test_what_is_not_served_is_refused_by_name(
    client: openai.AsyncOpenAI, asked: dict[str, Any], param: str
) -> None:
    kwargs: dict[str, Any] = {"model": "sim", "input": "hi", **asked}
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(**kwargs)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body


async def test_logprobs_an_engine_lacks_are_named_as_the_responses_api_asks_for_them(
    client: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="sim", input="hi", include=["message.output_text.logprobs"])
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "include", body
    assert '`include: ["message.output_text.logprobs"]`' in body["message"], body


async def test_a_tool_choice_error_shows_the_responses_tool_shape(client: openai.AsyncOpenAI) -> None:
    """The sim knows no tool-call format: `tool_choice: auto` is refused, and the fix it suggests is
    a Responses tool choice (`{"type": "function", "name": ...}`), not a chat one."""
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="sim", input="hi", tools=[tool])  # type: ignore[list-item]
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "tool_choice", body
    assert '`{"type": "function", "name": ...}`' in body["message"] and '"function": {' not in body["message"]


async def test_another_tenants_or_a_made_up_response_is_not_found(gw: InProc) -> None:
    resp = await gw.http.get("/v1/responses/resp_0123")
    error = orjson.loads(resp.content)["error"]
    assert resp.status_code == 404 and (error["param"], error["code"]) == ("id", "response_not_found")
    assert error["message"] == "Response with id 'resp_0123' not found."  # as OpenAI says it


@pytest.mark.parametrize(
    ("items", "param", "says"),
    [
        # An output of a call that was not made; with instructions before the input, still its item.
        (
            [{"type": "function_call_output", "call_id": "call_9", "output": "21"}],
            "input[0]",
            "a `function_call_output` must answer a `function_call` item before it",  # not chat's words
        ),
        (
            [
                {"role": "user", "content": "weather?"},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_2", "output": "21"},
            ],
            "input[2]",
            "'call_2'",
        ),
        # A call without its output before the conversation goes on: that call's item.
        (
            [
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_2", "output": "21"},
                {"role": "user", "content": "and?"},
            ],
            "input[0]",
            "call_1",
        ),
        (
            [
                {"role": "user", "content": "weather?"},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "21"},
            ],
            "input[2]",
            "call_2",
        ),
    ],
)
async def test_function_call_outputs_answer_the_calls_before_them(
    gw: InProc, client: openai.AsyncOpenAI, items: list[Any], param: str, says: str
) -> None:
    """As OpenAI checks a conversation's calls and outputs, with the input item named."""
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="sim", input=items, instructions="Be brief.")
    body = info.value.body
    assert isinstance(body, dict), body
    assert (body["param"], body["code"]) == (param, "invalid_value"), body
    assert says in str(body["message"]), body
    assert "`tool" not in str(body["message"]), body
    assert await gw.records() == []  # nothing was queued or stored


@pytest.mark.parametrize(
    ("fmt", "param", "says"),
    [
        ({"type": "xml"}, "text.format.type", "`text.format.type` must be"),
        (
            {"type": "json_schema", "name": "o", "schema": {"type": "integer", "maximum": 9}},
            "text.format.schema",
            "`text.format.schema` uses `maximum`",
        ),
        (  # passed over: any JSON object was served
            {"type": "json_schema", "name": "o", "shema": {"type": "object"}},
            "text.format.shema",
            "`text.format.shema`",
        ),
    ],
)
async def test_a_text_format_is_named_as_the_responses_api_names_it(
    client: openai.AsyncOpenAI, fmt: dict[str, Any], param: str, says: str
) -> None:
    """Its format is flat (``text.format.schema``); errors said ``response_format.type`` and
    ``text.format.json_schema.schema``."""
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="sim", input="hi", text={"format": fmt})  # type: ignore[call-overload]
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param and says in str(body["message"]), body
    assert "response_format" not in str(body["message"]) and "json_schema." not in str(body["message"])
