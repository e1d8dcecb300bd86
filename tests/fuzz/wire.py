"""What the gateway must answer on the wire, as checks shared by the fuzz tests: OpenAI error bodies,
complete SSE streams, and request bodies built byte by byte (no JSON library writes ``NaN`` or a lone
surrogate escape, so the tests write them themselves)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import orjson

SERVED = "sim"  # the fuzz stack's sim worker serves this model
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
COMPLETION_PATHS = (CHAT, COMPLETIONS)
ERROR_FIELDS = frozenset({"message", "type", "param", "code"})


def error_of(body: bytes) -> dict[str, Any] | None:
    """The OpenAI ``error`` object of a response body, or None when the body is not one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not error.keys() >= ERROR_FIELDS:
        return None
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return None
    return error


def assert_openai_error(
    resp: httpx.Response, status: int, *, code: str | None = None, names: str | None = None
) -> dict[str, Any]:
    """``resp`` is ``status`` with a JSON OpenAI error body of type invalid_request_error; ``code``
    is its code, and ``names`` (a request field) appears in its param or message."""
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    error = error_of(resp.content)
    assert error is not None, resp.text[:300]
    assert error["type"] == "invalid_request_error", error
    if code is not None:
        assert error["code"] == code, error
    if names is not None:
        assert names in f"{error['param']} {error['message']}", error
    return error


def sse_problems(body: bytes) -> list[str]:
    """What is wrong with a whole SSE body: a ``data:`` line that is neither ``[DONE]`` nor JSON, an
    error event of type ``server_error``, anything after the end, or no end (``[DONE]`` or an error)."""
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        return [f"the stream is not UTF-8: {exc}"]
    problems: list[str] = []
    ended: str | None = None
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").removeprefix(" ")
        if ended is not None:
            problems.append(f"data after the stream's end ({ended}): {data[:120]!r}")
        if data == "[DONE]":
            ended = "[DONE]"
            continue
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            problems.append(f"a data line is neither [DONE] nor JSON: {data[:120]!r}")
            continue
        error = event.get("error") if isinstance(event, dict) else None
        if isinstance(error, dict):
            ended = "error event"
            if error.get("type") == "server_error":
                problems.append(f"server error event: {error}")
    if ended is None:
        problems.append("the stream ended without [DONE] or an error event")
    return problems


def json_object(members: Mapping[str, bytes]) -> bytes:
    """A JSON object from raw member values, which may be what no JSON library writes."""
    return b"{" + b", ".join(orjson.dumps(name) + b": " + value for name, value in members.items()) + b"}"


def request_body(path: str, text: bytes = b'"Say something."', **members: bytes) -> bytes:
    """A valid body for ``path`` (model sim, 4 tokens) except for what the raw JSON ``text`` of its
    prompt or message content and the raw ``members`` (added or replaced) make of it."""
    base = {"model": orjson.dumps(SERVED), "max_tokens": b"4"}
    if path == CHAT:
        base["messages"] = b'[{"role": "user", "content": ' + text + b"}]"
    else:
        base["prompt"] = text
    return json_object(base | members)
