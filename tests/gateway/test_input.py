"""Bad input gets a clear 4xx in OpenAI's error shape, writes nothing to Redis, and the gateway
keeps serving: non-standard JSON, oversized bodies, unbounded fields, unsupported parameters."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from fastapi import HTTPException

from breakwater.gateway.body import StrictJSONRequest
from tests.helpers import expected_sim
from tests.inproc import InProc

CHAT = "/v1/chat/completions"


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def _assert_error(resp: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


async def _still_serves(gw: InProc) -> None:
    resp = await gw.http.post(CHAT, json=_chat(seed=1))
    assert resp.status_code == 200, resp.text
    text, _, _ = expected_sim(messages=[{"role": "user", "content": "hi"}], seed=1, max_tokens=4)
    assert resp.json()["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize(
    "raw",
    [
        b'"timeout": Infinity',
        b'"timeout": -Infinity',
        b'"timeout": NaN',
        b'"temperature": NaN',
        b'"timeout": 1e400',
        b'"max_tokens": 1e400',
    ],
)
async def test_non_standard_json_numbers_are_400(gw: InProc, raw: bytes) -> None:
    body = b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}], ' + raw + b"}"
    resp = await gw.http.post(CHAT, content=body, headers={"content-type": "application/json"})
    _assert_error(resp, 400, "invalid_json")
    assert await gw.records() == []
    await _still_serves(gw)


@pytest.mark.parametrize("content", [b'"\\ud800"', b'"a\\udc00b"', b'"\xff\xfe"'])
async def test_lone_surrogates_and_invalid_utf8_are_400(gw: InProc, content: bytes) -> None:
    body = b'{"model": "sim", "max_tokens": 4, "messages": [{"role": "user", "content": ' + content + b"}]}"
    resp = await gw.http.post(CHAT, content=body, headers={"content-type": "application/json"})
    _assert_error(resp, 400, "invalid_json")
    assert await gw.records() == []
    await _still_serves(gw)


@pytest.mark.parametrize("timeout", [1e16, 86_400.5, 0])
async def test_timeout_out_of_range_is_400_and_queues_nothing(gw: InProc, timeout: float) -> None:
    resp = await gw.http.post(CHAT, json=_chat(timeout=timeout))
    _assert_error(resp, 400, "invalid_value", "timeout")
    assert await gw.records() == []


async def test_oversized_body_is_413_before_it_is_read(gw: InProc) -> None:
    big = orjson.dumps(_chat(messages=[{"role": "user", "content": "x" * (50 << 20)}]))
    resp = await gw.http.post(CHAT, content=big, headers={"content-type": "application/json"})
    _assert_error(resp, 413, "request_too_large")
    assert await gw.records() == []

    async def chunks() -> Any:  # no Content-Length: counted while read
        for _ in range(8):
            yield b" " * (1 << 20)

    resp = await gw.http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    _assert_error(resp, 413, "request_too_large")
    await _still_serves(gw)


async def test_too_many_messages_and_long_stop_strings_are_400(gw: InProc) -> None:
    many = [{"role": "user", "content": "a"}] * 4097
    _assert_error(await gw.http.post(CHAT, json=_chat(messages=many)), 400, "invalid_value", "messages")
    _assert_error(await gw.http.post(CHAT, json=_chat(stop=["x" * 100_000])), 400, "invalid_value", "stop")
    _assert_error(await gw.http.post(CHAT, json=_chat(seed=1 << 64)), 400, "invalid_value", "seed")
    assert await gw.records() == []


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, _chat()),
        ("/v1/completions", {"model": "sim", "prompt": "hi", "max_tokens": 2}),
        ("/v1/embeddings", {"model": "sim", "input": "hi"}),
        ("/v1/responses", {"model": "sim", "input": "hi", "max_output_tokens": 16}),
    ],
)
async def test_a_body_without_a_json_content_type_is_415_and_runs_nothing(
    gw: InProc, path: str, body: dict[str, Any], content_type: str | None
) -> None:
    """The POSTs a page of any site may send without a CORS preflight (no Content-Type: a Blob
    body; text/plain; a form) never run a request, whatever the body holds."""
    headers = {"content-type": content_type} if content_type else {}
    resp = await gw.http.post(path, content=orjson.dumps(body), headers=headers)
    _assert_error(resp, 415, "unsupported_media_type", "Content-Type")
    assert await gw.records() == []
    typed = {"content-type": "application/json; charset=utf-8"}
    assert (await gw.http.post(path, content=orjson.dumps(body), headers=typed)).status_code == 200


async def test_a_batch_without_a_json_content_type_is_415(gw: InProc) -> None:
    body = orjson.dumps({"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h"})
    _assert_error(await gw.http.post("/v1/batches", content=body), 415, "unsupported_media_type")
    typed = await gw.http.post("/v1/batches", content=body, headers={"content-type": "application/json"})
    assert typed.status_code == 404  # read as JSON: its input file does not exist


async def test_a_body_read_as_json_without_a_json_content_type_is_refused() -> None:
    """What FastAPI before 0.132 does with a body without a Content-Type (it reads it as JSON)
    reaches ``StrictJSONRequest.json``, which refuses it as later FastAPI does."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"model": "sim"}', "more_body": False}

    for headers in ([], [(b"content-type", b"text/plain")]):
        request = StrictJSONRequest({"type": "http", "method": "POST", "headers": headers}, receive)
        with pytest.raises(HTTPException) as refused:
            await request.json()
        assert refused.value.status_code == 415
    typed = [(b"content-type", b"application/vnd.api+json")]
    assert await StrictJSONRequest({"type": "http", "method": "POST", "headers": typed}, receive).json() == {
        "model": "sim"
    }


