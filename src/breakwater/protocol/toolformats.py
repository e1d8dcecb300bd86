"""Tool calling where the model decides (``tool_choice: auto``), in its family's own format.

A worker says which format its model was trained on (setting ``tool_format``; the bundled SmolLM2 is
recognised by its file name) and publishes it as the feature ``tool_format:<name>``. The gateway
renders the request's tools into the system prompt in that format, earlier calls and tool results
into the conversation, and parses the answer back into ``tool_calls`` (:class:`CallParser`, the same
on a stream and on a whole answer). A format whose answers a grammar can describe (SmolLM2's: a
list of calls, or under ``auto`` a text reply instead) is *enforced* on engines that take a grammar,
so its calls always parse and their arguments validate.

- ``smollm2`` (SmolLM2's chat template): the answer is ``<tool_call>[{"name": ..., "arguments":
  {...}}, ...]</tool_call>`` (an empty list means no call) or, where the model decides, text.
- ``hermes`` (Hermes 2/3, Qwen 2.5/3 and most families trained on Hermes data): free text with
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.
- ``openai`` (an OpenAI-compatible upstream): the tools, the choice and the history go to the
  upstream as they came; the engine writes the upstream's ``tool_calls`` back as Hermes blocks.

A block that does not parse as calls is returned as text, as vLLM's parsers do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FORMATS = ("smollm2", "hermes", "openai")
PASS_THROUGH = "openai"
# A request's tool format with this suffix (``hermes/1``): ``parallel_tool_calls: false``, so the
# answer's first call is its only one (a later one the model writes anyway is dropped, as vLLM does).
ONE_CALL = "/1"
# The `openai` engine writes its upstream's own calls between these (PASS_THROUGH): U+E000, a
# private-use character, is never left in the upstream's text nor in a call's arguments (the engine
# replaces it), so text the upstream sent as content is never taken for a call (a document the model
# echoed could make one), nor do arguments holding `</tool_call>` end their block early.
MARK = "\ue000"
PASSED = (MARK + OPEN, CLOSE + MARK)
FEATURE_PREFIX = "tool_format:"

SMOLLM2_SYSTEM = (
    "You are an expert in composing functions. You are given a question and a set of possible "
    "functions.\nBased on the question, you will need to make one or more function/tool calls to "
    "achieve the purpose.\nIf none of the functions can be used, point it out and refuse to answer.\n"
    "If the given question lacks the parameters required by the function, also point it out.\n"
    "You have access to the following tools:\n<tools>{tools}</tools>\n"
    "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
    "The example format is as follows. Please make sure the parameter type is correct. If no function "
    "call is needed, please make the tool calls an empty list '[]'.\n<tool_call>[\n"
    '{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
    "(more tool calls as required)\n]</tool_call>"
)
SINGLE_NOTE = "Call at most one function in your answer."
HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def tool_format_of(features: frozenset[str] | set[str]) -> str:
    """The tool-call format a model's workers share ('' when none, or when they disagree)."""
    found = {f.removeprefix(FEATURE_PREFIX) for f in features if f.startswith(FEATURE_PREFIX)}
    return found.pop() if len(found) == 1 else ""


def tags_of(tool_format: str) -> tuple[str, str]:
    """The tags a request's calls are written between in its text (:data:`PASSED` for an upstream's)."""
    return PASSED if tool_format.removesuffix(ONE_CALL) == PASS_THROUGH else (OPEN, CLOSE)


def single_call(tool_format: str) -> bool:
    """Whether a request's tool format allows one call only (:data:`ONE_CALL`)."""
    return tool_format.endswith(ONE_CALL)


def system_prompt(fmt: str, tools: list[dict[str, Any]], system: str = "", single: bool = False) -> str:
    """The system message that shows ``tools`` (OpenAI ``function`` objects) in format ``fmt``,
    with the client's own system text (if any) after SmolLM2's prompt or before Hermes' section.
    ``single``: the model is told to call at most one function."""
    if fmt == "smollm2":
        prompt = SMOLLM2_SYSTEM.format(tools=orjson.dumps(tools).decode())
        prompt = f"{prompt}\n{SINGLE_NOTE}" if single else prompt
        return f"{prompt}\n{system}" if system else prompt
    section = HERMES_SYSTEM.format(tools="\n".join(orjson.dumps(t).decode() for t in tools))
    section = f"{section}\n\n{SINGLE_NOTE}" if single else section
    return f"{system}\n\n{section}" if system else section


