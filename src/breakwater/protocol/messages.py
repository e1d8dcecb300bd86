"""Chat messages as OpenAI checks them: each message's fields, and tool results answering the calls
before them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from breakwater.protocol.validation import given, invalid_field, missing_field

# Keys of a chat message besides role, content and name: those the gateway uses; any other that asks
# for something (a non-null, non-empty value: an earlier answer's `refusal`, `audio`, a legacy
# `function_call`) is refused, never dropped.
MESSAGE_EXTRAS = frozenset({"tool_calls", "tool_call_id"})
# Fields of an answer's message that an SDK sends back with it and that ask for nothing: `parsed`
# (the SDK's `parse()` copy of the content as an object), `annotations` (citations it was given).
ECHOED = frozenset({"parsed", "annotations"})
_TAKEN = MESSAGE_EXTRAS | ECHOED


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("content")
    @classmethod
    def _text_parts(cls, value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        for i, part in enumerate(value if isinstance(value, list) else ()):
            if part.get("type") != "text":
                kind = part.get("type")
                named = f"is of type `{kind}`" if kind is not None else "has no `type`"
                raise ValueError(f"part {i} {named}: only text content parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}, of type `text`, needs a string `text`")
            for key, field in part.items():
                if key not in ("type", "text") and given(field):
                    message = f"part {i}, of type `text`, has no field `{key}`"
                    raise invalid_field(f"{i}.{key}", message, "unknown_parameter")
        return value

    @model_validator(mode="after")
    def _known_keys(self) -> ChatMessage:
        for key, value in (self.model_extra or {}).items():
            if key not in _TAKEN and given(value):
                raise ValueError(f"the message field `{key}` is not supported; remove it from the message")
        if self.content == []:
            raise invalid_field("content", "an empty array; give at least one content part", "empty_array")
        if self.content is None and (self.role != "assistant" or not self.extra("tool_calls")):
            raise missing_field("content")  # an assistant's may be its tool calls, as OpenAI's
        if self.role == "tool":
            _need_text(self.extra("tool_call_id"), "tool_call_id")
        return self

    def extra(self, key: str) -> Any:
        """A message field besides role, content and name (``tool_calls``, ``tool_call_id``)."""
        return (self.model_extra or {}).get(key)

    def call_ids(self, at: str) -> list[str]:
        """The ids of an assistant message's ``tool_calls``, each checked as OpenAI does (an id, and a
        function with a name and its arguments as text); ``at``: the message's place in errors."""
        calls = self.extra("tool_calls")
        if calls is None or self.role != "assistant":
            return []
        if not isinstance(calls, list):
            raise invalid_field(f"{at}.tool_calls", "must be a list of tool calls")
        ids: list[str] = []
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if (
                not isinstance(call, dict)
                or call.get("type", "function") != "function"
                or not isinstance(fn, dict)
            ):
                raise invalid_field(f"{at}.tool_calls.{j}", "must be a `function` call with its `function`")
            _need_text(call.get("id"), f"{at}.tool_calls.{j}.id")
            _need_text(fn.get("name"), f"{at}.tool_calls.{j}.function.name")
            # Arguments are JSON text, as OpenAI sends them; an object (some clients') is taken as it is.
            if not isinstance(fn.get("arguments"), dict):
                _need_text(fn.get("arguments"), f"{at}.tool_calls.{j}.function.arguments")
            ids.append(call["id"])
        return ids

    def text(self) -> str:
        """The message's text; content parts of type ``text`` are joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)  # text parts only (``_text_parts``)


def _need_text(value: Any, field: str) -> None:
    """A required string field: missing, or of another type, is refused with OpenAI's code."""
    if value is None:
        raise missing_field(field)
    if not isinstance(value, str):
        raise invalid_field(field, f"expected a string, got {type(value).__name__}", "invalid_type")


def check_tool_turns(messages: list[ChatMessage]) -> None:
    """Tool results answer the calls just before them, as OpenAI checks: a ``tool`` message
    follows an assistant message with ``tool_calls`` (or another result of them) and names one
    of its calls; every call of that message has its result before the conversation goes on."""
    calls: list[str] = []  # the calls of the assistant message these results may answer
    unanswered: list[str] = []
    asked_at = 0
    for i, message in enumerate(messages):
        if message.role == "tool":
            call = message.extra("tool_call_id")
            if not calls:
                raise invalid_field(
                    f"messages.{i}.role",
                    "a `tool` message must answer the `tool_calls` of the assistant message before it",
                )
            if call not in calls:
                raise invalid_field(
                    f"messages.{i}.tool_call_id",
                    f"{call!r} is not among the `tool_calls` of the assistant message before it",
                )
            unanswered = [c for c in unanswered if c != call]
            continue
        if unanswered:
            break
        ids = message.call_ids(f"messages.{i}")
        calls, unanswered, asked_at = ids, list(ids), i
    if unanswered:  # named by the first call without a result
        raise invalid_field(
            f"messages.{asked_at}.tool_calls.{calls.index(unanswered[0])}",
            "each of an assistant message's `tool_calls` needs a `tool` message answering it before the "
            f"conversation goes on; these calls have none: {', '.join(unanswered)}",
        )
