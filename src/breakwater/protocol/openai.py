"""OpenAI request models (the subset Breakwater serves) and response/chunk builders."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from breakwater.protocol.messages import ChatMessage, check_tool_turns
from breakwater.protocol.tools import call_id

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 512
MAX_MESSAGES = 4096
MAX_TIMEOUT_S = 86_400.0
MAX_SEQ = (1 << 63) - 1  # event sequence numbers (Last-Event-ID, ?after=)
INT64 = 1 << 63
MAX_CHOICES = 16  # n: each choice is its own job (gateway.choices)
MAX_GROUP = 64  # choices of one request in all: n for each of a text completion's prompts
MAX_LOGIT_BIAS = 1024  # tokens in one logit_bias

# OpenAI parameters the engines do not implement yet: refused (400, naming the parameter) unless
# they hold their default, never silently ignored.
UNSUPPORTED_PARAMETERS = (
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
    "best_of", "suffix", "modalities", "audio", "prediction", "reasoning_effort", "web_search_options",
)  # fmt: skip
# Extra fields that change nothing the engine does; the typed ones
# (metadata, safety_identifier, prompt_cache_key) are fields of :class:`Tagged`.
KNOWN_EXTRAS = frozenset({"store", "service_tier"})
# Of those, the values that ask for nothing: any other asks OpenAI for a service not given here (a
# completion stored to be retrieved later, a processing tier), so it is refused.
ACCEPTED_ONLY = {"store": (None, False), "service_tier": (None, "auto", "default")}


def _whole(value: Any) -> Any:
    """JSON has numbers, not integers (RFC 8259): a whole one written as ``2048.0`` is a count's value."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer field's type in the strict request models: ``2048.0`` is 2048; ``"5"``, ``true`` and
# ``2.5`` are no integer.
Whole = Annotated[int, BeforeValidator(_whole)]


def _is_default(name: str, value: Any) -> bool:
    """Whether an unsupported parameter holds a value that asks for nothing (OpenAI's default)."""
    if value is None or value is False:
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == (1 if name == "best_of" else 0)
    if isinstance(value, str | list | dict) and not value:
        return name != "web_search_options"  # {} asks for a search, with OpenAI's defaults
    if name in ("tool_choice", "function_call") and value in ("none", "auto"):
        return True
    return (name, value) in (("response_format", {"type": "text"}), ("modalities", ["text"]))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI pads deltas against a side channel; not done here

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("obfuscation of stream deltas is not supported; leave it unset or false")
        return value


class Tagged(BaseModel):
    """OpenAI's fields that tag a request for the caller and change nothing generated here; typed and
    bounded as OpenAI does, so a malformed one is a 400, not stored. The base of every request body:
    strict, as OpenAI's types are (``"5"`` or ``true`` is no number, ``"true"`` no boolean; a whole
    number is a float's value)."""

    model_config = ConfigDict(strict=True)

    @field_validator(
        "stream", "n", "echo", "lane", "ignore_eos", "encoding_format", mode="before", check_fields=False
    )
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """``null`` is the default (the SDK's "not given"), for the fields of every request body
        that have one of their own."""
        return cls.model_fields[info.field_name or ""].default if value is None else value

    @field_validator("stream_options", check_fields=False)
    @classmethod
    def _options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        """Chat, completions and Responses: options of a stream, so only with ``stream: true``."""
        if value is not None and not info.data.get("stream"):
            raise ValueError("`stream_options` is only allowed when `stream` is true")
        return value

    metadata: dict[str, str] | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (
            len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())
        ):
            raise ValueError("metadata holds at most 16 pairs: keys of up to 64 characters, values of 512")
        return value