def rendered_calls(fmt: str, calls: list[tuple[str, Any]]) -> str:
    """An assistant turn's calls ((name, arguments object)) as the model writes them."""
    objects = [{"name": name, "arguments": args} for name, args in calls]
    if fmt == "smollm2":
        return OPEN + orjson.dumps(objects).decode() + CLOSE
    return "\n".join(f"{OPEN}\n{orjson.dumps(o).decode()}\n{CLOSE}" for o in objects)


def rendered_result(content: str) -> dict[str, str]:
    """A ``tool`` message as both formats' templates show it: a user turn in ``<tool_response>``."""
    return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text


Piece = str | ParsedCall


class CallParser:
    """Splits an answer, fed in any pieces, into text and calls. Text that may be the start of a
    ``<tool_call>`` tag is held back until it is known not to be one. ``single``: calls after the
    first are dropped (``parallel_tool_calls: false``)."""

    __slots__ = ("_buf", "_called", "_close", "_inside", "_open", "_single")

    def __init__(self, single: bool = False, tags: tuple[str, str] = (OPEN, CLOSE)) -> None:
        self._buf = ""
        self._inside = False
        self._single = single
        self._called = False
        self._open, self._close = tags

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while True:
            if not self._inside:
                start = self._buf.find(self._open)
                if start < 0:
                    keep = _partial_suffix(self._buf, self._open)
                    if len(self._buf) > keep:
                        out.append(self._buf[: len(self._buf) - keep])
                        self._buf = self._buf[len(self._buf) - keep :]
                    return out
                if start:
                    out.append(self._buf[:start])
                self._buf = self._buf[start + len(self._open) :]
                self._inside = True
            else:
                end = self._buf.find(self._close)
                if end < 0:
                    return out
                block, self._buf = self._buf[:end], self._buf[end + len(self._close) :]
                self._inside = False
                calls = parse_block(block)
                if calls is None:
                    out.append(OPEN + block + CLOSE)  # (as text: never a pass-through's marks)
                else:
                    out.extend(self._taken(calls))

    def _taken(self, calls: list[ParsedCall]) -> list[ParsedCall]:
        if not self._single:
            return calls
        taken = calls[:0] if self._called else calls[:1]
        self._called = self._called or bool(calls)  # `[]`: no call made
        return taken

    def finish(self) -> list[Piece]:
        """What is held back at the end: an unfinished tag is text; a block never closed (the answer
        cut by ``max_tokens``) gives the calls it finished, and its markup is never text."""
        if self._inside:
            block, self._buf, self._inside = self._buf, "", False
            calls = _finished_calls(block)
            if not calls and not block.lstrip().startswith(("{", "[")):  # prose that named the tag
                return [OPEN + block]
            return list(self._taken(calls))
        rest, self._buf = self._buf, ""
        return [rest] if rest else []


def _finished_calls(block: str) -> list[ParsedCall]:
    """The calls a block cut short had finished: its whole call objects, in order, up to the first
    that is cut (or is no call)."""
    text, at = block.strip().removeprefix("["), 0
    calls: list[ParsedCall] = []
    decoder = json.JSONDecoder()
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        try:
            item, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):  # cut short, not JSON, or nested past the parser
            return calls
        call = _as_call(item)
        if call is None:
            return calls
        calls.append(call)


def parse_block(block: str) -> list[ParsedCall] | None:
    """A ``<tool_call>`` block's calls: one object or a list of them; None when it is not calls."""
    try:
        data = orjson.loads(block.strip())
    except orjson.JSONDecodeError:
        return None
    calls = [_as_call(item) for item in (data if isinstance(data, list) else [data])]
    return None if None in calls else [call for call in calls if call is not None]


def _as_call(item: Any) -> ParsedCall | None:
    """One call object of a block (``name`` and ``arguments``); None when it is not one."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = orjson.loads(args)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(item["name"], orjson.dumps(args).decode())


def split_answer(
    text: str, single: bool = False, tags: tuple[str, str] = (OPEN, CLOSE)
) -> tuple[str, list[ParsedCall]]:
    """A whole answer's text (outside calls) and calls (``single``: the first only)."""
    parser = CallParser(single, tags)
    pieces = [*parser.feed(text), *parser.finish()]
    return "".join(p for p in pieces if isinstance(p, str)), [p for p in pieces if isinstance(p, ParsedCall)]


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
