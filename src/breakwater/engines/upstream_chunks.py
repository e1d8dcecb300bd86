"""Reading an OpenAI-compatible upstream's streamed answer (the ``openai`` engine): each choice's
text and logprobs, and its tool calls written into the request's text
stream as Hermes blocks between marked tags (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``
with :data:`~breakwater.protocol.toolformats.MARK` outside), which the gateway parses back
(:mod:`breakwater.protocol.toolformats`)."""

from __future__ import annotations

from typing import Any

import orjson

from breakwater.protocol.toolformats import MARK, PASSED

OPEN, CLOSE = PASSED
NOT_MARK = "\ufffd"  # the upstream's own U+E000 in content (never a tag's)


def upstream_message(message: dict[str, str]) -> dict[str, Any]:
    """A record's message as the upstream takes it (an assistant turn's ``tool_calls`` are JSON)."""
    calls = message.get("tool_calls")
    if calls is None:
        return message
    return {**message, "tool_calls": orjson.loads(calls), "content": message.get("content") or None}


class ToolCallWriter:
    """The upstream's streamed ``tool_calls`` written as Hermes blocks, ``<tool_call>{"name": ...,
    "arguments": <the pieces as they come>}</tool_call>``, which the gateway parses back
    (protocol.toolformats): the request's stream stays text, so its guarantees are unchanged."""

    __slots__ = ("_args", "_open", "_tags")

    def __init__(self) -> None:
        self._open = -1  # the index of the call being written
        self._args = False  # whether its arguments have begun
        self._tags = 0  # pieces added that are not the upstream's tokens (counted out of `tokens`)

    def before_content(self, choice: dict[str, Any], parts: list[str]) -> None:
        """Text after a call ends the call's block (else it would be written inside it)."""
        if (choice.get("delta") or {}).get("content"):
            self._close(parts)

    def take(self, choice: dict[str, Any], parts: list[str], finished: bool) -> None:
        for call in (choice.get("delta") or {}).get("tool_calls") or ():
            index = call.get("index", max(self._open, 0))
            fn = call.get("function") or {}
            if index != self._open:
                self._close(parts)
                name = orjson.dumps(str(fn.get("name") or "")).decode()
                parts.append(f'{OPEN}{{"name": {name}, "arguments": ')
                self._tags += 1
                self._open, self._args = index, False
            args = fn.get("arguments")
            if args:  # JSON text in pieces; some servers send the whole object
                text = args if isinstance(args, str) else orjson.dumps(args).decode()
                parts.append(text.replace(MARK, "\\ue000"))  # (the same string once parsed)
                self._args = True
        if finished:
            self._close(parts)

    def _close(self, parts: list[str]) -> None:
        if self._open >= 0:
            parts.append(("}" if self._args else "{}}") + CLOSE)  # a call without arguments: {}
            self._tags += 1
            self._open = -1

    def tags(self) -> int:
        """The tag pieces added since last asked."""
        tags, self._tags = self._tags, 0
        return tags


def take_choice(
    choice: dict[str, Any],
    chat: bool,
    parts: list[str],
    logprobs: list[dict[str, Any]] | None,
    calls: ToolCallWriter | None,
) -> str | None:
    """:func:`_take`, and the choice's tool calls written as blocks (when tools were passed on)."""
    if calls is None:
        return _take(choice, chat, parts, logprobs)
    calls.before_content(choice, parts)
    start = len(parts)
    reason = _take(choice, chat, parts, logprobs)
    for at in range(start, len(parts)):  # content: never a tag's mark (the gateway parses calls)
        parts[at] = parts[at].replace(MARK, NOT_MARK)
    calls.take(choice, parts, reason is not None)
    return reason


def _take(
    choice: dict[str, Any], chat: bool, parts: list[str], logprobs: list[dict[str, Any]] | None
) -> str | None:
    """One streamed choice: its text onto ``parts`` (one chunk per token; the final usage corrects
    the count), its logprobs onto ``logprobs`` (when asked); returns its finish_reason."""
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    if text:
        parts.append(text)
    if logprobs is not None:
        logprobs += _chunk_logprobs(choice.get("logprobs"), chat)
    reason = choice.get("finish_reason")
    return str(reason) if reason else None


def _chunk_logprobs(found: Any, chat: bool) -> list[dict[str, Any]]:
    """An upstream chunk's logprobs in OpenAI's chat shape (completions send the legacy one)."""
    if not isinstance(found, dict):
        return []
    if chat:
        return list(found.get("content") or [])
    tops = found.get("top_logprobs") or []
    out = []
    for i, (token, logprob) in enumerate(
        zip(found.get("tokens") or [], found.get("token_logprobs") or [], strict=False)
    ):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        alternatives = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top.items()]
        out.append(
            {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": alternatives}
        )
    return out
