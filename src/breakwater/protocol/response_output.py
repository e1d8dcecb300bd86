"""A Responses API answer: the response object, its output items, and its stream of events, built
from the chat answer that served it (:mod:`breakwater.protocol.responses`).

Item ids come from the response's id and the item's place, so a resumed stream (replayed from the
request's first event, :class:`OutputEvents`) and a later retrieve name every item as the first
stream did."""

from __future__ import annotations

import time
from typing import Any

from breakwater.protocol.responses import Stored

# The status of a response whose request has this record status.
STATUS = {
    "queued": "queued",
    "running": "in_progress",
    "done": "completed",
    "error": "failed",
    "cancelled": "cancelled",
}


def item_id(kind: str, rid: str, index: int) -> str:
    return f"{kind}_{rid.removeprefix('resp_')}_{index}"


def usage(chat_usage: dict[str, int] | None) -> dict[str, Any] | None:
    if chat_usage is None:
        return None
    prompt, completion = int(chat_usage.get("prompt_tokens", 0)), int(chat_usage.get("completion_tokens", 0))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},  # (the SDK requires both)
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def text_part(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(
    rid: str, index: int, text: str, status: str, logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "id": item_id("msg", rid, index),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [text_part(text, logprobs)],
    }


def call_item(rid: str, index: int, call: dict[str, Any], status: str) -> dict[str, Any]:
    """A function call item from a chat tool call (``{"id", "function": {"name", "arguments"}}``)."""
    return {
        "id": item_id("fc", rid, index),
        "type": "function_call",
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"].get("arguments", ""),
        "status": status,
    }


def assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """Output items as the chat message a later turn's conversation holds."""
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [
        {"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
        for i in output
        if i["type"] == "function_call"
    ]
    # An empty answer (its end token first) is an empty text: a message with neither is refused.
    content = text or (None if calls else "")
    return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}


def response_object(
    rid: str,
    stored: Stored,
    *,
    model: str,
    created: int,
    status: str,
    output: list[dict[str, Any]],
    chat_usage: dict[str, int] | None = None,
    finish_reason: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The response object; a ``length`` finish makes it ``incomplete`` (``max_output_tokens``)."""
    incomplete = None
    if status == "completed" and finish_reason == "length":
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "completed_at": None,  # (set by OutputEvents.finish)
        "status": status,
        "background": stored.background,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": stored.instructions,
        "max_output_tokens": stored.max_output_tokens,
        "metadata": stored.metadata,
        "model": model,
        "output": output,
        "parallel_tool_calls": stored.parallel_tool_calls,
        "previous_response_id": stored.previous_response_id,
        "prompt_cache_key": stored.prompt_cache_key,
        "safety_identifier": stored.safety_identifier,
        "service_tier": "default",  # the one tier served (`auto` and `default` ask for it)
        "store": stored.store,
        "temperature": 1.0 if stored.temperature is None else stored.temperature,
        "text": stored.text,
        "tool_choice": stored.tool_choice,
        "tools": stored.tools,
        "top_logprobs": stored.top_logprobs,
        "top_p": 1.0 if stored.top_p is None else stored.top_p,
        "truncation": "disabled",
        "usage": usage(chat_usage),
        "user": stored.user,
    }


class OutputEvents:
    """A response's stream events (``response.created`` ... ``response.completed``), each numbered
    (``sequence_number``), from the chat chunks of its answer (gateway.sse's renderers): text deltas
    open a message item, a tool call's first piece a function call item; an item is done before the
    next one starts."""

    def __init__(self, rid: str, stored: Stored, *, model: str, created: int) -> None:
        self.rid, self.stored, self.model, self.created = rid, stored, model, created
        self.number = -1
        self.items: list[dict[str, Any]] = []
        self.text: dict[str, Any] | None = None  # the message item text goes to now
        self.calls: dict[int, dict[str, Any]] = {}  # open call items by the chunk's tool call index

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.number += 1
        return {"type": kind, "sequence_number": self.number, **fields}

    def _response(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_object(
            self.rid, self.stored, model=self.model, created=self.created, status=status, **extra
        )

    def start(self) -> list[dict[str, Any]]:
        snapshot = self._response("in_progress", output=[])
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events of one chat chunk (a text delta, tool call pieces)."""
        choice = chunk["choices"][0]
        delta = choice["delta"]
        out: list[dict[str, Any]] = []
        for call in delta.get("tool_calls") or ():
            out += self._call(call)
        if delta.get("content"):
            logprobs = (choice.get("logprobs") or {}).get("content")
            out += self._text_delta(delta["content"], logprobs)
        return out

    def _open_text(self) -> list[dict[str, Any]]:
        """A message item opened, with its one text part (open calls end first)."""
        out = self._close_calls()
        item = message_item(self.rid, len(self.items), "", "in_progress")
        self.text = item
        self.items.append(item)
        out.append(
            self._event("response.output_item.added", output_index=len(self.items) - 1, item=_copy(item))
        )
        out.append(self._part("response.content_part.added", text_part("", None)))
        return out

    def _text_delta(self, text: str, logprobs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        out = self._open_text() if self.text is None else []
        assert self.text is not None
        part = self.text["content"][0]
        part["text"] += text
        part["logprobs"] += logprobs or []
        out.append(
            self._event(
                "response.output_text.delta",
                item_id=self.text["id"],
                output_index=self.items.index(self.text),
                content_index=0,
                delta=text,
                logprobs=logprobs or [],
            )
        )
        return out

    def _part(self, kind: str, part: dict[str, Any]) -> dict[str, Any]:
        assert self.text is not None
        index = self.items.index(self.text)
        return self._event(kind, item_id=self.text["id"], output_index=index, content_index=0, part=part)

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        k = call.get("index", 0)
        item = self.calls.get(k)
        pieces = call.get("function") or {}
        if item is None:  # the items before it are done first, as OpenAI streams them
            out += [*self._close_text(), *self._close_calls()]
            item = call_item(
                self.rid, len(self.items), {**call, "function": {**pieces, "arguments": ""}}, "in_progress"
            )
            self.calls[k] = item
            self.items.append(item)
            out.append(
                self._event("response.output_item.added", output_index=len(self.items) - 1, item=_copy(item))
            )
        arguments = pieces.get("arguments") or ""
        if arguments:
            item["arguments"] += arguments
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self.items.index(item),
                    delta=arguments,
                )
            )
        return out

    def _close_text(self, status: str = "completed") -> list[dict[str, Any]]:
        item, self.text = self.text, None
        if item is None:
            return []
        part = item["content"][0]
        index = self.items.index(item)
        item["status"] = status
        return [
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=part["logprobs"],
            ),
            self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
            self._event("response.output_item.done", output_index=index, item=_copy(item)),
        ]

    def _close_calls(self, status: str = "completed") -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for item in self.calls.values():
            index = self.items.index(item)
            item["status"] = status
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
            out.append(self._event("response.output_item.done", output_index=index, item=_copy(item)))
        self.calls = {}
        return out

    def finish(
        self, finish_reason: str | None, chat_usage: dict[str, int] | None, at_ms: int = 0
    ) -> list[dict[str, Any]]:
        """The open items closed, then ``response.completed`` (or ``incomplete``: cut at
        ``max_output_tokens``, its last items too) with the whole object."""
        out = [] if self.items else self._open_text()  # an empty answer is still a message
        status = "incomplete" if finish_reason == "length" else "completed"
        out += [*self._close_text(status), *self._close_calls(status)]
        response = self._response(
            "completed", output=self.items, chat_usage=chat_usage, finish_reason=finish_reason
        )
        ended = at_ms // 1000 if at_ms else int(time.time())  # (its terminal event's: Redis's clock)
        response["completed_at"] = max(self.created, ended)  # (created: the gateway's clock)
        return [*out, self._event(f"response.{response['status']}", response=response)]

    def fail(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        """The request ended in an error (``response.failed``, its ``error``) or was cancelled
        (``cancelled``, no error); what it wrote stays, its open items ``incomplete``."""
        for item in self.items:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        self.text, self.calls = None, {}
        if error.get("code") == "cancelled":
            response = self._response("cancelled", output=self.items)
        else:
            body = {
                "code": str(error.get("code") or "server_error"),
                "message": str(error.get("message", "")),
            }
            response = self._response("failed", output=self.items, error=body)
        return [self._event("response.failed", response=response)]

    def snapshot(self, status: str) -> dict[str, Any]:
        """The response as it stands (a retrieve while it runs: its items so far, open)."""
        return self._response(status, output=self.items)


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """An item as an event carries it then (the stream goes on changing the open one)."""
    if item["type"] == "message":
        return {**item, "content": [{**p, "logprobs": list(p["logprobs"])} for p in item["content"]]}
    return dict(item)
