"""Which JSON Schema keywords a structured output's grammar enforces (protocol.schema_check): what
pydantic writes for the usual models passes; a keyword the grammar would pass over is named, with
its place, and the request refused, never answered without it."""

from __future__ import annotations

import datetime
import uuid
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from breakwater.protocol.formats import FormatError, parse_response_format
from breakwater.protocol.schema_check import json_safe_classes, unenforced


class Address(BaseModel):
    street: str = Field(max_length=40, description="street and number")
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Order(BaseModel):
    id: uuid.UUID
    day: datetime.date
    size: Literal["S", "M", "L"]
    items: list[str] = Field(min_length=1, max_length=5)
    note: str | None = None
    ship_to: Address
    pair: tuple[int, str]


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    counts: dict[str, int]


def test_what_pydantic_writes_for_the_usual_models_is_enforced() -> None:
    schema = Order.model_json_schema()
    assert unenforced(schema) is None
    assert unenforced(Open.model_json_schema()) is None  # every listed property required
    assert unenforced({"type": "string", "enum": ["a", "b"]}) is None
    assert (
        unenforced({"type": "integer", "anyOf": [{"type": "integer"}, {"type": "integer", "enum": [1]}]})
        is None
    )
    assert parse_response_format({"type": "json_schema", "json_schema": {"name": "o", "schema": schema}})


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        (
            {"type": "object", "properties": {"qty": {"type": "integer", "minimum": 1}}},
            "`minimum` at `properties.qty`",
        ),
        ({"type": "number", "multipleOf": 5}, "`multipleOf`"),
        ({"type": "string", "format": "email"}, "`format`"),
        ({"type": "string", "pattern": "^a+$", "minLength": 3}, "`minLength`"),  # the pattern wins
        ({"type": "array", "minItems": 1}, "`minItems`"),  # no items: any array
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "`uniqueItems`"),
        ({"type": "array", "prefixItems": [{"type": "string"}], "minItems": 2}, "`minItems`"),
        ({"type": ["string", "null"], "maxLength": 3}, "`maxLength`"),
        ({"type": "object", "required": ["a"]}, "`required`"),  # no properties: any object
        ({"type": "object", "properties": {}, "minProperties": 1}, "`minProperties`"),
        ({"not": {"type": "string"}}, "`not`"),
        (
            {"$defs": {"S": {"type": "string"}}, "properties": {"s": {"$ref": "#/$defs/S", "maxLength": 2}}},
            "`maxLength` at `properties.s`",
        ),
        (
            {"allOf": [{"enum": ["a", "b"]}]},
            "`allOf` with a member that is not an object's properties at `allOf.0`",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "array", "items": {"type": "integer", "maximum": 9}}},
            },
            "`maximum` at `properties.a.items`",
        ),
        (
            {"$defs": {"N": {"type": "integer", "exclusiveMinimum": 0}}, "$ref": "#/$defs/N"},
            "`exclusiveMinimum` at `$defs.N`",
        ),
        (
            {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name"],
                "additionalProperties": True,
            },
            "`additionalProperties`",  # with an optional property: run together without a comma
        ),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"]}, "`required`"),
        ({"type": "string", "anyOf": [{"type": "integer"}, {"type": "string"}]}, "`type`"),
        ({"type": "string", "enum": [1, 2, "x"]}, "`type`"),
        ({"oneOf": [{"type": "string"}], "anyOf": [{"type": "integer"}]}, "`anyOf`"),
        (
            {"type": "object", "properties": {"code": {"type": "string", "pattern": "[A-Z]{3}"}}},
            "`pattern` at `properties.code` (not anchored: it must start with ^ and end with $)",
        ),
        ({"type": "string", "pattern": "^\\bword$"}, "`pattern` (its `\\b` (enforced:"),
        ({"type": "string", "pattern": '^say "hi"$'}, '`pattern` (it matches `"`, `\\` or a control'),
    ],
)
def test_a_keyword_the_grammar_passes_over_is_named_and_refused(schema: dict[str, Any], named: str) -> None:
    assert (unenforced(schema) or "").startswith(named)
    with pytest.raises(FormatError) as refused:
        parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert refused.value.param == "response_format.json_schema.schema"
    assert f"uses {named}" in str(refused.value) and "which this server cannot enforce" in str(refused.value)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": ["a"]},
        {"$defs": [1]},
        {"anyOf": 5},
        {"type": "array", "prefixItems": [{}], "minItems": "1"},
    ],
)
def test_a_malformed_schema_is_refused_not_a_crash(schema: dict[str, Any]) -> None:
    """Each raised inside the check (a 500) where the converter's own failure had been a 400."""
    assert (unenforced(schema) or "").startswith("a part that is no JSON Schema")
    with pytest.raises(FormatError):
        parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


