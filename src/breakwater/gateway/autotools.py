"""Rendering an answer whose tool calls the model chose (``tool_choice: auto``): its text split into
``content`` and ``tool_calls`` (:class:`breakwater.protocol.toolformats.CallParser`), streamed as the
pieces become known and whole in a non-streaming answer.

The split depends on everything before it, so a resumed stream replays the request's events from
the start through the parser and sends only what comes after the client's ``Last-Event-ID``."""

from __future__ import annotations

from typing import Any

from breakwater.protocol.events import TokenEvent
from breakwater.protocol.openai import chat_chunk
from breakwater.protocol.toolformats import (
    CLOSE,
    OPEN,
    CallParser,
    ParsedCall,
    Piece,
    single_call,
    split_answer,
    tags_of,
)
from breakwater.protocol.tools import call_id


def auto_call_id(rid: str, k: int) -> str:
    """The id of the answer's ``k``-th call: stable, so a resumed stream repeats it."""
    return f"{call_id(rid)}_{k}"


def call_object(rid: str, k: int, call: ParsedCall) -> dict[str, Any]:
    return {
        "id": auto_call_id(rid, k),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


class ToolChunks:
    """One choice's streaming chunks when the model may call tools. ``skip_through``: the events up
    to this seq were delivered before (a resume): they are parsed, and their chunks not sent.
    ``single``: the request allows one call (``parallel_tool_calls: false``); later ones are dropped."""

    __slots__ = ("call_rid", "calls", "created", "index", "model", "parser", "rid", "role_sent", "skip")

    def __init__(
        self,
        *,
        rid: str,
        model: str,
        created: int,
        index: int = 0,
        resumed: bool = False,
        call_rid: str = "",
        skip_through: int = 0,
        single: bool = False,
        tags: tuple[str, str] = (OPEN, CLOSE),
    ) -> None:
        self.rid, self.model, self.created, self.index = rid, model, created, index
        self.call_rid = call_rid or rid
        self.role_sent = resumed
        self.skip = skip_through
        self.parser = CallParser(single, tags)
        self.calls = 0

    def head(self) -> dict[str, Any]:
        self.role_sent = True
        return chat_chunk(
            self.rid, self.model, self.created, {"role": "assistant", "content": ""}, index=self.index
        )

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        out = [self._chunk(piece) for piece in self.parser.feed(event.text) if piece]
        return [] if event.seq <= self.skip else out

    def finals(self, event: TokenEvent) -> list[dict[str, Any]]:
        out = [self._chunk(piece) for piece in self.parser.finish()]
        reason = event.finish_reason or "stop"
        if self.calls and reason == "stop":
            reason = "tool_calls"
        delta = {} if self.role_sent else {"role": "assistant", "content": ""}
        out.append(chat_chunk(self.rid, self.model, self.created, delta, reason, index=self.index))
        return out

    def _chunk(self, piece: Piece) -> dict[str, Any]:
        delta: dict[str, Any]
        if isinstance(piece, str):
            delta = {"content": piece}
        else:
            call = {"index": self.calls, **call_object(self.call_rid, self.calls, piece)}
            delta = {"tool_calls": [call]}
            self.calls += 1
        if not self.role_sent:
            delta = {"role": "assistant", **delta}
            self.role_sent = True
        return chat_chunk(self.rid, self.model, self.created, delta, index=self.index)


def auto_message(rid: str, text: str, tool_format: str) -> tuple[dict[str, Any], bool]:
    """A whole answer's message (``content`` and ``tool_calls``) and whether it calls any (in the
    request's ``tool_format``; one call at most for :func:`single_call`'s)."""
    content, calls = split_answer(text, single_call(tool_format), tags_of(tool_format))
    if not calls:
        return {"role": "assistant", "content": content, "refusal": None}, False
    return {
        "role": "assistant",
        "content": content if content.strip() else None,
        "refusal": None,
        "tool_calls": [call_object(rid, k, call) for k, call in enumerate(calls)],
    }, True
