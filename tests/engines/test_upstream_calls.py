"""The ``openai`` engine's tool calls written as Hermes blocks (engines.upstream_chunks), read back by
the gateway's parser (protocol.toolformats); and its usage when the upstream counts."""

from __future__ import annotations

from typing import Any

from breakwater.engines.base import GenerationRequest
from breakwater.engines.streams import Flight
from breakwater.engines.upstream import OpenAIUpstreamEngine
from breakwater.engines.upstream_chunks import ToolCallWriter, take_choice
from breakwater.engines.vllm_tools import template_messages
from breakwater.protocol.toolformats import PASS_THROUGH, ParsedCall, split_answer, tags_of


def _written(choices: list[dict[str, Any]]) -> tuple[str, list[ParsedCall]]:
    calls, parts = ToolCallWriter(), list[str]()
    for choice in choices:
        take_choice(choice, True, parts, None, calls)
    return split_answer("".join(parts), tags=tags_of(PASS_THROUGH))


def _call(index: int | None, name: str | None = None, arguments: Any = None) -> dict[str, Any]:
    fn: dict[str, Any] = {}
    if name is not None:
        fn["name"] = name
    if arguments is not None:
        fn["arguments"] = arguments
    call: dict[str, Any] = {"function": fn}
    if index is not None:
        call["index"] = index
    return {"delta": {"tool_calls": [call]}}


def test_calls_in_pieces_then_a_second_call() -> None:
    text, calls = _written(
        [
            _call(0, "get_weather", ""),
            _call(0, None, '{"city": '),
            _call(0, None, '"Paris"}'),
            _call(1, "get_time", '{"city": "Oslo"}'),
            {"delta": {}, "finish_reason": "tool_calls"},
        ]
    )
    assert text == ""
    assert calls == [ParsedCall("get_weather", '{"city":"Paris"}'), ParsedCall("get_time", '{"city":"Oslo"}')]


def test_a_call_without_arguments_an_object_and_no_index() -> None:
    _, calls = _written(
        [_call(0, "ping"), _call(1, "set", {"on": True}), _call(None, None, None), {"finish_reason": "stop"}]
    )
    assert calls == [ParsedCall("ping", "{}"), ParsedCall("set", '{"on":true}')]


def test_text_after_a_call_is_text() -> None:
    text, calls = _written(
        [_call(0, "f", "{}"), {"delta": {"content": "done."}}, {"delta": {}, "finish_reason": "stop"}]
    )
    assert (text, calls) == ("done.", [ParsedCall("f", "{}")])


def test_the_upstreams_text_is_never_taken_for_a_call() -> None:
    """Content with a Hermes block in it (a document the model echoed) stays text: it became a call
    the upstream had not made; a private-use U+E000 of its own is no tag's mark either."""
    block = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    text, calls = _written(
        [
            {"delta": {"content": f"see {block}"}},
            {"delta": {"content": " \ue000" + block}},
            {"finish_reason": "stop"},
        ]
    )
    assert (text, calls) == (f"see {block} \ufffd{block}", [])


def test_arguments_holding_the_closing_tag_stay_one_call() -> None:
    """Its block ended at the `</tool_call>` inside the arguments: the call was lost, its markup text."""
    args = '{"city": "a</tool_call>b\ue000"}'
    text, calls = _written([_call(0, "get_weather", args), {"delta": {}, "finish_reason": "tool_calls"}])
    assert (text, calls) == ("", [ParsedCall("get_weather", '{"city":"a</tool_call>b\ue000"}')])


def test_usage_from_the_upstream_when_it_counts_else_the_chunks() -> None:
    flight = Flight(GenerationRequest("r"), tokens=7)
    counted = OpenAIUpstreamEngine._final(flight, 0, "stop", {"prompt_tokens": 3, "completion_tokens": 5})
    assert counted.usage == {"prompt_tokens": 3, "completion_tokens": 5}
    flight = Flight(GenerationRequest("r"), tokens=7)
    uncounted = OpenAIUpstreamEngine._final(flight, 0, "stop", {"prompt_tokens": 3})
    assert uncounted.usage == {"prompt_tokens": 3, "completion_tokens": 7}


def test_a_developer_message_reaches_a_chat_template_as_system() -> None:
    """vLLM's tool-parser path renders the record's messages with the model's template, which
    knows ``system``, not OpenAI's newer ``developer``."""
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert [m["role"] for m in template_messages(messages)] == ["system", "user"]


def test_a_marked_block_that_is_no_call_is_text_without_the_marks() -> None:
    """A block that is not a call is text, shown with the plain tags (the private-use marks reached
    the client's content); one cut short is never text (as for any format)."""
    open_, close = tags_of(PASS_THROUGH)
    text, calls = split_answer(f'{open_}not json{close} and {open_}{{"name": "f", "argu', tags=(open_, close))
    assert (text, calls) == ("<tool_call>not json</tool_call> and ", [])
