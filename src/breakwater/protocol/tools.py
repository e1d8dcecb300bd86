"""Tool calling: OpenAI's ``tools`` / ``tool_choice`` as a forced, grammar-constrained call.

A request that names a function in ``tool_choice`` (or says ``required`` with one tool) gets exactly
one call to it: the engine generates the call's arguments under a grammar built from the function's
``parameters`` schema (structured outputs, :mod:`breakwater.protocol.formats`), and the gateway
renders that text as ``message.tool_calls`` (streamed as ``delta.tool_calls[0].function.arguments``
in pieces) with ``finish_reason: "tool_calls"``. ``tool_choice: "none"`` answers in text.
``auto`` (and ``required`` with several tools) leaves the decision to the model, in its family's
tool-call format (:class:`AutoCalls`, :mod:`breakwater.protocol.toolformats`); a model whose workers
publish no format refuses it by name. For a forced call, earlier turns (assistant ``tool_calls``,
``tool`` messages) are rendered into the conversation as text, so any chat template shows them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from breakwater.protocol import toolformats
from breakwater.protocol.formats import FormatError, OutputFormat, only_known, parse_response_format
from breakwater.protocol.schema_check import (
    ENFORCED,
    MAX_DEPTH,
    refers_to_root,
    retargeted,
    too_deep,
    unenforced,
)

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ForcedCall:
    """The one function call a request must make."""

    name: str
    description: str
    parameters: dict[str, Any]

    def output_format(self) -> OutputFormat:
        # Strict: the arguments must follow the function's schema (an upstream enforces it so).
        fmt = parse_response_format(
            {
                "type": "json_schema",
                "json_schema": {"name": self.name, "schema": self.parameters, "strict": True},
            },
            every_keyword=False,  # checked where a grammar enforces it (check_enforced)
        )
        if fmt is None:  # json_schema always gives a format
            raise FormatError("no format for the tool call", "tools")
        return fmt

    def check_enforced(self) -> None:
        """Refuses (``tools``) parameters that use a keyword the grammar of the call would pass over."""
        passed_over = unenforced(self.parameters)
        if passed_over is not None:
            raise FormatError(
                f"the parameters of `{self.name}` use {passed_over}, which this server cannot enforce "
                f"in a call's arguments (it enforces {ENFORCED}); leave it out and check it in your code",
                "tools",
                "invalid_function_parameters",
            )

    def instruction(self) -> dict[str, str]:
        """A system message telling the model which function it calls and what it does."""
        about = f": {self.description}" if self.description else ""
        schema = orjson.dumps(self.parameters).decode()
        return {
            "role": "system",
            "content": f"Call the function `{self.name}`{about}. Reply with only its arguments as a JSON "
            f"object matching this schema: {schema}",
        }


@dataclass(frozen=True, slots=True)
class AutoCalls:
    """The model decides whether (``required``: at least once) and what to call, in format ``fmt``."""

    functions: tuple[ForcedCall, ...]
    fmt: str
    required: bool
    parallel: bool

    def system(self, text: str) -> dict[str, str]:
        """The system message: the tools in the model's format, with the client's system ``text``."""
        tools = [
            {
                "type": "function",
                "function": {"name": f.name, "description": f.description, "parameters": f.parameters},
            }
            for f in self.functions
        ]
        return {
            "role": "system",
            "content": toolformats.system_prompt(self.fmt, tools, text, single=not self.parallel),
        }

    @property
    def tool_format(self) -> str:
        """The request's tool format (its record's ``tool_format``): ``fmt``, marked when the answer
        may call one function only."""
        return self.fmt if self.parallel else self.fmt + toolformats.ONE_CALL

    def passed_through(self, tools: Any, tool_choice: Any) -> str:
        """What the upstream gets (format ``openai``): the client's tools and choice, as JSON."""
        choice = tool_choice if tool_choice is not None else "auto"
        return orjson.dumps(
            {"tools": tools, "tool_choice": choice, "parallel_tool_calls": self.parallel}
        ).decode()

    def output_format(self, grammar: bool) -> OutputFormat | None:
        """The grammar that admits only calls of these functions (SmolLM2's format, on an engine that
        takes a grammar), or, unless ``required``, a text reply instead; None: the answer is free and
        parsed as it comes."""
        if self.fmt != "smollm2" or not grammar:
            return None
        for function in self.functions:
            function.check_enforced()
        defs: dict[str, Any] = {}
        try:
            one_of = self._calls(defs)
        except (TypeError, AttributeError, ValueError) as exc:  # parameters malformed where moved
            raise FormatError(f"the tools' parameters are no JSON Schema: {exc}", "tools") from exc
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": one_of}}
        if defs:
            schema["$defs"] = defs
        schema["minItems"] = 1 if self.required else 0
        if not self.parallel:
            schema["maxItems"] = 1
        return self._format(schema)

    def _calls(self, defs: dict[str, Any]) -> list[dict[str, Any]]:
        """Each function's call as a schema, its definitions moved into ``defs``."""
        return [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": _hoisted(f.parameters, f"f{i}", defs)},
                "required": ["name", "arguments"],
            }
            for i, f in enumerate(self.functions)
        ]

    def _format(self, schema: dict[str, Any]) -> OutputFormat:
        fmt = OutputFormat(
            "json_schema",
            orjson.dumps(schema).decode(),
            "tool_calls",
            toolformats.OPEN,
            toolformats.CLOSE,
            text_answer=not self.required,
        )
        try:
            fmt.grammar()
        except Exception as exc:  # the converter asserts on what it cannot express
            raise FormatError(f"the tools' parameters cannot be enforced: {exc}", "tools") from exc
        return fmt