class _SamplingRequest(Tagged):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    max_tokens: Whole | None = Field(default=None, ge=1, lt=1 << 31)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: Whole | None = Field(default=None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Whole = Field(default=1, ge=1, le=MAX_CHOICES)
    timeout: float | None = Field(
        default=None, gt=0.0, le=MAX_TIMEOUT_S, description="Breakwater: deadline in seconds"
    )
    lane: Literal["interactive", "batch"] = "interactive"
    ignore_eos: bool = Field(default=False, description="vLLM extension: generate until max_tokens")
    top_k: Whole | None = Field(
        default=None, ge=-1, lt=1 << 31, description="vLLM extension: the k likeliest tokens (0 or -1: all)"
    )
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
        for token, bias in value.items():
            if not (token.isascii() and token.isdigit()) or int(token) >= 1 << 31:
                raise ValueError(f"keys are token ids (non-negative integers as strings), not {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases are from -100 to 100, not {bias}")
        return value

    def token_biases(self) -> dict[int, float]:
        """``logit_bias`` with its token ids as numbers (those biased by 0 left out)."""
        return {int(token): bias for token, bias in (self.logit_bias or {}).items() if bias}

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = value if isinstance(value, list) else [] if value is None else [value]
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return value

    def unsupported_parameter(self) -> str | None:
        """The first parameter this request sets that Breakwater does not implement, if any."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED_PARAMETERS:
            value = extra.get(name)
            if not _is_default(name, value):
                return name
        for name, value in extra.items():
            if name not in KNOWN_EXTRAS and name not in UNSUPPORTED_PARAMETERS and value is not None:
                return name
        for name, accepted in ACCEPTED_ONLY.items():
            if extra.get(name) not in accepted:
                return name
        return None

    def choice_count(self) -> int:
        """The choices of the answer: each is a queued request of its own (gateway.choices)."""
        return self.n

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Whole | None = Field(default=None, ge=1, lt=1 << 31)
    response_format: Any = None  # checked by protocol.formats.parse_response_format
    tools: Any = None  # checked by protocol.tools.forced_call
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # a permission: one call honours it either way
    logprobs: bool | None = None
    top_logprobs: Whole | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs: true")
        return value

    @model_validator(mode="after")
    def _tool_turns(self) -> ChatCompletionRequest:
        check_tool_turns(self.messages)
        return self

    def logprobs_top(self) -> int:
        """Alternatives per token to report; -1: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else -1

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    # OpenAI's legacy default (and vLLM's): 16 tokens; an explicit null runs to the end token or
    # the context, as a chat answer without a bound does.
    max_tokens: Whole | None = Field(default=16, ge=1, lt=1 << 31)
    echo: bool = False
    logprobs: Whole | None = Field(default=None, ge=0, le=5)

    def logprobs_top(self) -> int:
        return -1 if self.logprobs is None else self.logprobs

    @field_validator("prompt")
    @classmethod
    def _some_prompts(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_GROUP:
            raise ValueError(f"a list of prompts holds 1 to {MAX_GROUP} texts")
        n = info.data.get("n", 1)  # validated before: a field of the base class
        if isinstance(value, list) and len(value) * n > MAX_GROUP:
            raise ValueError(f"{len(value)} prompts x n = {n}: more than {MAX_GROUP} choices in one request")
        return value

    def unsupported_parameter(self) -> str | None:
        return "echo" if self.echo else super().unsupported_parameter()

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def choice_count(self) -> int:
        """``n`` choices for each prompt: OpenAI's choice ``i * n + j`` is prompt i's j-th."""
        return self.n * len(self.prompts())

    def output_limit(self) -> int | None:
        return self.max_tokens


def usage_body(usage: dict[str, int] | None) -> dict[str, int]:
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    lp = None if logprobs is None else {"content": logprobs, "refusal": None}
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}],
    }


def text_chunk(
    rid: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def completion_logprobs(
    entries: list[dict[str, Any]], offset: int, decode: Callable[[bytes], str] | None = None
) -> dict[str, Any]:
    """The legacy completions shape of per-token logprobs; ``offset``: the first token's position
    in the text this response has returned so far; ``decode``: the response's UTF-8 decoder so far
    (:func:`utf8_decoder`; a character may begin in one chunk's tokens and end in the next's)."""
    offsets = []
    # Counted in the characters the tokens' bytes complete: a token that holds part of a character
    # is shown as U+FFFD but adds nothing to the text until the token that completes it.
    decode = decode or utf8_decoder()
    for entry in entries:
        offsets.append(offset)
        raw = entry.get("bytes")
        offset += len(decode(bytes(raw) if raw is not None else entry["token"].encode()))
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def utf8_decoder() -> Callable[[bytes], str]:
    """An incremental UTF-8 decoder (its ``decode``): what the bytes fed so far complete."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode


def usage_chunk(
    rid: str, model: str, created: int, chat: bool, usage: dict[str, int] | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_body(usage),
    }


def chat_response(
    rid: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str,
    usage: dict[str, int] | None,
    tool: str = "",
    logprobs: list[dict[str, Any]] | None = None,
    call_rid: str = "",
) -> dict[str, Any]:
    """``tool``: the text is the arguments of a call to that function (protocol.tools); its id comes
    from ``call_rid`` (the choice's own request), else ``rid``."""
    # `refusal`: OpenAI sends it with every message (null: no refusal); strict clients read it.
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool:
        call = {
            "id": call_id(call_rid or rid),
            "type": "function",
            "function": {"name": tool, "arguments": text},
        }
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    lp = None if logprobs is None else {"content": logprobs, "refusal": None}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": finish_reason}],
        "usage": usage_body(usage),
    }


def tool_call_delta(rid: str, tool: str, arguments: str, first: bool) -> dict[str, Any]:
    """A streamed piece of a call's arguments; the first piece names the call."""
    if first:
        call = {
            "index": 0,
            "id": call_id(rid),
            "type": "function",
            "function": {"name": tool, "arguments": arguments},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}


def text_response(
    rid: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str,
    usage: dict[str, int] | None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    lp = None if logprobs is None else completion_logprobs(logprobs, 0)
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}],
        "usage": usage_body(usage),
    }
