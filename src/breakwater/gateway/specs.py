"""The request's spec from its OpenAI body: sampling, output constraints, tool plans, the model's
features (what its engines can do), and the prompt text its limits are estimated from."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import orjson

from breakwater.broker import RequestSpec
from breakwater.engines.base import EMBEDDINGS, GRAMMAR, LOGIT_BIAS, LOGPROBS, PENALTIES, RESPONSE_FORMAT
from breakwater.gateway.errors import APIError
from breakwater.gateway.models import ModelInfo
from breakwater.protocol import toolformats
from breakwater.protocol.embeddings import EmbeddingRequest
from breakwater.protocol.formats import FormatError, parse_response_format
from breakwater.protocol.messages import ChatMessage
from breakwater.protocol.openai import ChatCompletionRequest, CompletionRequest
from breakwater.protocol.toolformats import PASS_THROUGH, tool_format_of
from breakwater.protocol.tools import AutoCalls, ForcedCall, rendered_calls, tool_plan
from breakwater.tenancy import ANONYMOUS, Principal

Body = ChatCompletionRequest | CompletionRequest | EmbeddingRequest
# The default `timeout` of the requests the current task submits, where it is not the gateway's
# `request_timeout_s`: the batch runner sets `batch_timeout_s` for a line's (gateway.batch_runner).
default_timeout_var: ContextVar[float | None] = ContextVar("default_timeout", default=None)


def request_spec(
    body: Body,
    *,
    request_id: str,
    default_timeout_s: float,
    principal: Principal = ANONYMOUS,
    choices: int = 1,
    prompts: int = 1,
    model: ModelInfo | None = None,
    auto_tools: bool = True,
) -> RequestSpec:
    """The record's request part for an OpenAI body sent by ``principal`` (one of ``choices``, for
    one of ``prompts``), for
    ``model`` (its tool-call format and whether its engines take a grammar); ``auto_tools``: the
    surface can render the model's own tool calls (not the WebSocket's raw tokens). Without a
    ``timeout`` of its own it may wait ``default_timeout_s``, or what its submitter set in
    :data:`default_timeout_var` (a Batch API line's: the batch's window)."""
    key = principal.key
    default_timeout_s = default_timeout_var.get() or default_timeout_s
    owner: dict[str, Any] = {
        "model": body.model,
        "lane": key.lane if key is not None and key.lane else body.lane,
        "tenant": principal.tenant,
        "key_id": principal.key_id,
        "limit_id": "" if principal.limit_id == principal.key_id else principal.limit_id,
        "request_id": request_id,
        "timeout_s": body.timeout if body.timeout is not None else default_timeout_s,
        "choices": choices,
        "prompts": prompts,
    }
    if isinstance(body, EmbeddingRequest):
        return RequestSpec(kind="embedding", inputs=body.inputs(), max_tokens=0, **owner)
    common: dict[str, Any] = {
        **owner,
        "logprobs": body.logprobs_top(),
        "max_tokens": body.output_limit(),
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": None if body.top_k is None else max(body.top_k, 0),  # vLLM's -1: all, as 0
        "seed": body.seed,
        "stop": body.stop_list(),
        "ignore_eos": body.ignore_eos,
        "include_usage": body.include_usage(),
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "logit_bias": orjson.dumps(biases, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS).decode()
        if (biases := body.token_biases())
        else "",
    }
    if isinstance(body, ChatCompletionRequest):
        features = model.features if model is not None else frozenset()
        return _chat_spec(body, common, tool_format_of(features), GRAMMAR in features, auto_tools)
    return RequestSpec(kind="completion", prompt=body.prompt_text(), **common)


def _chat_spec(
    body: ChatCompletionRequest, common: dict[str, Any], fmt: str, grammar: bool, auto_tools: bool = True
) -> RequestSpec:
    """A chat's spec: a forced tool call or a response_format become the output's constraint; with
    ``tool_choice: auto`` the tools go into the system prompt in the model's format ``fmt`` (where
    ``auto_tools``: not on the WebSocket)."""
    try:
        plan = tool_plan(
            body.tools,
            body.tool_choice,
            parallel=body.parallel_tool_calls is not False,
            fmt=fmt,
            grammar=grammar,
        )
        auto = plan if isinstance(plan, AutoCalls) else None
        if auto is not None and not auto_tools:
            raise FormatError(
                "the model's own tool calls (`tool_choice: auto`, the default with `tools`, or `required` "
                "with several) are not served over the WebSocket, whose token events carry the raw text: "
                "name the function, or use HTTP",
                "tool_choice",
                "unsupported_parameter",
            )
        if auto is not None:
            _refuse_with_auto(body)
        passed, out = "", None
        if auto is not None and auto.fmt == PASS_THROUGH:  # the upstream gets tools and history as sent
            messages = [_passed_message(m) for m in body.messages]
            passed = auto.passed_through(body.tools, body.tool_choice)
        elif auto is not None:
            messages = _with_tools(auto, [_message(m, auto.fmt) for m in body.messages])
            out = auto.output_format(grammar)
        elif isinstance(plan, ForcedCall):
            if parse_response_format(body.response_format) is not None:  # the answer is the call
                raise FormatError(
                    "`response_format` cannot be combined with a forced tool call",
                    "response_format",
                    "unsupported_parameter",
                )
            plan.check_enforced()
            messages = [_message(m) for m in body.messages]
            out = plan.output_format()
        else:
            messages = [_message(m) for m in body.messages]
            out = parse_response_format(body.response_format)
    except FormatError as exc:
        code = exc.code or (
            "invalid_response_format" if exc.param.startswith("response_format") else "invalid_value"
        )
        raise APIError(400, str(exc), code=code, param=exc.param) from exc
    if isinstance(plan, ForcedCall):
        messages = [plan.instruction(), *messages]
    return RequestSpec(
        kind="chat",
        messages=messages,
        response_format=out.to_json() if out else "",
        tool_call=plan.name if isinstance(plan, ForcedCall) else "",
        tool_format=auto.tool_format if auto else "",
        tools=passed,
        **common,
    )


def _refuse_with_auto(body: ChatCompletionRequest) -> None:
    """What the model's own tool-call answer cannot be combined with."""
    if parse_response_format(body.response_format) is not None:
        raise FormatError(
            "`response_format` cannot be combined with `tool_choice: auto`",
            "response_format",
            "unsupported_parameter",
        )
    if body.logprobs:
        raise FormatError(
            "`logprobs` cannot be combined with `tool_choice: auto`", "logprobs", "unsupported_parameter"
        )


