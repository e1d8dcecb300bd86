"""OpenAI's Responses API (``POST /v1/responses``) as the chat completion that serves it.

A response's input items, ``instructions``, function tools and ``text.format`` become a chat request
(and so its one queued request, with every guarantee a chat has: resume, continuation, fencing);
the parameters that shape the response object, and the conversation for a later
``previous_response_id``, ride in the request's record (:class:`Stored`, the spec's ``response``).
The answer's rendering: :mod:`breakwater.protocol.response_output`; the routes: gateway/responses.py.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import orjson
from pydantic import ConfigDict, Field, field_validator

from breakwater.protocol.openai import INT64, MAX_MESSAGES, MAX_TIMEOUT_S, StreamOptions, Tagged, Whole

LOGPROBS_INCLUDE = "message.output_text.logprobs"
TIERS = (None, "auto", "default")  # service tiers that ask for nothing (chat's ACCEPTED_ONLY)


class InputError(ValueError):
    """A malformed or unsupported input item, tool or format; ``param`` names it (400)."""

    def __init__(self, message: str, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class ResponsesRequest(Tagged):
    """The Responses API's create request: the parameters a text model serves are typed here; any
    other that asks for something (``reasoning``, ``conversation``, ``prompt``, built-in tools, ...)
    is refused by name (:meth:`unsupported_parameter`)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]] = Field(default="")
    instructions: str | None = None
    max_output_tokens: Whole | None = Field(default=None, ge=1, lt=1 << 31)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=256)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    top_logprobs: Whole | None = Field(default=None, ge=0, le=20)
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    user: str | None = None
    # Breakwater's extensions, as on chat: the lane, a deadline, and a seed (reproducible sampling).
    lane: Literal["interactive", "batch"] = "interactive"
    timeout: float | None = Field(default=None, gt=0.0, le=MAX_TIMEOUT_S)
    seed: Whole | None = Field(default=None, ge=-INT64, lt=INT64)

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(value, list) and len(value) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} input items")
        return value

    def unsupported_parameter(self) -> str | None:
        """The first parameter set here that this server does not implement, if any."""
        for name, value in (self.model_extra or {}).items():
            if value not in (None, {}, [], ""):
                return name
        if self.truncation == "auto":  # the conversation is never cut to fit: too long is a 400
            return "truncation"
        if self.service_tier not in TIERS:
            return "service_tier"
        if any(item != LOGPROBS_INCLUDE for item in self.include or ()):
            return "include"
        for key, value in (self.text or {}).items():
            if key != "format" and value is not None:
                return f"text.{key}"  # verbosity: reasoning models' only
        return None

    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())


