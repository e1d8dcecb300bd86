"""A response's stream events from its chat chunks (protocol.response_output), in OpenAI's order."""

from __future__ import annotations

from typing import Any

from breakwater.protocol.messages import ChatMessage
from breakwater.protocol.response_output import OutputEvents, assistant_message
from breakwater.protocol.responses import Stored


def _chunk(**delta: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def _call(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {
        "index": index,
        "id": f"call_{index}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def test_each_item_is_done_before_the_next_one_starts() -> None:
    """Text, then two parallel calls: every item ends (``output_item.done``) before the next one is
    added, as OpenAI streams them (the calls' items stayed open until the response ended)."""
    out = OutputEvents("resp_1", Stored(), model="m", created=1)
    events = out.start()
    events += out.chunk(_chunk(content="Checking."))
    events += out.chunk(_chunk(tool_calls=[_call(0, "get_weather", '{"city": "Paris"}')]))
    events += out.chunk(_chunk(tool_calls=[_call(1, "get_time", '{"city": "Paris"}')]))
    events += out.finish("tool_calls", {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12})
    kinds = [(e["type"], e.get("output_index")) for e in events]
    assert kinds == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2),
        ("response.completed", None),
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert [(i["type"], i["status"]) for i in final["output"]] == [
        ("message", "completed"),
        ("function_call", "completed"),
        ("function_call", "completed"),
    ]


def test_a_call_streamed_in_pieces_is_one_item() -> None:
    """A forced call's arguments arrive piece by piece under one index: one item, its deltas in order."""
    out = OutputEvents("resp_1", Stored(), model="m", created=1)
    events = out.start()
    events += out.chunk(_chunk(tool_calls=[_call(0, "get_weather", "")]))
    for piece in ('{"city"', ': "Par', 'is"}'):
        events += out.chunk(_chunk(tool_calls=[{"index": 0, "function": {"arguments": piece}}]))
    events += out.finish("stop", None)
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == ['{"city"', ': "Par', 'is"}']
    (call,) = events[-1]["response"]["output"]
    assert (call["name"], call["arguments"], call["status"]) == (
        "get_weather",
        '{"city": "Paris"}',
        "completed",
    )


def test_an_empty_answer_is_an_empty_turn_of_the_next_conversation() -> None:
    """An answer that was its end token alone became a message with neither content nor calls,
    which a chat message refuses: ``previous_response_id`` after it was a 400 the client could not
    mend (the message was the server's own)."""
    empty = assistant_message([{"type": "message", "content": [{"type": "output_text", "text": ""}]}])
    assert ChatMessage.model_validate(empty).content == ""
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    called = assistant_message([call])
    assert ChatMessage.model_validate(called).content is None and called["tool_calls"][0]["id"] == "c1"