def _with_tools(auto: AutoCalls, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The tools' system message first, holding the client's own system text (if it sent one)."""
    if messages and messages[0]["role"] in ("system", "developer"):
        return [auto.system(messages[0]["content"]), *messages[1:]]
    return [auto.system(""), *messages]


def _passed_message(message: ChatMessage) -> dict[str, str]:
    """A message for an upstream that takes tools itself: an assistant turn's ``tool_calls`` (as JSON
    text: the record's messages hold strings) and a tool result's ``tool_call_id`` kept."""
    out = {"role": message.role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    extra = message.model_extra or {}
    calls = extra.get("tool_calls")
    if message.role == "assistant" and calls:
        rendered_calls(calls)  # checked: a malformed list is a 400 here, not the upstream's
        out["tool_calls"] = orjson.dumps(calls).decode()
    if message.role == "tool" and isinstance(extra.get("tool_call_id"), str):
        out["tool_call_id"] = extra["tool_call_id"]
    return out


def _message(message: ChatMessage, fmt: str = "") -> dict[str, str]:
    """A message as the engine's chat template sees it. Earlier tool calls and results: in the
    model's tool-call format ``fmt`` when there is one, else as text. OpenAI's ``developer`` role is
    the ``system`` role of models before it (no chat template knows it); a participant's ``name`` goes
    with its message (templates that know names render it)."""
    text = message.text()
    calls = (message.model_extra or {}).get("tool_calls")
    if fmt and message.role == "tool":
        return toolformats.rendered_result(text)
    if message.role == "assistant" and calls:
        shown = rendered_calls(calls, fmt)
        text = f"{text}\n{shown}" if text else shown
    out = {"role": "system" if message.role == "developer" else message.role, "content": text}
    if message.name is not None:
        out["name"] = message.name
    return out


def check_features(spec: RequestSpec, model: ModelInfo, dimensions: int | None = None) -> None:
    """Refuse what the model's live workers cannot do (with none live, the worker that starts decides).
    ``dimensions``: an embedding request's; more than the model's embeddings have is refused here,
    before anything is computed and metered, where the workers say their width."""
    if spec.kind == "embedding" and model.workers and EMBEDDINGS not in model.features:
        raise APIError(
            400,
            f"`{model.name}` does not compute embeddings (its engine cannot); see `features` in /v1/models",
            code="unsupported_model",
            param="model",
        )
    if dimensions is not None and model.workers and 0 < model.embedding_dim < dimensions:
        raise APIError(
            400,
            f"`dimensions` is {dimensions}; this model's embeddings have {model.embedding_dim}",
            code="invalid_value",
            param="dimensions",
        )
    if spec.logprobs >= 0 and model.workers and LOGPROBS not in model.features:
        raise APIError(
            400,
            f"`logprobs` is not supported by the engine serving `{model.name}`",
            code="unsupported_parameter",
            param="logprobs",
        )
    _check_sampling(spec, model)
    if spec.response_format and model.workers and RESPONSE_FORMAT not in model.features:
        param = "tool_choice" if spec.tool_call else "response_format"  # a forced call is constrained too
        raise APIError(
            400,
            f"`{param}` is not supported by the engine serving `{model.name}` (it cannot constrain output)",
            code="unsupported_parameter",
            param=param,
        )


def prompt_text(spec: RequestSpec) -> str:
    if spec.inputs is not None:
        return "\n".join(spec.inputs)
    if spec.messages is not None:  # with passed-through tools, their schemas and calls are prompt too
        said = (m.get(k, "") for m in spec.messages for k in ("name", "content", "tool_calls"))
        return "\n".join([*(text for text in said if text), *([spec.tools] if spec.tools else [])])
    return spec.prompt or ""


def _check_sampling(spec: RequestSpec, model: ModelInfo) -> None:
    """Penalties and ``logit_bias`` where the model's live workers cannot apply them; a biased token
    the model's vocabulary does not have."""
    if not model.workers:
        return
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(spec, name) and PENALTIES not in model.features:
            raise APIError(
                400,
                f"`{name}` is not supported by the engine serving `{model.name}`",
                code="unsupported_parameter",
                param=name,
            )
    if not spec.logit_bias:
        return
    if LOGIT_BIAS not in model.features:
        raise APIError(
            400,
            f"`logit_bias` is not supported by the engine serving `{model.name}`",
            code="unsupported_parameter",
            param="logit_bias",
        )
    vocab = model.vocab_size
    unknown = [t for t in orjson.loads(spec.logit_bias) if vocab and int(t) >= vocab]
    if unknown:
        raise APIError(
            400,
            f"`logit_bias` names token {unknown[0]}; `{model.name}` has {vocab} (ids 0 to {vocab - 1})",
            code="invalid_value",
            param="logit_bias",
        )
