"""Render a request's events as OpenAI responses: SSE chunks (each with ``id: <seq>``) or one JSON body."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from functools import partial
from typing import Any

import orjson

from breakwater.gateway.autotools import ToolChunks, auto_message
from breakwater.gateway.errors import APIError, error_body
from breakwater.gateway.following import RequestEnded
from breakwater.gateway.streaming import LastChunk
from breakwater.protocol.events import TokenEvent
from breakwater.protocol.openai import (
    chat_chunk,
    chat_response,
    completion_logprobs,
    text_chunk,
    text_response,
    tool_call_delta,
    usage_chunk,
    utf8_decoder,
)
from breakwater.protocol.toolformats import single_call, tags_of

DONE = b"data: [DONE]\n\n"
# What a stream sends while its request sends nothing (queued, or a slow token): an SSE comment line,
# which every SSE reader skips, so that an idle-timeout proxy keeps it open. A line, not an event (no
# blank line after it): the openai SDK's decoder, once a stream's events have had an `id:`, takes any
# blank line for an event with that id and empty data, and fails to parse it as JSON.
KEEPALIVE = b": keepalive\n"
# Characters JSON may leave raw inside strings (orjson does) that Python's str.splitlines(), and so
# httpx's aiter_lines(), a common way to read SSE, takes for line breaks: NEL, LINE and PARAGRAPH
# SEPARATOR, in UTF-8. A model that writes one would split its event's data line in such a reader.
_ESCAPES = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))
# Stands for a token's text in a choice's chunk template (ChoiceChunks.token_sse): a JSON string no
# chunk holds otherwise (its NULs are escaped), cut out of the chunk's bytes once per stream.
_TEXT = "\x00breakwater text\x00"
_TEXT_JSON = orjson.dumps(_TEXT)


def one_line(out: bytes) -> bytes:
    """JSON ``out`` on one line for every reader: the characters above escaped (``\\u2028``, the same
    JSON value). UTF-8 never has their bytes inside another character and JSON has non-ASCII only
    inside strings, so a plain byte replacement is exact."""
    if not out.isascii():  # most chunks are ASCII: isascii() is ~10x cheaper than one search
        for raw, escaped in _ESCAPES:
            if raw in out:
                out = out.replace(raw, escaped)
    return out


def sse_event(data: dict[str, Any], seq: int | str | None = None) -> bytes:
    """One SSE event; its id is the seq (or, for an ``n > 1`` response, every choice's), its JSON
    on one line (:func:`one_line`)."""
    head = f"id: {seq}\n".encode() if seq is not None else b""
    return head + b"data: " + one_line(orjson.dumps(data)) + b"\n\n"


class ChoiceChunks:
    """One choice's streaming chunks: the role in its first delta, a tool call named once, and the
    completions ``text_offset`` counted in the text this response has returned.

    ``rid`` names the chunks (the response); ``call_rid`` the choice's own request (its call id)."""

    __slots__ = (
        "_around",
        "call_rid",
        "chat",
        "created",
        "decode",
        "index",
        "model",
        "offset",
        "rid",
        "role_sent",
        "tool",
    )

    def __init__(
        self,
        *,
        rid: str,
        model: str,
        created: int,
        chat: bool,
        tool: str = "",
        index: int = 0,
        resumed: bool = False,
        call_rid: str = "",
    ) -> None:
        self.rid, self.model, self.created, self.chat = rid, model, created, chat
        self.tool, self.index, self.call_rid = tool, index, call_rid or rid
        self.role_sent = resumed
        self.offset = 0
        # The choice's tokens' bytes so far, for completions' text_offset (chat has none).
        self.decode = None if chat else utf8_decoder()
        self._around: tuple[bytes, bytes] | None = None

    def token_sse(self, event: TokenEvent) -> bytes:
        """``sse_event(self.token(event), event.seq)``, the same bytes. A plain token (no logprobs, no
        tool call, the role already sent) is its text's JSON string between the two parts of this
        choice's chunk, rendered once: per token that skips building the chunk's dicts and encoding
        all of it."""
        if event.logprobs is not None or self.tool or (self.chat and not self.role_sent):
            return sse_event(self.token(event), event.seq)
        if self._around is None:
            self._around = self._template()
        if not self.chat:
            self.offset += len(event.text)
        head, tail = self._around
        return b"id: %d\n%b%b%b" % (event.seq, head, one_line(orjson.dumps(event.text)), tail)

    def _template(self) -> tuple[bytes, bytes]:
        """A plain token's event before and after its text's JSON string."""
        if self.chat:
            chunk = chat_chunk(self.rid, self.model, self.created, {"content": _TEXT}, index=self.index)
        else:
            chunk = text_chunk(self.rid, self.model, self.created, _TEXT, index=self.index)
        head, tail = one_line(orjson.dumps(chunk)).split(_TEXT_JSON)
        return b"data: " + head, tail + b"\n\n"

    def token(self, event: TokenEvent) -> dict[str, Any]:
        delta: dict[str, Any]
        if not self.chat:
            lps = event.logprobs
            lp = None if lps is None else completion_logprobs(lps, self.offset, self.decode)
            self.offset += len(event.text)
            return text_chunk(self.rid, self.model, self.created, event.text, logprobs=lp, index=self.index)
        if self.tool:
            delta = tool_call_delta(self.call_rid, self.tool, event.text, not self.role_sent)
        elif self.role_sent:
            delta = {"content": event.text}
        else:
            delta = {"role": "assistant", "content": event.text}
        self.role_sent = True
        return chat_chunk(
            self.rid, self.model, self.created, delta, logprobs=event.logprobs, index=self.index
        )

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        return [self.token(event)]

    def finals(self, event: TokenEvent) -> list[dict[str, Any]]:
        return [self.finish(event)]

    def head(self) -> dict[str, Any]:
        """The choice's opening chunk, before any text: its role (or its call's id and name)."""
        delta = (
            tool_call_delta(self.call_rid, self.tool, "", True)
            if self.tool
            else {"role": "assistant", "content": ""}
        )
        self.role_sent = True
        return chat_chunk(self.rid, self.model, self.created, delta, index=self.index)

    def finish(self, event: TokenEvent) -> dict[str, Any]:
        reason = event.finish_reason or "stop"
        if not self.chat:
            return text_chunk(self.rid, self.model, self.created, "", reason, index=self.index)
        if self.tool:
            reason = "tool_calls" if reason == "stop" else reason
            delta = {} if self.role_sent else tool_call_delta(self.call_rid, self.tool, "", True)
        else:
            delta = {} if self.role_sent else {"role": "assistant", "content": ""}
        return chat_chunk(self.rid, self.model, self.created, delta, reason, index=self.index)


def renderer(
    *, rid: str, model: str, created: int, chat: bool, after: int, tool: str, tool_format: str
) -> ChoiceChunks | ToolChunks:
    """A streamed response's chunks after ``after``. ``tool``: the text is the arguments of a call to
    that function, streamed as ``tool_calls``. ``tool_format``: the model chose its calls
    (gateway.autotools); then the events start at the first, and those through ``after`` are parsed
    but not sent."""
    if tool_format:
        single, tags = single_call(tool_format), tags_of(tool_format)
        return ToolChunks(rid=rid, model=model, created=created, skip_through=after, single=single, tags=tags)
    return ChoiceChunks(rid=rid, model=model, created=created, chat=chat, tool=tool, resumed=after > 0)


def token_event(render: ChoiceChunks, event: TokenEvent) -> bytes:
    """A token's SSE event, as :func:`sse_chunks` writes it. One that fails leaves ``render`` as it
    was, so that the reader, rendering it again, sends the same chunk (its role, its text offset)."""
    role_sent, offset = render.role_sent, render.offset
    try:
        return render.token_sse(event)
    except BaseException:
        render.role_sent, render.offset = role_sent, offset
        raise


def error_chunk(event: TokenEvent) -> dict[str, Any]:
    err = event.error or {}
    return error_body(
        str(err.get("message", "generation failed")),
        str(err.get("type", "server_error")),
        err.get("code"),
        err.get("param"),
    )


async def sse_chunks(
    events: AsyncGenerator[TokenEvent, None],
    render: ChoiceChunks | ToolChunks,
    *,
    rid: str,
    model: str,
    created: int,
    chat: bool,
    include_usage: bool,
    keepalive_s: float = 0.0,
) -> AsyncGenerator[bytes, None]:
    """OpenAI streaming chunks for ``events``, rendered by ``render`` (see :func:`renderer`); ends
    with the usage chunk (if asked) and ``[DONE]``, or an error, as a :class:`LastChunk` (``[DONE]``
    alone for a resume after the answer's last event: only ``[DONE]`` was lost). ``events`` is
    closed with it (not left to the event loop's async-generator finalizer). ``keepalive_s``: a
    comment also while tokens come and render nothing for that long (a tool call parsed whole)."""
    token_sse = (
        render.token_sse
        if isinstance(render, ChoiceChunks)
        else partial(_tool_sse, render, Silence(keepalive_s))
    )
    async with aclosing(events):
        try:
            async for event in events:
                if event.kind == "token":
                    if data := token_sse(event):
                        yield data
                elif event.kind == "idle":
                    yield KEEPALIVE
                elif isinstance(render, ToolChunks) and event.seq <= render.skip:
                    # A resume after the answer's end, replayed from its start for the parser: the
                    # client has the last chunks (and the usage); only [DONE] may have been lost.
                    if event.kind == "done":
                        yield LastChunk(DONE)
                    return
                elif event.kind == "done":  # the last chunks go out in one write
                    last = [sse_event(c, event.seq) for c in render.finals(event)]
                    if include_usage:
                        last.append(sse_event(usage_chunk(rid, model, created, chat, event.usage), event.seq))
                    last.append(DONE)
                    yield LastChunk(b"".join(last))
                    return
                else:
                    yield LastChunk(sse_event(error_chunk(event), event.seq))
                    return
        except RequestEnded as ended:  # resumed after its last event, which the client has
            if ended.done:
                yield LastChunk(DONE)


class Silence:
    """A stream whose tokens render nothing (the model's tool call, parsed whole before it is sent):
    :meth:`quiet` is a keepalive once that has lasted ``every`` seconds (0: never), else nothing.
    The follower's own (``IDLE``) cannot see it: tokens do come."""

    __slots__ = ("every", "since")
    clock = staticmethod(time.monotonic)

    def __init__(self, every: float) -> None:
        self.every = every
        self.since: float | None = None

    def heard(self) -> None:
        self.since = None

    def quiet(self) -> bytes:
        now = self.clock()
        if self.since is None:
            self.since = now
        elif self.every > 0 and now - self.since >= self.every:
            self.since = now
            return KEEPALIVE
        return b""


def _tool_sse(render: ToolChunks, silence: Silence, event: TokenEvent) -> bytes:
    """A token's events when the model may call tools (none while a call is parsed: then maybe a
    keepalive)."""
    out = render.chunks(event)
    if not out:
        return silence.quiet()
    silence.heard()
    if len(out) == 1:
        return sse_event(out[0], event.seq)
    # The model's tool calls: text and calls that became known at this event.
    return b"".join(sse_event(c, event.seq) for c in out)


async def ended_stream(done: bool) -> AsyncGenerator[bytes, None]:
    """A resume after the request's last event: ``[DONE]`` alone if it ended with its answer."""
    if done:
        yield LastChunk(DONE)


async def collect_response(
    events: AsyncGenerator[TokenEvent, None],
    *,
    rid: str,
    model: str,
    created: int,
    chat: bool,
    tool: str = "",
    tool_format: str = "",
    logprobs: bool = False,
) -> dict[str, Any]:
    """A non-streaming response body from all events; an error event raises :class:`APIError`.
    ``events`` is closed here (not left to the event loop's async-generator finalizer).
    ``logprobs``: asked for, so the answer has a list of them (empty for an answer without text)."""
    asked = logprobs
    async with aclosing(events):
        parts: list[str] = []
        entries: list[dict[str, Any]] | None = [] if asked else None
        async for event in events:
            if event.kind == "token":
                parts.append(event.text)
                if event.logprobs is not None:
                    entries = entries if entries is not None else []
                    entries.extend(event.logprobs)
            elif event.kind == "done":
                text, reason = "".join(parts), event.finish_reason or "stop"
                if tool_format:  # the model chose its calls: split its answer
                    body = chat_response(rid, model, created, text, reason, event.usage, logprobs=entries)
                    message, called = auto_message(rid, text, tool_format)
                    choice = body["choices"][0]
                    choice["message"] = message
                    if called and reason == "stop":
                        choice["finish_reason"] = "tool_calls"
                    return body
                if chat:
                    return chat_response(rid, model, created, text, reason, event.usage, tool, entries)
                return text_response(rid, model, created, text, reason, event.usage, entries)
            else:
                raise event_error(event)
        raise APIError(500, "the request's stream ended without a final event", type="server_error")


def event_error(event: TokenEvent) -> APIError:
    """A request's error event as the error of a non-streaming answer, with its HTTP status."""
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
    return APIError(
        status,
        str(err.get("message", "generation failed")),
        type=str(err.get("type", "server_error")),
        code=code,
        param=err.get("param"),
    )
