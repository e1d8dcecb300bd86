"""The tool-call parser and prompts of ``tool_choice: auto`` (protocol.toolformats): the same split
however the answer is cut into pieces; what is not a call stays text; the formats' prompts."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from breakwater.protocol.formats import FormatError, OutputFormat
from breakwater.protocol.toolformats import (
    CallParser,
    ParsedCall,
    Piece,
    parse_block,
    rendered_calls,
    split_answer,
    system_prompt,
    tool_format_of,
)
from breakwater.protocol.tools import AutoCalls, ForcedCall, tool_plan

HERMES = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>'
)
SMOLLM2 = (
    '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {}}]</tool_call>'
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent text pieces joined (how a stream is cut changes only where text splits)."""
    out: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        elif piece:
            out.append(piece)
    return out


def _fed(text: str, cuts: list[int]) -> list[Piece]:
    parser = CallParser()
    pieces: list[Piece] = []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        pieces += parser.feed(text[a:b])
    return _merged(pieces + parser.finish())


def test_hermes_answer_is_text_then_calls() -> None:
    text, calls = split_answer(HERMES)
    assert text == "Let me check.\n\n"
    assert calls == [
        ParsedCall("get_weather", '{"city":"Paris"}'),
        ParsedCall("get_time", '{"city":"Oslo"}'),  # arguments written as a JSON string
    ]


def test_smollm2_answer_is_a_list_of_calls_and_an_empty_list_is_none() -> None:
    assert split_answer(SMOLLM2) == (
        "",
        [ParsedCall("get_weather", '{"city":"Paris"}'), ParsedCall("get_time", "{}")],
    )
    assert split_answer("<tool_call>[]</tool_call>") == ("", [])


@pytest.mark.parametrize("answer", [HERMES, SMOLLM2, "plain <b>text</b> < tool_call", "a <tool_call>{broken"])
def test_every_way_of_cutting_the_stream_gives_the_same_split(answer: str) -> None:
    whole = _fed(answer, [])
    for cut in range(1, len(answer)):
        assert _fed(answer, [cut]) == whole, cut
    assert _fed(answer, list(range(1, len(answer)))) == whole  # one character at a time


def test_text_that_may_open_a_tag_is_held_back_until_known() -> None:
    parser = CallParser()
    assert parser.feed("Sure <tool") == ["Sure "]
    assert parser.feed("box>") == ["<toolbox>"]
    assert parser.feed("<tool_call>{") == []
    assert parser.finish() == []  # never closed, no call finished: neither calls nor markup
    prose = CallParser()  # a tag named in prose, never closed, and no JSON after it: text, as before
    assert [*prose.feed("Use <tool_call> tags"), *prose.finish()] == ["Use ", "<tool_call> tags"]
    deep = CallParser()  # nested past the parser: no call, no crash
    assert [*deep.feed("<tool_call>[" + "[" * 100_000), *deep.finish()] == []


def test_an_answer_cut_inside_its_calls_gives_the_calls_it_finished() -> None:
    """``max_tokens`` reached inside a ``<tool_call>`` block: its whole calls are the answer's calls,
    the one cut short is dropped, and the markup never reaches the content."""
    first = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
    cut = "<tool_call>[" + first + ', {"name": "get_time", "argu'
    call = ParsedCall("get_weather", '{"city":"Paris","unit":"c"}')
    assert split_answer("Checking. " + cut) == ("Checking. ", [call])
    assert split_answer(cut + 'ments": {}}, {"name": "x"', single=True) == ("", [call])
    assert split_answer('<tool_call>[{"name": "get_weather", "arguments": {"ci') == ("", [])
    assert split_answer("<tool_call>" + first) == ("", [call])  # one object, never closed
    for at in range(1, len(cut)):  # streamed in two pieces: the same
        parser = CallParser()
        pieces = [*parser.feed(cut[:at]), *parser.feed(cut[at:]), *parser.finish()]
        assert pieces == [call], at


@pytest.mark.parametrize(
    "block",
    [
        '{"name": 3}',
        "[1, 2]",
        '{"arguments": {}}',
        '{"name": "f", "arguments": [1]}',
        "not json",
        '{"name": "f", "arguments": "{"}',
    ],
)
def test_a_block_that_is_not_calls_stays_text(block: str) -> None:
    assert parse_block(block) is None
    assert split_answer(f"x<tool_call>{block}</tool_call>y") == (f"x<tool_call>{block}</tool_call>y", [])


