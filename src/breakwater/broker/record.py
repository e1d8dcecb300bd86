"""The request record (``bw:req:{rid}`` hash): the one contract between gateway, Lua and worker.

Field names live here and in the Lua scripts only (a test checks the scripts against
:data:`FIELDS`). The text emitted so far lives beside it in its own string key (``APPEND`` is O(1)
per token, where rewriting a hash field is O(n)).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Literal

import orjson


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Status.DONE, Status.ERROR, Status.CANCELLED)


Kind = Literal["chat", "completion", "embedding"]


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What the client asked for; written once at admission, copied on a dead-letter retry."""

    model: str
    lane: str
    kind: Kind
    request_id: str  # the X-Request-ID the client sent (or the gateway made up), for logs
    timeout_s: float
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    include_usage: bool = False
    retried_from: str | None = None  # the dead-lettered request this one retries
    tenant: str = ""  # its owner: only this tenant's keys may read, resume or cancel it
    key_id: str = ""  # the API key it was made with; empty with auth off
    # The id its key's limits and usage count under, where it is not ``key_id`` (a rotated key's:
    # the first key of its rotations, tenancy.apikeys.ApiKey.limit_id); '' : ``key_id``.
    limit_id: str = ""
    reserved_tokens: int = 0  # held against the key's tokens-per-minute until it is metered
    # Held against its token budgets until it is metered: reserved_tokens, or without max_tokens
    # the prompt and the model's whole remaining context (0 in records from before: reserved_tokens).
    held_tokens: int = 0
    response_format: str = ""  # structured output (protocol.formats.OutputFormat as JSON); '' for text
    tool_call: str = ""  # the function the answer calls (its arguments are the text); '' for none
    inputs: list[str] | None = None  # embedding: the texts to embed
    logprobs: int = -1  # report logprobs with this many alternatives per token (-1: not asked)
    tool_format: str = ""  # tool_choice auto: the answer is parsed for calls in this format (toolformats)
    tools: str = (
        ""  # format `openai`: {"tools", "tool_choice", "parallel_tool_calls"} for the upstream (JSON)
    )
    choices: int = 1  # the client's n (times its prompts): this is one choice, its rid ``<parent>-<index>``
    prompts: int = 1  # a text completion's prompts: choice i * n + j is prompt i's j-th (gateway.choices)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: str = ""  # {token id: bias} as JSON; '' for none
    response: str = ""  # a Responses API request: what its response keeps (protocol.responses.Stored)

    def to_hash(self) -> dict[str, str]:
        out = {
            "model": self.model,
            "lane": self.lane,
            "kind": self.kind,
            "request_id": self.request_id,
            "timeout_s": repr(self.timeout_s),
            "stop": orjson.dumps(self.stop).decode(),
            "ignore_eos": _flag(self.ignore_eos),
            "include_usage": _flag(self.include_usage),
        }
        if self.messages is not None:
            out["messages"] = orjson.dumps(self.messages).decode()
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.retried_from is not None:
            out["retried_from"] = self.retried_from
        if self.inputs is not None:
            out["inputs"] = orjson.dumps(self.inputs).decode()
        if self.logprobs >= 0:
            out["logprobs"] = str(self.logprobs)
        if self.choices > 1:
            out["choices"] = str(self.choices)
        if self.prompts > 1:
            out["prompts"] = str(self.prompts)
        for name in (
            "tenant",
            "key_id",
            "limit_id",
            "response_format",
            "tool_call",
            "tool_format",
            "tools",
            "reserved_tokens",
            "held_tokens",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "response",
        ):  # omitted when empty (or 0)
            if value := getattr(self, name):
                out[name] = str(value)
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value)
        return out

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> RequestSpec:
        found = h.get("kind")
        kind: Kind = "chat" if found == "chat" else "embedding" if found == "embedding" else "completion"
        return cls(
            model=h.get("model", ""),
            lane=h.get("lane", "interactive"),
            kind=kind,
            request_id=h.get("request_id", ""),
            timeout_s=float(h.get("timeout_s") or 0),
            messages=orjson.loads(h["messages"]) if h.get("messages") else None,
            prompt=h.get("prompt"),
            max_tokens=_int_or_none(h.get("max_tokens")),
            temperature=_float_or_none(h.get("temperature")),
            top_p=_float_or_none(h.get("top_p")),
            top_k=_int_or_none(h.get("top_k")),
            seed=_int_or_none(h.get("seed")),
            stop=list(orjson.loads(h.get("stop") or "[]")),
            ignore_eos=h.get("ignore_eos") == "1",
            include_usage=h.get("include_usage") == "1",
            retried_from=h.get("retried_from"),
            tenant=h.get("tenant", ""),
            key_id=h.get("key_id", ""),
            limit_id=h.get("limit_id", ""),
            reserved_tokens=int(h.get("reserved_tokens") or 0),
            held_tokens=int(h.get("held_tokens") or 0),
            response_format=h.get("response_format", ""),
            tool_call=h.get("tool_call", ""),
            tool_format=h.get("tool_format", ""),
            tools=h.get("tools", ""),
            inputs=orjson.loads(h["inputs"]) if h.get("inputs") else None,
            logprobs=int(h.get("logprobs") or -1),
            choices=int(h.get("choices") or 1),
            prompts=int(h.get("prompts") or 1),
            presence_penalty=float(h.get("presence_penalty") or 0),
            frequency_penalty=float(h.get("frequency_penalty") or 0),
            logit_bias=h.get("logit_bias", ""),
            response=h.get("response", ""),
        )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """A request's spec and its progress, as read back from Redis."""

    spec: RequestSpec
    status: Status = Status.QUEUED
    created: int = 0  # unix seconds, the `created` of every chunk
    created_ms: int = 0  # Redis clock
    deadline_ms: int = 0  # Redis clock
    attempt: int = 0
    seq: int = 0
    tokens: int = 0
    failures: int = 0
    worker: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    emitted: str = ""  # from the emitted-text key, not the hash
    watchers: int = 0  # clients following it now (a departed client counts out after it leaves)
    shared: int = 0  # clients that came to it through the response cache (gateway.cache)
    wseq: int = 0  # the number of the running attempt's last write applied (append.lua)
    finished_ms: int = 0  # Redis clock: when it ended (finish.lua); 0 while it runs

    @property
    def chat(self) -> bool:
        return self.spec.kind == "chat"

    @classmethod
    def from_hash(cls, h: dict[str, str], emitted: str = "") -> RequestRecord:
        usage = h.get("usage")
        return cls(
            spec=RequestSpec.from_hash(h),
            status=Status(h.get("status") or "queued"),
            created=int(h.get("created") or 0),
            created_ms=int(h.get("created_ms") or 0),
            deadline_ms=int(h.get("deadline_ms") or 0),
            attempt=int(h.get("attempt") or 0),
            seq=int(h.get("seq") or 0),
            tokens=int(h.get("tokens") or 0),
            failures=int(h.get("failures") or 0),
            worker=h.get("worker", ""),
            finish_reason=h.get("finish_reason") or None,
            usage=orjson.loads(usage) if usage else None,
            emitted=emitted,
            watchers=int(h.get("watchers") or 0),
            shared=int(h.get("shared") or 0),
            wseq=int(h.get("wseq") or 0),
            finished_ms=int(h.get("finished_ms") or 0),
        )


@dataclass(frozen=True, slots=True)
class Watch:
    """What a worker checks of each in-flight request every heartbeat."""

    status: Status | None  # None: the record is gone
    watchers: int
    detached_ms: int


# Fields the scripts and the broker write beside the spec: progress, leases, fencing, watchers.
PROGRESS_FIELDS = frozenset(
    {
        "status", "created", "created_ms", "deadline_ms", "attempt", "seq", "tokens", "failures",
        "worker", "finish_reason", "usage", "watchers", "detached_ms", "job_id", "started_ms",
        "tokens_at_start", "first_token_ms", "finished_ms", "wseq", "shared",
    }
)  # fmt: skip
SPEC_FIELDS = frozenset(f.name for f in fields(RequestSpec))
FIELDS = SPEC_FIELDS | PROGRESS_FIELDS


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _int_or_none(value: Any) -> int | None:
    return int(value) if value not in (None, "") else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if value not in (None, "") else None