async def test_content_parts_other_than_text_are_400_naming_the_message(gw: InProc) -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    text = {"type": "text", "text": "look"}
    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": [text, image]}]
    resp = await gw.http.post(CHAT, json=_chat(messages=messages))
    _assert_error(resp, 400, "invalid_value", "messages.1.content")
    assert "part 1 is of type `image_url`" in resp.json()["error"]["message"]
    no_text = [{"role": "user", "content": [{"type": "text"}]}]
    _assert_error(
        await gw.http.post(CHAT, json=_chat(messages=no_text)), 400, "invalid_value", "messages.0.content"
    )
    assert await gw.records() == []
    joined = [{"role": "user", "content": [text, {"type": "text", "text": " twice"}]}]
    assert (await gw.http.post(CHAT, json=_chat(messages=joined))).status_code == 200


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("response_format", {"type": "json_object"}),  # the sim engine cannot constrain output
        ("logprobs", True),  # the sim engine has no distribution to report
        ("presence_penalty", 0.5),
        ("logit_bias", {"50256": -100}),
        ("not_a_parameter", 1),
        ("web_search_options", {}),  # {} asks OpenAI for a search with its defaults
        ("store", True),  # no completion is stored to be retrieved later
        ("service_tier", "priority"),
    ],
)
async def test_unsupported_parameters_are_refused_by_name(gw: InProc, param: str, value: Any) -> None:
    resp = await gw.http.post(CHAT, json=_chat(**{param: value}))
    _assert_error(resp, 400, "unsupported_parameter", param)
    assert param in resp.json()["error"]["message"]
    assert await gw.records() == []


async def test_tool_choices_not_served_are_refused_by_name(gw: InProc) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    named = {"type": "function", "function": {"name": "f"}}
    _assert_error(
        await gw.http.post(CHAT, json=_chat(tools=tools)), 400, "unsupported_parameter", "tool_choice"
    )
    resp = await gw.http.post(CHAT, json=_chat(tool_choice="required"))  # no tools to call
    _assert_error(resp, 400, "invalid_value", "tool_choice")
    resp = await gw.http.post(CHAT, json=_chat(tools=tools, tool_choice=named))  # sim cannot constrain
    _assert_error(resp, 400, "unsupported_parameter", "tool_choice")
    assert await gw.records() == []


async def test_top_logprobs_needs_logprobs(gw: InProc) -> None:
    _assert_error(await gw.http.post(CHAT, json=_chat(top_logprobs=2)), 400, "invalid_value", "top_logprobs")
    resp = await gw.http.post(CHAT, json=_chat(logprobs=True, top_logprobs=21))
    _assert_error(resp, 400, "invalid_value", "top_logprobs")
    resp = await gw.http.post("/v1/completions", json={"model": "sim", "prompt": "p", "logprobs": 2})
    _assert_error(resp, 400, "unsupported_parameter", "logprobs")  # the sim engine has none
    assert await gw.records() == []


