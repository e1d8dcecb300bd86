"""Structured outputs: OpenAI's ``response_format`` as one typed value shared by gateway, record and
engines, and the grammar that constrains a llama.cpp sampler to it.

``{"type": "json_object"}`` asks for any JSON object; ``{"type": "json_schema", "json_schema":
{"name": ..., "schema": {...}, "strict": true}}`` for one that validates against the schema. The
gateway converts the schema to a grammar before queueing (an unusable schema is a 400 there, never a
failed job), so every engine that constrains output accepts what is queued.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import orjson

from breakwater.protocol.schema_check import (
    ENFORCED,
    MAX_DEPTH,
    converter_ready,
    json_patterns,
    json_safe_classes,
    repeats_problem,
    too_deep,
    unenforced,
)
from breakwater.protocol.validation import given

FormatKind = Literal["json_object", "json_schema"]
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ANY_OBJECT_SCHEMA = '{"type": "object"}'


class FormatError(ValueError):
    """A ``response_format`` that cannot be served; ``param`` names the offending field."""

    def __init__(self, message: str, param: str = "response_format", code: str = "") -> None:
        super().__init__(message)
        self.param = param
        self.code = code  # '' : the caller's default (malformed); 'unsupported_parameter': not served


@dataclass(frozen=True, slots=True)
class OutputFormat:
    kind: FormatKind
    schema: str = ""  # the JSON Schema as JSON text (json_schema only)
    name: str = ""
    prefix: str = ""  # literal text before the JSON (a tool-call tag): only a grammar can say it
    suffix: str = ""
    # The answer may instead be text that does not open ``prefix`` (a tool-call format's ``auto``):
    # the model decides between a call and a text reply, as it would unconstrained.
    text_answer: bool = False
    # As the client sent them, for an OpenAI-compatible upstream (this system's engines enforce the
    # schema whatever ``strict`` says; None: not sent).
    strict: bool | None = None
    description: str = ""

    @property
    def needs_grammar(self) -> bool:
        """Only an engine that takes a GBNF grammar can enforce it (not a JSON-Schema backend)."""
        return bool(self.prefix or self.suffix)

    def to_json(self) -> str:
        data: dict[str, Any] = {"kind": self.kind, "schema": self.schema, "name": self.name}
        if self.needs_grammar:
            data |= {"prefix": self.prefix, "suffix": self.suffix}
            if self.text_answer:
                data["text_answer"] = True
        if self.strict is not None:
            data["strict"] = self.strict
        if self.description:
            data["description"] = self.description
        return orjson.dumps(data).decode()

    @classmethod
    def from_json(cls, text: str) -> OutputFormat | None:
        if not text:
            return None
        data = orjson.loads(text)
        kind: FormatKind = "json_schema" if data.get("kind") == "json_schema" else "json_object"
        return cls(
            kind,
            str(data.get("schema") or ""),
            str(data.get("name") or ""),
            str(data.get("prefix") or ""),
            str(data.get("suffix") or ""),
            data.get("text_answer") is True,
            data["strict"] if isinstance(data.get("strict"), bool) else None,
            str(data.get("description") or ""),
        )

    def openai(self) -> dict[str, Any]:
        """The ``response_format`` to send an OpenAI-compatible upstream."""
        if self.kind == "json_object":
            return {"type": "json_object"}
        spec = {"name": self.name or "output", "schema": orjson.loads(self.schema)}
        if self.strict is not None:
            spec["strict"] = self.strict
        if self.description:
            spec["description"] = self.description
        return {"type": "json_schema", "json_schema": spec}

    def grammar(self) -> str:
        """The GBNF grammar (llama.cpp) that only admits this format's output."""
        grammar = _grammar(self.schema if self.kind == "json_schema" else ANY_OBJECT_SCHEMA)
        if not self.needs_grammar:
            return _ends_at_the_value(grammar)
        body = grammar.replace("\nroot ::= ", "\njson-root ::= ")
        if body.startswith("root ::= "):
            body = "json-root ::= " + body.removeprefix("root ::= ")
        tagged = f"{_literal(self.prefix)} json-root {_literal(self.suffix)}"
        if not self.text_answer:
            return f"root ::= {tagged}\n{body}"
        return f"root ::= {tagged} | {_TEXT_RULE}\n{_TEXT_RULE} ::= {_text_not_opening(self.prefix)}\n{body}"