def test_prompts_show_the_tools_and_history_in_the_models_format() -> None:
    tools = [WEATHER, TIME]
    smol = system_prompt("smollm2", tools, "Be brief.")
    assert f"<tools>{orjson.dumps(tools).decode()}</tools>" in smol and smol.endswith("\nBe brief.")
    hermes = system_prompt("hermes", tools, "Be brief.")
    assert hermes.startswith("Be brief.\n\n# Tools") and orjson.dumps(WEATHER).decode() in hermes
    call = [("get_weather", {"city": "Paris"})]
    assert split_answer(rendered_calls("smollm2", call))[1] == [ParsedCall("get_weather", '{"city":"Paris"}')]
    assert split_answer(rendered_calls("hermes", call))[1] == [ParsedCall("get_weather", '{"city":"Paris"}')]


def test_plans_and_the_grammar_of_smollm2_calls() -> None:
    assert isinstance(tool_plan([WEATHER], "required", fmt="smollm2", grammar=True), ForcedCall)
    plan = tool_plan([WEATHER, TIME], "required", parallel=False, fmt="smollm2", grammar=True)
    assert isinstance(plan, AutoCalls) and plan.required
    fmt = plan.output_format(grammar=True)
    assert fmt is not None and fmt.needs_grammar and OutputFormat.from_json(fmt.to_json()) == fmt
    schema = orjson.loads(fmt.schema)
    assert (schema["minItems"], schema["maxItems"]) == (1, 1)
    assert fmt.grammar().startswith('root ::= "<tool_call>" json-root "</tool_call>"\n')
    assert plan.output_format(grammar=False) is None
    auto = tool_plan([WEATHER, TIME], "auto", fmt="smollm2", grammar=True)
    assert isinstance(auto, AutoCalls)
    free = auto.output_format(grammar=True)  # a call, or a text reply instead (the model decides)
    assert free is not None and free.text_answer and OutputFormat.from_json(free.to_json()) == free
    assert free.grammar().startswith('root ::= "<tool_call>" json-root "</tool_call>" | ')
    assert not fmt.text_answer and "text_answer" not in fmt.to_json()
    hermes = tool_plan([WEATHER, TIME], None, fmt="hermes")
    assert isinstance(hermes, AutoCalls) and hermes.output_format(grammar=True) is None  # free text


PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize(
    ("tools", "param", "code"),
    [
        # `paramters` was passed over: the forced call was held to an empty object.
        (
            [{"type": "function", "function": {"name": "f", "paramters": PARAMS}}],
            "[0].function.paramters",
            "unknown",
        ),
        ([{"type": "function", "function": {"name": "f"}, "foo": 1}], "[0].foo", "unknown"),
        ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "[0].function.strict", ""),
        # The second of two tools of one name silently replaced the first.
        (
            [TIME, WEATHER, {"type": "function", "function": {"name": "get_time", "parameters": PARAMS}}],
            "[2].function.name",
            "",
        ),
    ],
)
def test_a_tool_field_it_does_not_have_or_a_name_twice_is_refused_by_name(
    tools: list[Any], param: str, code: str
) -> None:
    with pytest.raises(FormatError) as err:
        tool_plan(tools, "required", fmt="smollm2", grammar=True)
    assert err.value.param == f"tools{param}"
    assert err.value.code == ("unknown_parameter" if code else "")


def test_the_format_is_the_workers_shared_one() -> None:
    assert tool_format_of(frozenset({"logprobs", "tool_format:smollm2"})) == "smollm2"
    assert tool_format_of(frozenset({"tool_format:smollm2", "tool_format:hermes"})) == ""
    assert tool_format_of(frozenset()) == ""


def test_one_call_only_keeps_the_first_real_call() -> None:
    """``parallel_tool_calls: false``: calls after the first are dropped; an empty block (SmolLM2's
    "no call") is no call and does not use the one up."""
    first = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    second = '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    assert split_answer(first + second, True)[1] == [ParsedCall("f", '{"a":1}')]
    assert split_answer("<tool_call>[]</tool_call>" + second, True)[1] == [ParsedCall("g", "{}")]
    assert split_answer(SMOLLM2, True)[1] == [ParsedCall("get_weather", '{"city":"Paris"}')]
    assert len(split_answer(first + second)[1]) == 2


def test_a_forced_call_asks_an_upstream_for_strict_arguments() -> None:
    fmt = ForcedCall("f", "", {"type": "object", "properties": {"a": {"type": "integer"}}}).output_format()
    assert fmt.openai()["json_schema"]["strict"] is True
