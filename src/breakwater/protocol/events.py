"""Token events: what a worker appends to a request's durable stream and channel (DESIGN §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

# "idle" is a follower's own (gateway.following): nothing came for a while; never stored or sent.
EventKind = Literal["token", "done", "error", "idle"]
TERMINAL_KINDS: frozenset[str] = frozenset({"done", "error"})


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One event of a request's stream; ``seq`` runs 1..N per request, stable across attempts."""

    seq: int
    kind: EventKind
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: dict[str, Any] | None = field(default=None)
    # Per token of ``text``, when the request asked: OpenAI's chat shape ({token, logprob, bytes,
    # top_logprobs}), converted for completions by the gateway.
    logprobs: list[dict[str, Any]] | None = None
    at_ms: int = 0  # a terminal event's: when the request ended (Redis's clock, ms); 0: not known

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> TokenEvent:
        """Build from a stream entry's (or a channel payload's) string fields."""
        kind = fields.get("kind", "token")
        if kind not in ("token", "done", "error"):
            raise ValueError(f"unknown event kind {kind!r}")
        usage = fields.get("usage")
        error = fields.get("error")
        lp = fields.get("lp")
        return cls(
            seq=int(fields["seq"]),
            kind=kind,  # type: ignore[arg-type]
            text=fields.get("text", ""),
            tokens=int(fields.get("n", "0") or 0),
            finish_reason=fields.get("finish_reason") or None,
            usage=orjson.loads(usage) if usage else None,
            error=orjson.loads(error) if error else None,
            logprobs=orjson.loads(lp) if lp else None,
            at_ms=int(fields.get("at") or 0),
        )

    @classmethod
    def from_payload(cls, payload: str) -> TokenEvent:
        """Parse a channel message: a token is ``t<seq> <n> <text>`` (the text as is, spaces and all),
        any other event a JSON object of string fields."""
        if payload[:1] == "t":
            seq, n, text = payload[1:].split(" ", 2)
            return cls(int(seq), "token", text, int(n))
        data = orjson.loads(payload)
        return cls.from_fields({k: str(v) for k, v in data.items()})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": self.seq, "kind": self.kind}
        if self.kind == "token":
            out["text"] = self.text
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.finish_reason:
            out["finish_reason"] = self.finish_reason
        if self.usage is not None:
            out["usage"] = self.usage
        if self.error is not None:
            out["error"] = self.error
        return out


# What a follower that asked for them yields when its request has sent nothing for a while (a stream
# says it with an SSE comment, so that an idle-timeout proxy does not cut a queued stream).
IDLE = TokenEvent(0, "idle")