async def test_default_values_of_unsupported_parameters_are_accepted(gw: InProc) -> None:
    defaults = {
        "logprobs": False,
        "presence_penalty": 0.0,
        "frequency_penalty": 0,
        "tools": [],
        "store": False,
        "service_tier": "auto",
    }
    resp = await gw.http.post(CHAT, json=_chat(seed=1, response_format={"type": "text"}, **defaults))
    assert resp.status_code == 200, resp.text


async def test_last_event_id_beyond_64_bits_is_400(gw: InProc) -> None:
    resp = await gw.http.post(CHAT, json=_chat(seed=3))
    rid = resp.json()["id"]
    for bad in ("99999999999999999999999", "18446744073709551616", "-1", "x"):
        got = await gw.http.get(f"/v1/requests/{rid}/events", headers={"Last-Event-ID": bad})
        assert got.status_code == 400, (bad, got.text)
        error = got.json()["error"]
        assert (error["param"], error["code"]) == ("Last-Event-ID", "invalid_value"), error


async def test_prompt_bound_when_no_worker_reported_a_context_length(redis_server: Any, prefix: str) -> None:
    """A declared (scale-to-zero) model has no context length yet: the gateway's own bound applies."""
    from tests.inproc import inproc_gateway

    async with inproc_gateway(redis_server.url, prefix, models="cold", max_context_tokens=1000) as gw:
        body = {"model": "cold", "messages": [{"role": "user", "content": "word " * 10_000}]}
        resp = await gw.http.post(CHAT, json=body)
        _assert_error(resp, 400, "context_length_exceeded", "messages")
        assert await gw.records() == []


async def test_usage_up_to_the_calendars_last_day_is_answered(gw: InProc) -> None:
    """The last day a date can be was a 500 (the day after it overflowed); a date that is none is a 400."""
    for params in ({"start_date": "9999-12-31"}, {"start_date": "9999-12-01", "end_date": "9999-12-31"}):
        resp = await gw.http.get("/v1/usage", params=params)
        assert resp.status_code == 200 and resp.json()["data"] == [], resp.text
    bad = await gw.http.get("/v1/usage", params={"start_date": "2026-02-30"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "start_date"
    # At most 366 days in all, as the docs say (367 were taken): 2024 is a leap year.
    year = await gw.http.get("/v1/usage", params={"start_date": "2024-01-01", "end_date": "2024-12-31"})
    assert year.status_code == 200, year.text
    longer = await gw.http.get("/v1/usage", params={"start_date": "2024-01-01", "end_date": "2025-01-01"})
    assert longer.status_code == 400 and longer.json()["error"]["param"] == "end_date", longer.text


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("max_tokens", "5"),
        ("max_tokens", True),
        ("max_tokens", 2.5),
        ("n", "2"),
        ("stream", "true"),
        ("stream", 1),
        ("temperature", True),
        ("temperature", "0.5"),
        ("ignore_eos", "yes"),
        ("seed", "7"),
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_k", "5"),
    ],
)
async def test_a_value_of_the_wrong_type_is_400_naming_it(gw: InProc, param: str, value: Any) -> None:
    """Typed as OpenAI types them: a string or a boolean is no number, a number no boolean (they were
    read as one: "5" as 5, true as 1, "true" as a stream)."""
    _assert_error(await gw.http.post(CHAT, json=_chat(**{param: value})), 400, "invalid_value", param)
    assert await gw.records() == []


async def test_null_and_whole_numbers_are_what_they_say(gw: InProc) -> None:
    """``null`` is the default for any field (the SDK's "not given"); JSON has numbers, not integers:
    3.0 tokens are 3; vLLM's top_k of -1 is every token."""
    for extra in ({"lane": None, "ignore_eos": None, "top_k": None}, {"top_k": -1}, {"top_k": 0}):
        assert (await gw.http.post(CHAT, json=_chat(**extra))).status_code == 200, extra
    whole = await gw.http.post(CHAT, json=_chat(max_tokens=3.0, ignore_eos=True))
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 3
    stream_usage = _chat(stream=True, stream_options={"include_usage": "yes"})
    _assert_error(
        await gw.http.post(CHAT, json=stream_usage), 400, "invalid_value", "stream_options.include_usage"
    )


