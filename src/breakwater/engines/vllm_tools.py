"""vLLM's own tool parsers in the in-process ``vllm`` engine (worker setting ``vllm_tool_parser``, the
name vLLM's server takes as ``--tool-call-parser``: ``hermes``, ``llama3_json``, ``mistral``,
``xlam``, ...).

Such a worker publishes the tool format ``openai``: the gateway passes the client's tools, choice and
history through unchanged, the model's chat template renders them (the worker setting
``vllm_chat_template`` replaces the model's, as ``--chat-template`` does), and vLLM's parser, fed
each step's text and token ids exactly as vLLM's server feeds it (``Parser.parse_delta``: content,
``auto``, ``required`` through vLLM's JSON schema of the tools, the arguments left unstreamed at the
end), turns the answer into content and tool calls. The calls are written into the request's text
stream as Hermes blocks (:class:`~breakwater.engines.upstream_chunks.ToolCallWriter`, as the
``openai`` engine writes its upstream's), which the gateway parses back: the stream stays text, so
every delivery guarantee is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import orjson

from breakwater.engines.upstream_chunks import ToolCallWriter, take_choice, upstream_message


def check_parser(name: str) -> None:
    """ValueError naming vLLM's tool parsers when ``name`` is not one (before the model loads)."""
    from vllm.tool_parsers import ToolParserManager

    known = ToolParserManager.list_registered()
    if name not in known:
        raise ValueError(f"unknown vLLM tool parser {name!r} (vLLM has: {', '.join(known)})")


def parser_class(name: str, tokenizer: Any, model: str) -> Any:
    """vLLM's composed parser class for tool parser ``name``, checked against the tokenizer."""
    from vllm.parser import ParserManager

    return ParserManager.get_parser(
        tool_parser_name=name, enable_auto_tools=True, model_name=model, tokenizer=tokenizer
    )


def template_messages(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """A record's messages as chat templates take them: an assistant turn's ``tool_calls`` as a list
    whose arguments are objects (as vLLM's server gives Hugging Face templates), content None there;
    ``developer`` as ``system``."""
    out = []
    for message in map(upstream_message, messages):
        if message.get("role") == "developer":  # OpenAI's newer name for it; templates know `system`
            message = {**message, "role": "system"}
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_with_object_arguments(c) for c in calls]}
        out.append(message)
    return out


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        with contextlib.suppress(orjson.JSONDecodeError):  # else the template shows the text it is
            fn["arguments"] = orjson.loads(args) if args else {}
    return {**call, "function": fn}


class ToolParsing:
    """One request's answer through vLLM's parser: built from the record's messages and the tools the
    gateway passed on (``{"tools", "tool_choice", "parallel_tool_calls"}``)."""

    def __init__(
        self,
        parser_cls: Any,
        tokenizer: Any,
        model: str,
        messages: list[dict[str, str]],
        passed: dict[str, Any],
    ) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls

        request = ChatCompletionRequest(
            model=model,
            messages=[upstream_message(m) for m in messages],
            tools=passed.get("tools"),
            tool_choice=passed.get("tool_choice") or "auto",
            parallel_tool_calls=passed.get("parallel_tool_calls", True),
        )
        self._parser = parser_cls(tokenizer, request.tools)
        # The parser's own adjustments, as vLLM's server makes them: for `required`, the JSON schema of
        # the tools as a structured output; for formats whose tags are special tokens, keep them.
        self.request = self._parser.adjust_request(request)
        self._writer = ToolCallWriter()
        # `parallel_tool_calls: false`: only the first call, as vLLM's server filters each delta.
        self._first_call_only = maybe_filter_parallel_tool_calls

    @property
    def structured_outputs(self) -> Any:
        return self.request.structured_outputs

    @property
    def skip_special_tokens(self) -> bool:
        return bool(self.request.skip_special_tokens)

    def feed(self, text: str, token_ids: Sequence[int], prompt_ids: list[int], finished: bool) -> str:
        """One step of the answer in, the text to emit out: content as it is, calls as Hermes blocks."""
        delta = self._parser.parse_delta(
            delta_text=text,
            delta_token_ids=list(token_ids),
            request=self.request,
            prompt_token_ids=prompt_ids,
            finished=finished,
        )
        if delta is not None:
            delta = self._first_call_only(delta, self.request)
        choice: dict[str, Any] = {"delta": delta.model_dump(exclude_none=True) if delta is not None else {}}
        if finished:
            choice["finish_reason"] = "stop"  # closes an open call; the engine reports vLLM's own reason
        parts: list[str] = []
        take_choice(choice, True, parts, None, self._writer)
        self._writer.tags()  # the engine counts vLLM's tokens, not these pieces
        return "".join(parts)
