"""What the grammar of SmolLM2's tool calls admits, checked by llama.cpp's own grammar sampler on the
bundled model's vocabulary (loaded without weights): under ``tool_choice: auto`` a text reply or a
call (the model decides, as it would unconstrained), under ``required`` calls only; a text reply can
never open a ``<tool_call>`` the grammar would not check."""

from __future__ import annotations

import ctypes
import enum
import json
import math
from collections.abc import Iterator
from typing import Any

import llama_cpp
import openai
import pytest
from pydantic import BaseModel

from breakwater.engines.models import bundled_gguf
from breakwater.protocol.formats import parse_response_format
from breakwater.protocol.schema_check import MAX_REPEAT
from breakwater.protocol.tools import AutoCalls, ForcedCall, tool_plan

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(bundled_gguf("smollm2-135m-instruct")).encode(), params)
    assert model
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


def _admits(vocab: Any, grammar: str, answer: str) -> bool:
    """Whether ``answer``, token by token, then the end of generation, passes ``grammar``."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    assert sampler, "llama.cpp could not parse the grammar"
    try:
        data = answer.encode()
        tokens = (llama_cpp.llama_token * (len(data) + 8))()
        count = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, len(data) + 8, False, False)
        for token in [*tokens[:count], llama_cpp.llama_vocab_eos(vocab)]:
            cell = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
            candidates = llama_cpp.llama_token_data_array(cell, 1, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if math.isinf(cell[0].logit):
                return False
            llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


def _grammar(choice: str) -> str:
    plan = tool_plan([WEATHER, TIME], choice, fmt="smollm2", grammar=True)
    assert isinstance(plan, AutoCalls)
    fmt = plan.output_format(grammar=True)
    assert fmt is not None
    return fmt.grammar()


@pytest.mark.parametrize(
    "answer",
    [
        "The weather in Paris is sunny, 21 degrees.",
        "Is 3 < 5? Yes: 3 < 5.\nLine two.",
        "Shift it: x << 1, or x <<= 2; <b>bold</b> is fine too.",
        CALL,
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {}}]</tool_call>',
        "<tool_call>[]</tool_call>",
    ],
)
def test_auto_admits_a_text_reply_or_calls(vocab: Any, answer: str) -> None:
    assert _admits(vocab, _grammar("auto"), answer)


@pytest.mark.parametrize(
    "answer",
    [
        "",  # the reply is something
        " <tool_call>",  # a call behind white space, or inside text, would go unchecked
        "Sure: <<tool_call>[]</tool_call>",
        'Sure. <tool_call>[{"name": "get_weather", "arguments": {"city": 1}}]</tool_call>',
        '<tool_call>[{"name": "get_weather", "arguments": {"town": "Paris"}}]</tool_call>',
        '<tool_call>[{"name": "launch", "arguments": {}}]</tool_call>',
        "<tool_call>[]</tool_call> and then text",
    ],
)
def test_auto_refuses_what_is_neither(vocab: Any, answer: str) -> None:
    assert not _admits(vocab, _grammar("auto"), answer)


def test_required_admits_calls_only(vocab: Any) -> None:
    grammar = _grammar("required")
    assert _admits(vocab, grammar, CALL)
    assert not _admits(vocab, grammar, "The weather in Paris is sunny.")
    assert not _admits(vocab, grammar, "<tool_call>[]</tool_call>")  # at least one call


@pytest.mark.parametrize(
    ("answer", "admitted"),
    [('{"city": "Paris"}', True), ('{"city": "Paris"} ', False), ('{"city": "Paris"}\n', False)],
)
def test_a_forced_calls_arguments_end_with_their_object(vocab: Any, answer: str, admitted: bool) -> None:
    """No white space after the object before the end token: a named call's ``arguments`` came back
    as ``'{"city": "[{"} '``, which OpenAI's never are."""
    assert _admits(vocab, _forced().grammar(), answer) is admitted