def _hoisted(parameters: dict[str, Any], tag: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters placed inside the calls' schema: its ``$defs`` (or ``definitions``)
    moved to the root's, named ``<tag>-defs-<name>``, and its references (``#/$defs/X``, ``#`` itself)
    pointed at them; they pointed at a root that no longer held them (a pydantic tool with a nested
    model or an enum was refused)."""
    own = {**(parameters.get("definitions") or {}), **(parameters.get("$defs") or {})}
    if not own and not refers_to_root(parameters):
        return parameters
    body = {k: v for k, v in parameters.items() if k not in ("$defs", "definitions")}

    def moved(value: Any) -> Any:
        return retargeted(value, lambda name: f"{tag}-defs-{name}", tag)

    defs.update({f"{tag}-defs-{name}": moved(schema) for name, schema in own.items()})
    defs[tag] = moved(body)
    return {"$ref": f"#/$defs/{tag}"}


def tool_plan(
    tools: Any, tool_choice: Any, *, parallel: bool = True, fmt: str = "", grammar: bool = False
) -> ForcedCall | AutoCalls | None:
    """What ``tools`` + ``tool_choice`` ask for on a model with tool-call format ``fmt`` (whose
    engines take a grammar when ``grammar``): a forced call, the model's choice, or text (None).
    Raises :class:`FormatError` naming the parameter for what is malformed or not served."""
    if tools is None or tools == []:
        # As vLLM: `auto` asks the model to choose among tools, so it needs the list (an empty one
        # is a list); `none` asks for none. OpenAI refuses both without tools.
        if tool_choice not in (None, "none", "auto") or (tool_choice == "auto" and tools is None):
            raise FormatError(f"`tool_choice: {_shown(tool_choice)}` needs `tools`", "tool_choice")
        return None
    functions = _functions(tools)
    if tool_choice == "none":
        return None
    required = tool_choice == "required"
    if required and len(functions) == 1:
        return next(iter(functions.values()))
    if tool_choice is None or tool_choice == "auto" or required:
        if not fmt:
            raise FormatError(
                "`tool_choice: auto` (the default with `tools`) needs a model whose workers know its "
                "tool-call format (`tool_format:<name>` in its `features`, /v1/models); "
                'name the function instead (`{"type": "function", "function": {"name": ...}}`)',
                "tool_choice",
                "unsupported_parameter",
            )
        if required and not ((fmt == "smollm2" and grammar) or fmt == toolformats.PASS_THROUGH):
            raise FormatError(
                "`tool_choice: required` with several tools needs an engine that enforces the model's "
                "tool-call format; name the function instead",
                "tool_choice",
                "unsupported_parameter",
            )
        return AutoCalls(tuple(functions.values()), fmt, required, parallel)
    if (
        isinstance(tool_choice, dict)
        and tool_choice.get("type") == "function"
        and isinstance(tool_choice.get("function"), dict)
    ):
        name = tool_choice["function"].get("name")
        if name not in functions:
            raise FormatError(f"`tool_choice` names `{name}`, which is not in `tools`", "tool_choice")
        return functions[name]
    if isinstance(tool_choice, dict) and tool_choice.get("type") in ("allowed_tools", "custom"):
        raise FormatError(
            f"`tool_choice` of type `{tool_choice['type']}` is not supported: use `auto`, `required` or a "
            "named function",
            "tool_choice",
            "unsupported_parameter",
        )
    raise FormatError("`tool_choice` must be `none`, `auto`, `required` or a named function", "tool_choice")


def _shown(tool_choice: Any) -> str:
    return tool_choice if isinstance(tool_choice, str) else "a function"


def _functions(tools: Any) -> dict[str, ForcedCall]:
    if not isinstance(tools, list) or len(tools) > 128:
        raise FormatError("`tools` must be a list of at most 128 tools", "tools")
    out: dict[str, ForcedCall] = {}
    for i, tool in enumerate(tools):
        call = _function(tool, i)
        if call.name in out:
            raise FormatError(f"two tools are named `{call.name}`", f"tools[{i}].function.name")
        out[call.name] = call
    return out


def _function(tool: Any, i: int) -> ForcedCall:
    """The function tool ``tools[i]``, checked."""
    fn = tool.get("function") if isinstance(tool, dict) else None
    if isinstance(tool, dict) and tool.get("type") == "custom":
        raise FormatError(
            "`custom` tools are not supported: use `function` tools",
            f"tools[{i}]",
            "unsupported_parameter",
        )
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
        raise FormatError("only `function` tools are supported", f"tools[{i}]")
    only_known(tool, ("type", "function"), f"tools[{i}]")
    only_known(fn, ("name", "description", "parameters", "strict"), f"tools[{i}].function")
    name, description = fn.get("name"), fn.get("description", "")
    if not isinstance(name, str) or not NAME.match(name):
        raise FormatError("a function name is 1-64 letters, digits, _ or -", f"tools[{i}].function.name")
    if not isinstance(description, str):
        raise FormatError("`description` must be a string", f"tools[{i}].function.description")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise FormatError("`strict` must be a boolean", f"tools[{i}].function.strict")
    parameters = fn.get("parameters", EMPTY_PARAMETERS)
    if not isinstance(parameters, dict):
        raise FormatError("`parameters` must be a JSON Schema object", f"tools[{i}].function.parameters")
    if too_deep(parameters):
        raise FormatError(
            f"`parameters` nests more than {MAX_DEPTH} levels deep", f"tools[{i}].function.parameters"
        )
    if parameters and parameters.get("type") != "object":  # a call's arguments are an object
        raise FormatError(
            f'`parameters` of `{name}` must be a JSON Schema of `type: "object"`, got '
            f"`type: {orjson.dumps(parameters.get('type')).decode()}`",
            f"tools[{i}].function.parameters",
            "invalid_function_parameters",
        )
    call = ForcedCall(name, description, parameters)
    try:
        call.output_format()
    except FormatError as exc:  # said of what the client sent: the function's parameters
        said = str(exc).replace("`json_schema.schema`", f"the parameters of `{name}`")
        raise FormatError(said, f"tools[{i}].function.parameters", "invalid_function_parameters") from None
    return call


def call_id(rid: str) -> str:
    """The tool call's id: stable for a request, so a resumed stream repeats it; a choice of an
    ``n > 1`` request (``<parent>-<index>``) gets its own."""
    base, _, index = rid.split("-", 1)[-1].partition("-")
    return "call_" + base[:24] + (f"_{index}" if index else "")


def rendered_calls(tool_calls: Any, fmt: str = "") -> str:
    """An assistant turn's earlier tool calls as text the model can read: in its tool-call format
    ``fmt`` when it has one, else as a JSON list."""
    if not isinstance(tool_calls, list):
        raise FormatError("`tool_calls` must be a list", "messages")
    calls: list[tuple[str, Any]] = []
    for call in tool_calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise FormatError("each tool call needs `function.name`", "messages")
        calls.append((fn["name"], fn.get("arguments", "")))
    if fmt:
        return toolformats.rendered_calls(fmt, [(name, _arguments(args)) for name, args in calls])
    return orjson.dumps([{"name": name, "arguments": args} for name, args in calls]).decode()


def _arguments(arguments: Any) -> Any:
    """A call's arguments as an object (OpenAI sends them as JSON text)."""
    if isinstance(arguments, str):
        try:
            return orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments
    return arguments
