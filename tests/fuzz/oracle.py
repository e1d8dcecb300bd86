"""The schemathesis side of the fuzz tests: generated completion bodies aimed at the served model
(so they reach admission, Redis and the worker instead of a 404), and the judge of every response."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from schemathesis import Case
from schemathesis.core.transport import Response

from tests.fuzz.wire import COMPLETION_PATHS, SERVED, error_of, sse_problems

MAX_FUZZ_TOKENS = 16  # bounds the run time; generated bodies may ask for 2**31 tokens
LIMITS = ("max_tokens", "max_completion_tokens")


def token_count(value: Any) -> float | None:
    """The count the gateway reads from a limit's value (its models are lax: 2048.0, 1e3 and "2048"
    are 2048-like counts), or None for one it refuses or that is absent. Bools are left alone."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if any(c in value for c in "eEnN"):  # exponents, nan, inf: refused in a string
            return None
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and float(value).is_integer():
        return float(value)
    return None


def aimed_at_served_model(body: Any, known: frozenset[str] | None = None) -> Any:
    """A generated body with the served model, at most ``MAX_FUZZ_TOKENS`` tokens to generate per
    choice and, given ``known``, only those members (the schema allows any other member; the gateway
    refuses them by name, so positive cases keep to the known ones to get past admission).

    Only values the gateway accepts are replaced, keeping their JSON type (a count in a string stays
    a string): a negative case whose ``model`` or limit the gateway refuses keeps that mutation, as
    it is what the case is about. The sim engine ends a sequence by itself within 64 tokens unless
    ``ignore_eos`` (lax: 1, "true", "yes" are true too) asks it not to; then a limit is added."""
    if not isinstance(body, dict):
        return body
    body = {name: value for name, value in body.items() if known is None or name in known}
    if known is not None and isinstance(body.get("messages"), list):
        body["messages"] = [_answerable(m) for m in body["messages"]]
    if isinstance(body.get("model"), str):
        body["model"] = SERVED
    for name in LIMITS:
        value = body.get(name)
        count = token_count(value)
        if count is not None and count > MAX_FUZZ_TOKENS:
            body[name] = str(MAX_FUZZ_TOKENS) if isinstance(value, str) else MAX_FUZZ_TOKENS
    # The gateway reads max_completion_tokens when it is set (a value it refuses is a 400), else
    # max_tokens: without a count there, the sim engine would generate up to its context length.
    unbounded = body.get("max_completion_tokens") is None and token_count(body.get("max_tokens")) is None
    if unbounded and body.get("ignore_eos") not in (None, False):
        body["max_tokens"] = MAX_FUZZ_TOKENS
    return body


def _answerable(message: Any) -> Any:
    """A generated message as a conversation's checks take it (protocol.messages), which a schema
    does not say: a non-assistant message has content, and a `tool` result (which must answer a call
    made just before it, beyond a schema) is a user's."""
    if not isinstance(message, dict):
        return message
    message = dict(message)
    if message.get("role") == "tool":
        message["role"] = "user"
    if message.get("role") != "assistant" and message.get("content") in (None, []):
        message["content"] = "x"
    return message


def header(response: Response, name: str) -> str:
    values = response.headers.get(name.lower()) or [""]
    return values[0]


def idempotency_key(case: Case[Any]) -> str | None:
    headers: Mapping[str, Any] = case.headers or {}
    key = headers.get("idempotency-key")
    return None if key is None else str(key)


def has_deadline(body: Any) -> bool:
    """The body sets its own ``timeout`` (generated ones can be a few microseconds)."""
    return isinstance(body, dict) and isinstance(body.get("timeout"), int | float)


@dataclass
class FuzzLog:
    """Every generated call's outcome; failures are collected rather than raised, so one run reports
    them all (and Hypothesis does not spend the run time shrinking each)."""

    failures: list[str] = field(default_factory=list)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    streams: int = 0  # 200s with an event stream, all read to the end
    rids: set[str] = field(default_factory=set)  # requests the gateway admitted
    # Idempotency-Keys sent with a body that set its own deadline: a later case with the same key
    # gets that first request's answer, a 504 ``timeout`` included.
    keys_with_deadline: set[str] = field(default_factory=set)
    nothing_to_negate: list[str] = field(default_factory=list)  # operations without negative cases

    def fail(self, case: Case[Any], problem: str) -> None:
        # json, not orjson: generated integers may not fit 64 bits.
        body = json.dumps(case.body, default=repr) if isinstance(case.body, dict) else repr(case.body)
        self.failures.append(
            f"{case.method} {case.formatted_path}: {problem}\n"
            f"    headers: {case.headers}\n    body: {body[:1000]}"
        )

    def sent(self, case: Case[Any]) -> None:
        """Note what a later case's answer may legitimately depend on; call before sending."""
        key = idempotency_key(case)
        if key is not None and has_deadline(case.body):
            self.keys_with_deadline.add(key)

    def client_deadline(self, case: Case[Any], status: int, error: dict[str, Any] | None) -> bool:
        """A 504 ``timeout`` for a request whose own deadline ran out is the answer it asked for."""
        if status != 504 or error is None or error["code"] != "timeout":
            return False
        return has_deadline(case.body) or idempotency_key(case) in self.keys_with_deadline

    def judge(self, case: Case[Any], response: Response) -> None:
        status = response.status_code
        self.statuses[(f"{case.method} {case.operation.path}", status)] += 1
        error = error_of(response.content)
        if status >= 500 and not self.client_deadline(case, status, error):
            self.fail(case, f"{status}: {response.content[:300]!r}")
        elif 400 <= status < 500 and error is None:
            self.fail(case, f"{status} without an OpenAI error body: {response.content[:300]!r}")
        elif status == 200 and case.operation.path in COMPLETION_PATHS:
            self.rids.add(header(response, "x-breakwater-request-id"))
            self._judge_completion(case, response)

    def _judge_completion(self, case: Case[Any], response: Response) -> None:
        if header(response, "content-type").startswith("text/event-stream"):
            self.streams += 1
            problems = sse_problems(response.content)
            if response.stream_cut_short:
                problems.append("the stream did not end within the request timeout")
            for problem in problems:
                self.fail(case, f"200 stream: {problem}")
            return
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            self.fail(case, f"200 that is not JSON: {response.content[:300]!r}")
            return
        if not isinstance(data, dict) or not data.get("choices"):
            self.fail(case, f"200 without choices: {response.content[:300]!r}")
