"""Pydantic's validation errors as OpenAI's: the parameter named, its message and OpenAI's code.

A request model's own check names the field it refuses (below the model that raises it) and its
OpenAI code with :func:`invalid_field`; the gateway (HTTP, WebSocket, Responses) and a batch's lines
read every error through :func:`described`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic_core import PydanticCustomError

# Pydantic's error types as OpenAI's codes; the models raise some by their OpenAI name. Any other is
# an invalid value.
_CODES = {
    "missing": "missing_required_parameter",
    "missing_required_parameter": "missing_required_parameter",
    "empty_array": "empty_array",
    "invalid_type": "invalid_type",
    "extra_forbidden": "unknown_parameter",
    "unknown_parameter": "unknown_parameter",
    "json_invalid": "invalid_json",
}
_PLACES = frozenset({"body", "query", "path"})  # FastAPI's first part of a parameter's location
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})


def given(value: Any) -> bool:
    """A field's value asks for something: not null, ``""``, ``[]`` or ``{}`` (a client's "not
    given", which a field the server does not have may carry)."""
    return value not in (None, "", [], {})


def invalid_field(field: str, message: str, code: str = "invalid_value") -> PydanticCustomError:
    """A validation error naming ``field`` (below the model that raises it) and OpenAI's ``code``."""
    return PydanticCustomError(code, message, {"field": field})


def missing_field(field: str) -> PydanticCustomError:
    return invalid_field(field, "a required parameter is missing", "missing_required_parameter")


def _union_tag(part: str) -> bool:
    """Pydantic puts the tried union member in an error's location (``prompt.str``); hide it."""
    return part in _TYPE_TAGS or "[" in part


def described(error: Mapping[str, Any]) -> tuple[str | None, str, str]:
    """An error's parameter (its place in the body, and below it the ``field`` a model's own check
    names; None for the body itself), message and OpenAI code."""
    where = error.get("loc", ())
    if where and where[0] in _PLACES:  # the parameter alone, as OpenAI names it (`limit`, not `query.limit`)
        where = where[1:]
    loc = [str(p) for p in where if not _union_tag(str(p))]
    field = (error.get("ctx") or {}).get("field")
    param = ".".join([*loc, str(field)] if field else loc) or None
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return param, msg, _CODES.get(str(error.get("type")), "invalid_value")