async def test_embeddings_take_null_as_the_default_and_refuse_a_count_of_the_wrong_type(gw: InProc) -> None:
    body = {"model": "sim", "input": "x", "encoding_format": None, "lane": None}
    resp = await gw.http.post("/v1/embeddings", json=body)
    assert resp.status_code == 200 and isinstance(resp.json()["data"][0]["embedding"], list), resp.text
    for dimensions in ("8", True):
        resp = await gw.http.post("/v1/embeddings", json={**body, "dimensions": dimensions})
        _assert_error(resp, 400, "invalid_value", "dimensions")


async def test_a_prompt_whose_max_tokens_overrun_the_context_is_400_not_cut_short(gw: InProc) -> None:
    """4,087 prompt tokens and 10 to generate in a 4,096-token context: a 400 (it answered 9 tokens,
    "length"), as OpenAI and vLLM answer; streamed, the stream's one event is that error."""
    words = "w " * 4085
    resp = await gw.http.post(CHAT, json=_chat(messages=[{"role": "user", "content": words}], max_tokens=10))
    _assert_error(resp, 400, "context_length_exceeded", "max_tokens")  # the engine's, naming it (was null)
    assert "max_tokens asks for 10" in resp.json()["error"]["message"]
    body = {"model": "sim", "prompt": "w " * 4090, "max_tokens": 10, "stream": True}
    streamed = await gw.http.post("/v1/completions", json=body)
    assert (
        '"code":"context_length_exceeded"' in streamed.text.replace(" ", "") and "[DONE]" not in streamed.text
    )
    assert '"param":"max_tokens"' in streamed.text.replace(" ", "")
    answer = {"model": "sim", "input": "w " * 4087, "max_output_tokens": 10}  # the Responses API's name
    _assert_error(
        await gw.http.post("/v1/responses", json=answer), 400, "context_length_exceeded", "max_output_tokens"
    )
    alone = await gw.http.post(CHAT, json=_chat(messages=[{"role": "user", "content": "w " * 4100}]))
    _assert_error(alone, 400, "context_length_exceeded", "messages")  # the prompt alone does not fit
    long = {"model": "sim", "prompt": "word " * 30_000, "max_tokens": 4}  # refused by the gateway's bound
    _assert_error(await gw.http.post("/v1/completions", json=long), 400, "context_length_exceeded", "prompt")
    # A short prompt and an answer longer than the context: max_tokens is what to shorten.
    huge = await gw.http.post(CHAT, json=_chat(max_tokens=10**7))
    _assert_error(huge, 400, "context_length_exceeded", "max_tokens")
    assert "plus `max_tokens` (10000000)" in huge.json()["error"]["message"]
    # The Responses API says its own name, in the message too ("plus max_tokens" was not renamed).
    answer = {"model": "sim", "input": "hi", "max_output_tokens": 10**7}
    huge = await gw.http.post("/v1/responses", json=answer)
    _assert_error(huge, 400, "context_length_exceeded", "max_output_tokens")
    message = huge.json()["error"]["message"]
    assert "`max_output_tokens` (10000000)" in message and "max_tokens" not in message, message
    long_input = {"model": "sim", "input": "word " * 30_000, "max_output_tokens": 16}
    huge = await gw.http.post("/v1/responses", json=long_input)  # the input alone: param `input`
    _assert_error(huge, 400, "context_length_exceeded", "input")
    message = huge.json()["error"]["message"]
    assert "`max_output_tokens` (16)" in message and "max_tokens" not in message, message


async def test_nesting_deeper_than_the_parser_takes_is_400_saying_so(gw: InProc) -> None:
    deep = b'{"model": "sim", "messages": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    resp = await gw.http.post(CHAT, content=deep, headers={"content-type": "application/json"})
    _assert_error(resp, 400, "invalid_json")
    assert "1024 levels of nesting" in resp.json()["error"]["message"]


async def test_an_embedding_input_over_the_bound_is_400_naming_input(gw: InProc) -> None:
    body = {"model": "sim", "input": ["short", "word " * 30_000]}
    resp = await gw.http.post("/v1/embeddings", json=body)
    _assert_error(resp, 400, "context_length_exceeded", "input")
    assert "max_tokens" not in resp.json()["error"]["message"]  # an embedding generates none


async def test_a_response_takes_null_as_the_default_lane(gw: InProc) -> None:
    body = {"model": "sim", "input": "hi", "lane": None, "max_output_tokens": 4}
    resp = await gw.http.post("/v1/responses", json=body)
    assert resp.status_code == 200 and resp.json()["object"] == "response", resp.text