@pytest.mark.parametrize("pattern", ["^[ -~]+$", "^[A-z]+$", "^a\nb$"])
def test_a_pattern_whose_range_takes_a_quote_or_backslash_is_refused(pattern: str) -> None:
    assert "a JSON string must escape" in (unenforced({"type": "string", "pattern": pattern}) or "")


def test_only_a_grammars_classes_are_made_json_safe_never_its_literals() -> None:
    """An enum's value ``"[^a]"`` was rewritten into a broken grammar."""
    grammar = 'x ::= "\\"[^a]\\"" | [^b] | "q"'
    assert json_safe_classes(grammar) == 'x ::= "\\"[^a]\\"" | [^"\\\\\\x7F\\x00-\\x1Fb] | "q"'


def _refused(schema: dict[str, Any]) -> str:
    with pytest.raises(FormatError) as raised:
        parse_response_format({"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert raised.value.param == "response_format.json_schema.schema"
    return str(raised.value)


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        (
            {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**9}}},
            "`maxLength` at `properties.a`",
        ),
        ({"type": "string", "minLength": 1001}, "`minLength`"),
        ({"type": "array", "items": {"type": "integer"}, "maxItems": 1e9}, "`maxItems`"),
        ({"type": "array", "items": {"type": "string", "maxLength": 5000}}, "`maxLength` at `items`"),
        ({"type": "string", "pattern": "^[a-z]{2,5000}$"}, "`pattern`"),
        # The converter reads these too (a review found them past the bound).
        ({"type": "string", "pattern": "^a{,5000}$"}, "`pattern`"),
        ({"type": "string", "pattern": "^a{0, 5000}$"}, "`pattern`"),
        ({"type": "string", "pattern": "^a{ 5000 }$"}, "`pattern`"),
        ({"$defs": {"big": {"type": "string", "maxLength": 2000}}, "$ref": "#/$defs/big"}, "at `$defs.big`"),
    ],
)
def test_a_repetition_past_what_the_grammar_enforces_is_refused_before_it_is_built(
    schema: dict[str, Any], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maxLength 10**9 took the gateway's event loop for ever (the converter writes a rule per unit)
    and, far smaller, killed a llamacpp worker; now it never reaches the converter."""
    import llama_cpp.llama_grammar

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the converter was called")

    monkeypatch.setattr(llama_cpp.llama_grammar, "json_schema_to_gbnf", never)
    message = _refused(schema)
    assert named in message and "the grammar enforces up to 1000" in message, message


@pytest.mark.parametrize(
    ("schema", "said"),
    [
        ({"type": "string", "minLength": 5, "maxLength": 2}, "`minLength` (5) is more than `maxLength` (2)"),
        (
            {
                "type": "object",
                "properties": {"s": {"type": "array", "items": {}, "minItems": 4, "maxItems": 2}},
            },
            "`minItems` (4) is more than `maxItems` (2): no answer keeps both at `properties.s`",
        ),
        ({"type": "string", "maxLength": -3}, "`maxLength` is -3, not a count"),
        ({"type": "string", "maxLength": True}, "`maxLength` is true, not a count"),
        ({"type": "string", "minLength": 1.5}, "`minLength` is 1.5, not a count"),
        ({"type": "string", "maxLength": "9"}, '`maxLength` is "9", not a count'),
    ],
)
def test_bounds_no_answer_can_keep_are_refused(schema: dict[str, Any], said: str) -> None:
    """They were taken as they came: minLength 5 with maxLength 2 was answered with five characters,
    maxLength -3 with none, maxLength true as 1 (an exploratory helper's findings)."""
    message = _refused(schema)
    assert said in message, message


def test_all_of_a_schemas_repetitions_together_are_bounded() -> None:
    many = {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(21)}
    message = _refused({"type": "object", "properties": many})
    assert "add up to 21000" in message and "at most 20000" in message, message
    twenty = {f"p{i}": {"type": "string", "minLength": 10, "maxLength": 1000} for i in range(20)}
    fmt = parse_response_format(
        {
            "type": "json_schema",
            "json_schema": {"name": "r", "schema": {"type": "object", "properties": twenty}},
        }
    )
    assert fmt is not None and fmt.grammar()


def test_a_tools_parameters_are_bounded_as_well() -> None:
    from breakwater.protocol.tools import AutoCalls, tool_plan

    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**7}}},
        },
    }
    with pytest.raises(FormatError) as raised:
        plan = tool_plan([tool], "required", fmt="smollm2", grammar=True)
        assert isinstance(plan, AutoCalls)
        plan.output_format(grammar=True)
    assert raised.value.param == "tools[0].function.parameters" and "`maxLength`" in str(raised.value)
    # Named as the client sent it (it said `json_schema.schema`, a field no tool has).
    assert raised.value.code == "invalid_function_parameters"
    assert str(raised.value).startswith("the parameters of `f` cannot be enforced"), str(raised.value)