def parse_response_format(value: Any, *, every_keyword: bool = True) -> OutputFormat | None:
    """OpenAI's ``response_format`` → an :class:`OutputFormat` (None for plain text), checked;
    ``every_keyword``: a schema keyword the grammar would pass over is refused too (see
    :mod:`breakwater.protocol.schema_check`; a tool's schema is checked where it is enforced)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FormatError("`response_format` must be an object")
    kind = value.get("type")
    if kind in ("text", "json_object"):
        only_known(value, ("type",), "response_format")
        return None if kind == "text" else OutputFormat("json_object")
    if kind != "json_schema":
        raise FormatError(
            "`response_format.type` must be `text`, `json_object` or `json_schema`", "response_format.type"
        )
    only_known(value, ("type", "json_schema"), "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise FormatError("`response_format.json_schema` must be an object", "response_format.json_schema")
    only_known(spec, ("name", "description", "schema", "strict"), "response_format.json_schema")
    name = spec.get("name")
    if name is None:
        raise FormatError(
            "`json_schema.name` is required", "response_format.json_schema.name", "missing_required_parameter"
        )
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FormatError(
            "`json_schema.name` must be 1 to 64 letters, digits, underscores or dashes",
            "response_format.json_schema.name",
        )
    strict, description = spec.get("strict"), spec.get("description", "")
    if strict is not None and not isinstance(strict, bool):
        raise FormatError("`json_schema.strict` must be a boolean", "response_format.json_schema.strict")
    if not isinstance(description, str):
        raise FormatError(
            "`json_schema.description` must be a string", "response_format.json_schema.description"
        )
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise FormatError(
            "`json_schema.schema` must be a JSON Schema object", "response_format.json_schema.schema"
        )
    if too_deep(schema):
        raise FormatError(
            f"`json_schema.schema` nests more than {MAX_DEPTH} levels deep",
            "response_format.json_schema.schema",
        )
    fmt = OutputFormat(
        "json_schema", orjson.dumps(schema).decode(), name, strict=strict, description=description
    )
    _check_enforceable(fmt, schema, every_keyword)
    return fmt


def only_known(value: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """Refuse a field of ``value`` (the object at ``where``) that is not one of ``known``: a misspelt
    one (``shema``, ``paramters``) would otherwise be passed over and its default served instead.
    An empty one (null, ``""``, ``[]``, ``{}``: a client's "not given") asks for nothing: passed."""
    for key, asked in value.items():
        if key not in known and given(asked):
            raise FormatError(f"unknown parameter `{where}.{key}`", f"{where}.{key}", "unknown_parameter")


def _check_enforceable(fmt: OutputFormat, schema: dict[str, Any], every_keyword: bool) -> None:
    passed_over = unenforced(schema) if every_keyword else None
    if passed_over is not None:
        raise FormatError(
            f"`json_schema.schema` uses {passed_over}, which this server cannot enforce (it enforces "
            f"{ENFORCED}); leave it out and check it in your code",
            "response_format.json_schema.schema",
        )
    try:
        fmt.grammar()
    except Exception as exc:  # the converter asserts on what it cannot express
        raise FormatError(
            f"`json_schema.schema` cannot be enforced: {exc}", "response_format.json_schema.schema"
        ) from exc


# The converter's string character admits raw control characters, which JSON forbids inside strings
# (a model that writes a newline there produces unparseable output); llama.cpp's own converter
# excludes them, as here.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def _ends_at_the_value(grammar: str) -> str:
    """The answer ends with its JSON value: the converter lets an object's rule end with white space
    (`space`), which a model may take before its end token and a client then finds at the end of
    ``content`` or of a call's ``arguments`` (OpenAI's have none)."""
    lines = grammar.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("root ::= ") and line.endswith(" space") and " | " not in line:
            lines[i] = line.removesuffix(" space")
    return "\n".join(lines)


# A text answer's rule: its name is not one the schema converter gives (those derive from "root").
_TEXT_RULE = "breakwater-text-answer"


def _text_not_opening(tag: str) -> str:
    """GBNF for a text reply that never opens ``tag``: it starts with a visible character other than
    the tag's first, and a run of the tag's first character is never followed by its second (so
    ``a < b`` and ``x << 1`` stay writable while ``<tool_call>`` cannot be begun). Both characters
    are plain: ``<``, ``t``."""
    first, second = tag[0], tag[1]
    return f'[^{first}\\x00-\\x20] ([^{first}] | "{first}"+ [^{first}{second}])*'


def _literal(text: str) -> str:
    """A GBNF string literal."""
    return orjson.dumps(text).decode()


@lru_cache(maxsize=256)
def _grammar(schema: str) -> str:
    from llama_cpp import llama_grammar  # loads libllama: only when asked

    parsed = orjson.loads(schema)
    too_large = repeats_problem(parsed)  # before the converter: its time and size grow with them
    if too_large is not None:
        raise ValueError(too_large)
    # llama-cpp-python's json_schema_to_gbnf, with its literals written right (_converter_literal).
    make: Any = llama_grammar.SchemaConverter
    converter = make(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter._format_literal = _converter_literal
    converter.visit(converter.resolve_refs(json_patterns(converter_ready(parsed)), "stdin"), "")
    converted = converter.format_grammar()
    return json_safe_classes(str(converted).replace(_LOOSE_CHAR, _JSON_CHAR))


def _converter_literal(text: str) -> str:
    """The grammar literal of ``text``: a constant's or a property name's JSON text (or one character
    of a pattern). The converter's own escaped only `"` and line breaks and copied the JSON text's
    escapes, which llama.cpp's parser then read as escapes again: `\\n` in an enum value became a
    raw newline (no JSON), `\\\\` a lone backslash, an emoji's surrogate escapes two broken characters.
    Here a literal of exactly the JSON text, with its escapes of printable characters (``ensure_ascii``)
    written as the characters themselves, as a model writes them."""
    if text[:1] in ('"', "{", "["):
        try:
            text = json.dumps(json.loads(text), ensure_ascii=False)
            return _literal(text)
        except (ValueError, TypeError):  # not JSON after all, or a lone surrogate (orjson refuses it)
            pass
    return _literal(text)
