"""``response_format`` parsing, the grammar it becomes, and which engine may run what (no Redis)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from breakwater.engines.base import CONSTRAINED_CONTINUATION, RESPONSE_FORMAT, GenerationRequest
from breakwater.engines.sim import SimEngine
from breakwater.protocol.formats import FormatError, OutputFormat, parse_response_format
from breakwater.worker.jobs import error_type, refusal

SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}


def test_text_and_absent_mean_no_constraint() -> None:
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None


def test_json_object_and_json_schema_round_trip_through_the_record() -> None:
    obj = parse_response_format({"type": "json_object"})
    assert obj == OutputFormat("json_object")
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}})
    assert fmt is not None and fmt.kind == "json_schema" and orjson.loads(fmt.schema) == SCHEMA
    for f in (obj, fmt):
        assert f is not None and OutputFormat.from_json(f.to_json()) == f
    assert OutputFormat.from_json("") is None
    # What an OpenAI-compatible upstream gets: ``strict`` only as the client sent it.
    assert fmt.openai() == {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}


@pytest.mark.parametrize("strict", [True, False])
def test_strict_and_description_reach_the_upstream_as_sent(strict: bool) -> None:
    """A client's ``strict: false`` must not reach an upstream as strict (OpenAI refuses schemas
    that strict mode cannot take), nor its ``description`` be dropped."""
    spec = {"name": "thing", "schema": SCHEMA, "strict": strict, "description": "a thing"}
    fmt = parse_response_format({"type": "json_schema", "json_schema": spec})
    assert fmt is not None and OutputFormat.from_json(fmt.to_json()) == fmt  # through the record
    assert fmt.openai() == {"type": "json_schema", "json_schema": spec}


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ("json", "response_format"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x" * 65}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!"}}, "response_format.json_schema.name"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}},
            "response_format.json_schema.strict",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "description": 1}},
            "response_format.json_schema.description",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_unusable_formats_are_named(value: Any, param: str) -> None:
    with pytest.raises(FormatError) as err:
        parse_response_format(value)
    assert err.value.param == param


@pytest.mark.parametrize(
    ("value", "param", "code"),
    [
        # A misspelt field was passed over and its default served: `shema` gave any JSON object.
        (
            {"type": "json_schema", "json_schema": {"name": "x", "shema": SCHEMA}},
            "json_schema.shema",
            "unknown",
        ),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "json_schema.name", "missing"),
        ({"type": "json_schema", "json_schema": {"name": "x"}, "schema": SCHEMA}, "schema", "unknown"),
        ({"type": "json_object", "schema": SCHEMA}, "schema", "unknown"),
        ({"type": "text", "json_schema": {"name": "x", "schema": SCHEMA}}, "json_schema", "unknown"),
    ],
)
def test_a_field_a_format_does_not_have_is_refused_by_name(value: Any, param: str, code: str) -> None:
    with pytest.raises(FormatError) as err:
        parse_response_format(value)
    assert err.value.param == f"response_format.{param}"
    assert err.value.code == {"unknown": "unknown_parameter", "missing": "missing_required_parameter"}[code]


def test_an_empty_field_a_format_does_not_have_asks_for_nothing() -> None:
    """A client that writes its unset fields as null is served."""
    spec = {"name": "x", "schema": SCHEMA, "shema": None, "extra": {}}
    fmt = parse_response_format({"type": "json_schema", "json_schema": spec, "schema": None})
    assert fmt is not None and orjson.loads(fmt.schema) == SCHEMA


def test_the_grammar_keeps_control_characters_out_of_strings() -> None:
    """JSON forbids raw control characters inside strings; the grammar must not admit them."""
    for fmt in (
        OutputFormat("json_object"),
        parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}),
    ):
        assert fmt is not None
        char = next(line for line in fmt.grammar().splitlines() if line.startswith("char ::="))
        assert char.startswith('char ::= [^"\\\\\\x7F\\x00-\\x1F]'), char


class _Constraining(SimEngine):
    features = frozenset({RESPONSE_FORMAT})


class _Continuing(SimEngine):
    features = frozenset({RESPONSE_FORMAT, CONSTRAINED_CONTINUATION})


def test_which_engine_may_run_constrained_output() -> None:
    fmt = OutputFormat("json_object")
    fresh = GenerationRequest("r", prompt="p", output_format=fmt)
    continued = GenerationRequest("r", prompt="p", output_format=fmt, emitted_text='{"a', emitted_tokens=2)
    assert refusal(SimEngine(), GenerationRequest("r", prompt="p")) is None
    refused = refusal(SimEngine(), fresh)
    assert refused is not None and refused.code == "unsupported_parameter"
    assert refusal(_Constraining(), fresh) is None  # nothing delivered yet: (re)starting is fine
    refused = refusal(_Constraining(), continued)
    assert refused is not None and refused.code == "continuation_unsupported"
    assert refused.error_type == "server_error"
    assert refusal(_Continuing(), continued) is None


def test_error_types() -> None:
    assert error_type(None) == "server_error"
    assert error_type("continuation_unsupported") == "server_error"
    assert error_type("context_length_exceeded") == "invalid_request_error"