def _forced() -> Any:
    plan = tool_plan([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    assert isinstance(plan, ForcedCall)
    return plan.output_format()


class _Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


class _Where(BaseModel):
    city: str


class _Paint(BaseModel):
    where: _Where
    color: _Color


@pytest.mark.parametrize(("color", "admitted"), [("red", True), ("blue", True), ("green", False)])
def test_the_models_own_calls_of_tools_with_definitions(vocab: Any, color: str, admitted: bool) -> None:
    """A pydantic tool with a nested model and an enum (its schema's ``$defs``): `auto` was refused,
    its references pointing at a root that no longer held them."""
    plan = tool_plan(
        [openai.pydantic_function_tool(_Paint, name="paint"), WEATHER], "auto", fmt="smollm2", grammar=True
    )
    assert isinstance(plan, AutoCalls)
    fmt = plan.output_format(grammar=True)
    assert fmt is not None
    arguments = f'{{"where": {{"city": "Paris"}}, "color": "{color}"}}'
    call = f'<tool_call>[{{"name": "paint", "arguments": {arguments}}}]</tool_call>'
    assert _admits(vocab, fmt.grammar(), call) is admitted


@pytest.mark.parametrize(
    ("pattern", "answer", "admitted"),
    [
        ("^.{1,12}$", '"He said hi"', True),
        ("^.{1,12}$", '"He said "hi""', False),  # `.` took a raw quote: the JSON ended early
        ("^.{1,12}$", '"back\\\\slash"', False),
        ("^[^,]+$", '"no commas"', True),
        ("^[^,]+$", '"line\nbreak"', False),  # a raw newline in a JSON string
        ("^[^,]+$", '"a, b"', False),
        (r"^\d{3}-\d{4}$", '"555-1234"', True),  # `\d` was copied into the grammar: llama.cpp refused it
        (r"^\d{3}-\d{4}$", '"55a-1234"', False),
        (r"^v\d+\.\d+$", '"v1.22"', True),
        (r"^v\d+\.\d+$", '"v1x22"', False),
        (r"^[\w.-]+$", '"a_b.c-d"', True),
    ],
)
def test_a_patterns_strings_are_json_strings_that_match_it(
    vocab: Any, pattern: str, answer: str, admitted: bool
) -> None:
    fmt = parse_response_format(
        {
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": {"type": "string", "pattern": pattern}},
        }
    )
    assert fmt is not None
    assert _admits(vocab, fmt.grammar(), answer) is admitted


class _Node(BaseModel):
    name: str
    children: list[_Node]


UI: Any = {  # OpenAI's structured-outputs example: a UI tree whose children refer to the root
    "type": "object",
    "properties": {"type": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
    "required": ["type", "children"],
    "additionalProperties": False,
}
LINKED: Any = {  # OpenAI's other example: a definition named with underscores that refers to itself
    "type": "object",
    "properties": {"linked_list": {"$ref": "#/$defs/linked_list_node"}},
    "$defs": {
        "linked_list_node": {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "next": {"anyOf": [{"$ref": "#/$defs/linked_list_node"}, {"type": "null"}]},
            },
            "required": ["value", "next"],
            "additionalProperties": False,
        }
    },
    "required": ["linked_list"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("schema", "answer", "wrong"),
    [
        (
            _Node.model_json_schema(),
            '{"name": "a", "children": [{"name": "b", "children": []}]}',
            '{"name": "a", "children": [{"name": "b", "children": {}}]}',
        ),
        (
            UI,
            '{"type": "div", "children": [{"type": "p", "children": []}]}',
            '{"type": "div", "children": [{"type": "p"}]}',
        ),
        (
            LINKED,
            '{"linked_list": {"value": 1, "next": {"value": 2, "next": null}}}',
            '{"linked_list": {"value": 1, "next": {"value": "2", "next": null}}}',
        ),
    ],
)
def test_recursive_schemas_are_enforced(vocab: Any, schema: Any, answer: str, wrong: str) -> None:
    """Each was refused (a pydantic recursive model's root reference, ``#``) or gave a grammar
    llama.cpp could not parse (a definition's underscores in a rule name)."""
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert fmt is not None
    assert _admits(vocab, fmt.grammar(), answer)
    assert not _admits(vocab, fmt.grammar(), wrong)  # the recursion's members are checked too


def test_a_definition_is_enforced_as_itself_whatever_its_name() -> None:
    """A definition named as a property (``address``) was enforced as the property's inline schema:
    the converter reused the rule of that name."""
    schema = {
        "type": "object",
        "properties": {
            "address": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
            "home": {"$ref": "#/$defs/address"},
        },
        "$defs": {"address": {"type": "object", "properties": {"z": {"type": "integer"}}, "required": ["z"]}},
        "required": ["address", "home"],
    }
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "d", "schema": schema}})
    assert fmt is not None
    home = next(line for line in fmt.grammar().splitlines() if line.startswith("home ::= "))
    assert home == "home ::= def-address"


