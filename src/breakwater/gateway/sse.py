"""Render a request's events as OpenAI responses: SSE chunks (each with ``id: <seq>``) or one JSON body."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from breakwater.gateway.errors import APIError, error_body
from breakwater.protocol.events import TokenEvent
from breakwater.protocol.openai import (
    chat_chunk,
    chat_response,
    completion_logprobs,
    text_chunk,
    text_response,
    tool_call_delta,
    usage_chunk,
)

DONE = b"data: [DONE]\n\n"


def sse_event(data: dict[str, Any], seq: int | None = None) -> bytes:
    head = f"id: {seq}\n".encode() if seq is not None else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


async def sse_chunks(
    events: AsyncIterator[TokenEvent],
    *,
    rid: str,
    model: str,
    created: int,
    chat: bool,
    include_usage: bool,
    after: int = 0,
    tool: str = "",
) -> AsyncIterator[bytes]:
    """OpenAI streaming chunks for ``events``; ends with the usage chunk (if asked) and ``[DONE]``.
    ``tool``: the text is the arguments of a call to that function, streamed as ``tool_calls``."""
    role_sent = after > 0
    offset = 0  # completions' text_offset: counted in the text this response has returned
    delta: dict[str, Any]
    async for event in events:
        if event.kind == "token":
            if chat:
                if tool:
                    delta = tool_call_delta(rid, tool, event.text, not role_sent)
                elif role_sent:
                    delta = {"content": event.text}
                else:
                    delta = {"role": "assistant", "content": event.text}
                role_sent = True
                yield sse_event(chat_chunk(rid, model, created, delta, logprobs=event.logprobs), event.seq)
            else:
                lp = None if event.logprobs is None else completion_logprobs(event.logprobs, offset)
                offset += len(event.text)
                yield sse_event(text_chunk(rid, model, created, event.text, logprobs=lp), event.seq)
        elif event.kind == "done":  # the last chunks go out in one write
            reason = event.finish_reason or "stop"
            if tool:
                reason = "tool_calls" if reason == "stop" else reason
                delta = {} if role_sent else tool_call_delta(rid, tool, "", True)
                last = [sse_event(chat_chunk(rid, model, created, delta, reason), event.seq)]
            elif chat:
                delta = {} if role_sent else {"role": "assistant", "content": ""}
                last = [sse_event(chat_chunk(rid, model, created, delta, reason), event.seq)]
            else:
                last = [sse_event(text_chunk(rid, model, created, "", reason), event.seq)]
            if include_usage:
                last.append(sse_event(usage_chunk(rid, model, created, chat, event.usage), event.seq))
            last.append(DONE)
            yield b"".join(last)
            return
        else:
            err = event.error or {}
            body = error_body(
                str(err.get("message", "generation failed")),
                str(err.get("type", "server_error")),
                err.get("code"),
            )
            yield sse_event(body, event.seq)
            return


async def collect_response(
    events: AsyncIterator[TokenEvent], *, rid: str, model: str, created: int, chat: bool, tool: str = ""
) -> dict[str, Any]:
    """A non-streaming response body from all events; an error event raises :class:`APIError`."""
    parts: list[str] = []
    logprobs: list[dict[str, Any]] | None = None
    async for event in events:
        if event.kind == "token":
            parts.append(event.text)
            if event.logprobs is not None:
                logprobs = [*(logprobs or ()), *event.logprobs]
        elif event.kind == "done":
            text, reason = "".join(parts), event.finish_reason or "stop"
            if chat:
                return chat_response(rid, model, created, text, reason, event.usage, tool, logprobs)
            return text_response(rid, model, created, text, reason, event.usage, logprobs)
        else:
            err = event.error or {}
            code = err.get("code")
            status = {
                "cancelled": 409,
                "timeout": 504,
                "context_length_exceeded": 400,
                "events_trimmed": 410,
            }.get(str(code))
            if status is None:
                status = 400 if err.get("type") == "invalid_request_error" else 500
            raise APIError(
                status,
                str(err.get("message", "generation failed")),
                type=str(err.get("type", "server_error")),
                code=code,
            )
    raise APIError(500, "the request's stream ended without a final event", type="server_error")