@dataclass(frozen=True, slots=True)
class Stored:
    """What a response keeps beside its chat request (the spec's ``response``, JSON): the parameters
    its response object echoes, and ``messages``, the conversation it answered (chat messages, the
    earlier turns and its input; not its instructions, which a later turn does not inherit)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    history: int = 0  # of ``messages``, those of the earlier turns (the rest are its input)
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = field(default_factory=lambda: {"format": {"type": "text"}})
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    top_logprobs: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    store: bool = True
    background: bool = False
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    created_at: int = 0  # unix seconds, the gateway's clock at its admission

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_json(cls, raw: str) -> Stored | None:
        """What a record keeps; None if it is not a response's (or unreadable). Fields a later or
        earlier version wrote and this one does not know are left out (a rolling deploy)."""
        try:
            found = orjson.loads(raw)
            if not isinstance(found, dict):
                return None
            return cls(**{f.name: found[f.name] for f in fields(cls) if f.name in found})
        except (orjson.JSONDecodeError, TypeError):
            return None


def to_chat(req: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[dict[str, Any], Stored]:
    """The chat completions body that serves ``req`` after the conversation ``history`` (a previous
    response's, as chat messages), and what the response keeps. Raises :class:`InputError`."""
    messages = [*history, *input_messages(req.input)]
    head = [{"role": "system", "content": req.instructions}] if req.instructions else []
    logprobs = req.logprobs()
    if req.top_logprobs and not logprobs:
        raise InputError(f'`top_logprobs` needs `include: ["{LOGPROBS_INCLUDE}"]`', "top_logprobs")
    body: dict[str, Any] = {
        "model": req.model,
        "messages": [*head, *messages],
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": [_chat_tool(t, i) for i, t in enumerate(req.tools)] if req.tools else None,
        # `auto` (the default) and `none` without tools ask for text: as no choice at all on chat.
        "tool_choice": None
        if not req.tools and req.tool_choice in ("auto", "none")
        else _chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _response_format(req.text),
        "logprobs": logprobs or None,
        "top_logprobs": req.top_logprobs if logprobs else None,
        "user": req.user,
        "metadata": req.metadata,
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
        "lane": req.lane,
        "timeout": req.timeout,
        "seed": req.seed,
    }
    stored = Stored(
        messages=messages,
        history=len(history),
        instructions=req.instructions,
        previous_response_id=req.previous_response_id,
        tools=req.tools or [],
        tool_choice=req.tool_choice or "auto",
        parallel_tool_calls=req.parallel_tool_calls is not False,
        text=req.text if req.text and req.text.get("format") else {"format": {"type": "text"}},
        temperature=req.temperature,
        top_p=req.top_p,
        max_output_tokens=req.max_output_tokens,
        top_logprobs=req.top_logprobs,
        metadata=req.metadata or {},
        store=req.store is not False,
        background=bool(req.background),
        user=req.user,
        safety_identifier=req.safety_identifier,
        prompt_cache_key=req.prompt_cache_key,
        created_at=int(time.time()),
    )
    return {k: v for k, v in body.items() if v is not None}, stored


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: messages (text parts only), and the function calls and their
    outputs of earlier turns (consecutive calls are one assistant message, as parallel calls are)."""
    return _converted(items)[0]


def message_places(req: ResponsesRequest, history: int) -> list[int | str]:
    """Where each message of :func:`to_chat`'s body comes from, as the Responses API names it: the
    index of its input item (of its first call, for consecutive calls made one message),
    ``instructions``, or ``input`` for the previous response's conversation (whose calls the input
    must answer)."""
    head: list[int | str] = ["instructions"] if req.instructions else []
    return [*head, *["input"] * history, *_converted(req.input)[1]]


def _converted(items: str | list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """The chat messages of ``items``, and the input item each starts at."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}], [0]
    out: list[dict[str, Any]] = []
    starts: list[int] = []
    for i, item in enumerate(items):
        kind, before = item.get("type", "message"), len(out)
        _only_known(item, _ITEM_FIELDS.get(kind), f"input[{i}]")
        if kind == "message":
            out.append(_message(item, i))
        elif kind == "function_call":
            call = {
                "id": _text_field(item, "call_id", i),
                "type": "function",
                "function": {
                    "name": _text_field(item, "name", i),
                    "arguments": _text_field(item, "arguments", i),
                },
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _parts_text(output, f"input[{i}].output")
            out.append({"role": "tool", "tool_call_id": _text_field(item, "call_id", i), "content": text})
        else:
            raise InputError(
                f"input items of type `{kind}` are not supported (messages, function calls and "
                "their outputs are)",
                f"input[{i}].type",
                "unsupported_parameter",
            )
        starts.extend([i] * (len(out) - before))
    return out, starts


def _message(item: dict[str, Any], i: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise InputError(
            f"`role` must be user, system, developer or assistant, not {role!r}", f"input[{i}].role"
        )
    content = item.get("content")
    text = content if isinstance(content, str) else _parts_text(content, f"input[{i}].content")
    return {"role": role, "content": text}


def _parts_text(parts: Any, param: str) -> str:
    """Content parts' text: ``input_text`` and ``output_text`` (an earlier answer) are joined."""
    if not isinstance(parts, list):
        raise InputError("content is a string or a list of text parts", param)
    texts: list[str] = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise InputError(
                f"content parts of type `{kind}` are not supported (text models: input_text, output_text)",
                f"{param}[{j}].type",
                "unsupported_parameter",
            )
        _only_known(part, _PART_FIELDS[kind], f"{param}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


# The fields of OpenAI's input items and content parts (an earlier response's output items have an
# `id` and a `status`): any other is refused by name, as chat refuses a message's, never ignored.
_ITEM_FIELDS = {
    "message": frozenset({"type", "role", "content", "id", "status"}),
    "function_call": frozenset({"type", "call_id", "name", "arguments", "id", "status"}),
    "function_call_output": frozenset({"type", "call_id", "output", "id", "status"}),
}
_PART_FIELDS = {
    "input_text": frozenset({"type", "text"}),
    "output_text": frozenset({"type", "text", "annotations", "logprobs"}),
}


def _only_known(item: dict[str, Any], fields: frozenset[str] | None, param: str) -> None:
    unknown = sorted(set(item) - fields) if fields is not None else []
    if unknown:
        raise InputError(
            f"the field `{unknown[0]}` is not supported here",
            f"{param}.{unknown[0]}",
            "unsupported_parameter",
        )


def _text_field(item: dict[str, Any], name: str, i: int) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InputError(f"`{name}` must be a string", f"input[{i}].{name}")
    return value


def _chat_tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """A function tool (``{"type": "function", "name", "parameters", ...}``) in chat's shape."""
    if tool.get("type") != "function":
        raise InputError(
            f"tools of type `{tool.get('type')}` are not supported (function tools are)",
            f"tools[{i}].type",
            "unsupported_parameter",
        )
    known = ("name", "description", "parameters", "strict")
    extra = [k for k in tool if k not in (*known, "type") and tool[k] is not None]
    if extra:
        raise InputError(f"the tool field `{extra[0]}` is not supported", f"tools[{i}].{extra[0]}")
    return {"type": "function", "function": {k: tool[k] for k in known if tool.get(k) is not None}}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise InputError(
            '`tool_choice` is none, auto, required or a function (`{"type": "function", "name": ...}`)',
            "tool_choice",
        )
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (checked there, as a chat's is)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InputError("`text.format` is an object", "text.format")
    if fmt.get("type") != "json_schema":
        return fmt
    # Every field but the type goes on (an unknown one is refused there, named as `text.format.<it>`).
    schema = {k: v for k, v in fmt.items() if k != "type" and v is not None}
    return {"type": "json_schema", "json_schema": schema}


def input_items(rid: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's input (chat messages, as :func:`input_messages` made them) as the input items
    ``GET /v1/responses/{id}/input_items`` lists; ids from the response's and the item's place."""
    base = rid.removeprefix("resp_")
    items: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role, content = message["role"], message.get("content")
        if role == "tool":
            items.append(
                {
                    "id": f"fco_{base}_in{i}",
                    "type": "function_call_output",
                    "call_id": message.get("tool_call_id", ""),
                    "output": content or "",
                    "status": "completed",
                }
            )
            continue
        if content or not message.get("tool_calls"):
            kind = "output_text" if role == "assistant" else "input_text"
            part: dict[str, Any] = {"type": kind, "text": content or ""}
            if role == "assistant":
                part["annotations"] = []
            items.append(
                {
                    "id": f"msg_{base}_in{i}",
                    "type": "message",
                    "role": role,
                    "status": "completed",
                    "content": [part],
                }
            )
        for k, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") or {}
            items.append(
                {
                    "id": f"fc_{base}_in{i}_{k}",
                    "type": "function_call",
                    "call_id": call.get("id", ""),
                    "name": function.get("name", ""),
                    "arguments": function.get("arguments", ""),
                    "status": "completed",
                }
            )
    return items