@pytest.mark.parametrize(
    ("schema", "longest", "one_more"),
    [
        ({"type": "string", "maxLength": MAX_REPEAT}, '"' + "ab" * 500 + '"', '"' + "ab" * 500 + 'c"'),
        (
            {"type": "array", "items": {"type": "integer"}, "maxItems": MAX_REPEAT},
            "[" + ", ".join(["1"] * 1000) + "]",
            "[" + ", ".join(["1"] * 1001) + "]",
        ),
        ({"type": "string", "pattern": "^[a-z]{0,1000}$"}, '"' + "x" * 1000 + '"', '"' + "x" * 1001 + '"'),
    ],
)
def test_the_largest_repetition_accepted_is_one_llama_cpp_parses_and_enforces(
    vocab: Any, schema: dict[str, Any], longest: str, one_more: str
) -> None:
    """Up to MAX_REPEAT (past it llama.cpp refused the converter's grammar; far past it, it crashed)."""
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert fmt is not None
    assert _admits(vocab, fmt.grammar(), longest)
    assert not _admits(vocab, fmt.grammar(), one_more)


def _obj(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


@pytest.mark.parametrize(
    ("schema", "value"),
    [
        (_obj({"e": {"enum": ["a\nb"]}}), {"e": "a\nb"}),  # was a raw newline: no JSON
        (_obj({"e": {"enum": ["a\tb", "c"]}}), {"e": "a\tb"}),
        (_obj({"e": {"enum": ["back\\slash"]}}), {"e": "back\\slash"}),  # was `\s`: no JSON
        (_obj({"e": {"const": "a\\b"}}), {"e": "a\\b"}),  # was `\b`: a backspace, not the const
        (_obj({"a\\b": {"type": "integer"}}), {"a\\b": 1}),  # the key was "a<backspace>"
        (_obj({"e": {"const": "😀"}}), {"e": "😀"}),  # was two halves of a surrogate pair
        (_obj({"😀": {"type": "integer"}}), {"😀": 1}),
        (_obj({'a"b': {"type": "integer"}}), {'a"b': 1}),  # llama.cpp could not parse the grammar
        (_obj({"e": {"enum": ['say "hi"', "é"]}}), {"e": 'say "hi"'}),
        (_obj({"e": {"const": {"k": ["x\ny", 1]}}}), {"e": {"k": ["x\ny", 1]}}),
    ],
)
def test_strings_in_a_schema_are_the_json_text_of_their_values(
    vocab: Any, schema: dict[str, Any], value: dict[str, Any]
) -> None:
    """Property names, enum and const values with what JSON escapes: the answer is their JSON, and
    parses back to them (an exploratory helper found each of these broken)."""
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert fmt is not None
    grammar = fmt.grammar()
    answer = json.dumps(value, ensure_ascii=False)
    assert _admits(vocab, grammar, answer), (answer, grammar)
    assert json.loads(answer) == value
    raw = answer.replace("\\n", "\n").replace("\\t", "\t")  # what the old grammar made the model write
    if raw != answer:
        assert not _admits(vocab, grammar, raw)
