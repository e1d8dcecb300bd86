"""Admission: validate a request against its model, bind its Idempotency-Key, queue it (or 429)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import replace
from typing import Any

import orjson

from breakwater.broker import Broker, RequestRecord, RequestSpec
from breakwater.broker.fanin import Fanin, Subscription
from breakwater.broker.idempotency import IdempotencyKey, body_digest
from breakwater.config import GatewaySettings
from breakwater.engines.base import EMBEDDINGS, GRAMMAR, LOGPROBS, RESPONSE_FORMAT
from breakwater.gateway.autoscale import AutoscaleSignals, retry_after_s
from breakwater.gateway.cache import (
    BYPASSED,
    DEFAULT_CONTROL,
    HEADER,
    CacheControl,
    CacheEntry,
    Lookup,
    Outcome,
    ResponseCache,
)
from breakwater.gateway.errors import APIError
from breakwater.gateway.following import Submission
from breakwater.gateway.limits import limits_of, rate_headers, refusal, reserve, too_large
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.models import ModelInfo, ModelRegistry
from breakwater.protocol import toolformats
from breakwater.protocol.embeddings import EmbeddingRequest
from breakwater.protocol.formats import FormatError, parse_response_format
from breakwater.protocol.openai import ChatCompletionRequest, ChatMessage, CompletionRequest
from breakwater.protocol.toolformats import PASS_THROUGH, tool_format_of
from breakwater.protocol.tools import AutoCalls, ForcedCall, rendered_calls, tool_plan
from breakwater.tenancy import ANONYMOUS, Principal
from breakwater.tenancy.limits import Limits

log = logging.getLogger(__name__)

# A lower bound on tokens from UTF-8 bytes: real tokenizers average 3-5 bytes per token, so a
# prompt refused by this estimate certainly cannot fit; the worker checks exactly.
BYTES_PER_TOKEN_BOUND = 6

Body = ChatCompletionRequest | CompletionRequest | EmbeddingRequest
RID_PREFIX = {"chat": "chatcmpl", "completion": "cmpl", "embedding": "embd"}


def new_rid(kind: str) -> str:
    return f"{RID_PREFIX[kind]}-{uuid.uuid4().hex}"


def request_spec(
    body: Body,
    *,
    request_id: str,
    default_timeout_s: float,
    principal: Principal = ANONYMOUS,
    choices: int = 1,
    model: ModelInfo | None = None,
    auto_tools: bool = True,
) -> RequestSpec:
    """The record's request part for an OpenAI body sent by ``principal`` (one of ``choices``), for
    ``model`` (its tool-call format and whether its engines take a grammar); ``auto_tools``: the
    surface can render the model's own tool calls (not the WebSocket's raw tokens)."""
    key = principal.key
    owner: dict[str, Any] = {
        "model": body.model,
        "lane": key.lane if key is not None and key.lane else body.lane,
        "tenant": principal.tenant,
        "key_id": principal.key_id,
        "request_id": request_id,
        "timeout_s": body.timeout if body.timeout is not None else default_timeout_s,
        "choices": choices,
    }
    if isinstance(body, EmbeddingRequest):
        return RequestSpec(kind="embedding", inputs=body.inputs(), max_tokens=0, **owner)
    top_k = (body.model_extra or {}).get("top_k")
    common: dict[str, Any] = {
        **owner,
        "logprobs": body.logprobs_top(),
        "max_tokens": body.output_limit(),
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": top_k if isinstance(top_k, int) and not isinstance(top_k, bool) else None,
        "seed": body.seed,
        "stop": body.stop_list(),
        "ignore_eos": body.ignore_eos,
        "include_usage": body.include_usage(),
    }
    if isinstance(body, ChatCompletionRequest):
        features = model.features if model is not None else frozenset()
        fmt = tool_format_of(features) if auto_tools else ""
        return _chat_spec(body, common, fmt, GRAMMAR in features)
    return RequestSpec(kind="completion", prompt=body.prompt_text(), **common)


def _chat_spec(body: ChatCompletionRequest, common: dict[str, Any], fmt: str, grammar: bool) -> RequestSpec:
    """A chat's spec: a forced tool call or a response_format become the output's constraint; with
    ``tool_choice: auto`` the tools go into the system prompt in the model's format ``fmt``."""
    try:
        plan = tool_plan(
            body.tools,
            body.tool_choice,
            parallel=body.parallel_tool_calls is not False,
            fmt=fmt,
            grammar=grammar,
        )
        auto = plan if isinstance(plan, AutoCalls) else None
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
        tool_format=auto.fmt if auto else "",
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
    model's tool-call format ``fmt`` when there is one, else as text."""
    text = message.text()
    calls = (message.model_extra or {}).get("tool_calls")
    if fmt and message.role == "tool":
        return toolformats.rendered_result(text)
    if message.role == "assistant" and calls:
        shown = rendered_calls(calls, fmt)
        text = f"{text}\n{shown}" if text else shown
    return {"role": message.role, "content": text}


def check_features(spec: RequestSpec, model: ModelInfo) -> None:
    """Refuse what the model's live workers cannot do (with none live, the worker that starts decides)."""
    if spec.kind == "embedding" and model.workers and EMBEDDINGS not in model.features:
        raise APIError(
            400,
            f"`{model.name}` does not compute embeddings (its engine cannot); see `features` in /v1/models",
            code="unsupported_model",
            param="model",
        )
    if spec.logprobs >= 0 and model.workers and LOGPROBS not in model.features:
        raise APIError(
            400,
            f"`logprobs` is not supported by the engine serving `{model.name}`",
            code="unsupported_parameter",
            param="logprobs",
        )
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
    if spec.messages is not None:  # with passed-through tools, their schemas are prompt too
        return "\n".join([*(m["content"] for m in spec.messages), *([spec.tools] if spec.tools else [])])
    return spec.prompt or ""


class Admitter:
    def __init__(
        self,
        settings: GatewaySettings,
        broker: Broker,
        fanin: Fanin,
        registry: ModelRegistry,
        signals: AutoscaleSignals,
        metrics: GatewayMetrics,
        *,
        cache_index: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.cache = ResponseCache(settings, broker, cache_index or broker, fanin, metrics)
        self.fanin = fanin
        self.registry = registry
        self.signals = signals
        self.metrics = metrics

    async def submit(
        self,
        body: Body,
        *,
        request_id: str,
        idempotency_key: str | None,
        principal: Principal = ANONYMOUS,
        subscribe: bool = True,
        rid: str = "",
        choices: int = 1,
        auto_tools: bool = True,
        digest_of: Body | None = None,
        cache: CacheControl = DEFAULT_CONTROL,
    ) -> Submission:
        """Queue ``body`` as request ``rid`` (new when empty), or follow an identical request's answer
        (gateway.cache); ``choices``: it is one of a request's ``n`` choices (gateway.choices), whose
        Idempotency-Key is bound to ``digest_of`` (the client's whole body)."""
        model = await self.registry.resolve(body.model)
        spec = request_spec(
            body,
            request_id=request_id,
            default_timeout_s=self.settings.request_timeout_s,
            principal=principal,
            choices=choices,
            model=model,
            auto_tools=auto_tools,
        )
        check_features(spec, model)
        prompt = prompt_text(spec)
        longest = max(spec.inputs, key=len) if spec.inputs else prompt  # each input is its own sequence
        self.check_context(longest, spec.max_tokens, model)
        rid = rid or new_rid(spec.kind)
        limits = limits_of(principal.key)
        shared = principal.tenant_limits
        if limits.tpm or limits.budget_day or limits.budget_month or shared.any:
            spec = replace(spec, reserved_tokens=reserve(spec, prompt))
            for lim in (limits, shared):
                if lim.tpm and spec.reserved_tokens > lim.tpm:
                    raise too_large(spec.reserved_tokens, lim)
        # The key lives exactly as long as the request's record: while it answers, so does the key.
        key_ttl_s = math.ceil(spec.timeout_s) + self.settings.result_ttl_s
        idem = None
        if idempotency_key:
            digest = body_digest((digest_of or body).model_dump(mode="json"))
            idem = IdempotencyKey(principal.tenant, idempotency_key, digest)
            found = await self._bind(idem, rid, key_ttl_s, subscribe)
            if found is not None:
                return found
        entry = self.cache.entry(spec, model, principal, cache)
        lookup = await self._look_up(entry, idem, spec, rid, key_ttl_s, principal, subscribe, cache)
        if lookup.found is not None:  # answered by an identical request: not queued, no tokens spent
            return lookup.found
        owned = entry if lookup.bound else None
        self.metrics.cache_requests.labels(body.model, lookup.outcome.value).inc()
        headers: dict[str, str] = {HEADER: lookup.outcome.value}
        if limits.any or shared.any:  # after the Idempotency-Key: a replay is not a new request
            try:
                headers |= await self._within_limits(principal, limits, rid, spec)
            except BaseException:
                await self._abandon(None, idem, rid, principal, Limits(), owned)
                raise
        # SUBSCRIBE is sent before the job is queued, and its confirmation awaited after (the two round
        # trips overlap). Confirmed, it delivers every event; the reader fills any gap from the stream.
        sub = None
        try:
            sub = await self.fanin.open(rid) if subscribe else None
            result = await self.broker.enqueue(
                rid=rid,
                spec=spec,
                max_queued=self.settings.lane_max_queued,
                result_ttl_s=self.settings.result_ttl_s,
                cost=spec.reserved_tokens or reserve(spec, prompt),
                weight=principal.key.weight if principal.key is not None else 1.0,
            )
            if sub is not None and result.accepted and not await self.fanin.confirm(sub):
                log.warning("subscription not confirmed in time; reading the stream", extra={"rid": rid})
                sub.wake()  # the job is queued: follow it from the durable stream instead
        except BaseException:
            await self._abandon(sub, idem, rid, principal, limits, owned)
            raise
        if not result.accepted:
            await self._abandon(sub, idem, rid, principal, limits, owned)
            self.metrics.rejections.labels(body.model, "queue_full").inc()
            retry_after = retry_after_s(result.waiting, self.signals.drain_rate(model.name), model.capacity)
            raise APIError(
                429,
                f"the {body.lane} queue for `{body.model}` is full ({result.waiting} waiting); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(retry_after), "X-Breakwater-Reason": "queue_full"},
            )
        log.info("request queued", extra={"rid": rid, "fields": {"model": body.model, "lane": body.lane}})
        return Submission(
            rid,
            body.model,
            spec.kind == "chat",
            int(time.time()),
            spec.include_usage,
            sub,
            headers=headers,
            tool=spec.tool_call,
            tool_format=spec.tool_format,
        )

    async def _bind(
        self, idem: IdempotencyKey, rid: str, key_ttl_s: int, subscribe: bool
    ) -> Submission | None:
        """Bind the Idempotency-Key to ``rid``; the request it is bound to already, if any (replay)."""
        existing = await self.broker.claim_idempotency_key(idem, rid, key_ttl_s)
        if existing is None:
            return None
        if not idem.matches(existing):
            raise APIError(
                422,
                "This Idempotency-Key was already used with a different request body; "
                "use a new key for a new request.",
                code="idempotency_key_reuse",
                param="Idempotency-Key",
            )
        found = await self._existing(existing.rid, subscribe)
        if found is not None:
            return found
        # Its request expired (or was refused and is being released): this one takes the key.
        if not await self.broker.rebind_idempotency_key(idem, rid, key_ttl_s, was=existing.rid):
            raise _idempotency_conflict()
        return None

    async def _look_up(
        self,
        entry: CacheEntry | None,
        idem: IdempotencyKey | None,
        spec: RequestSpec,
        rid: str,
        key_ttl_s: int,
        principal: Principal,
        subscribe: bool,
        control: CacheControl,
    ) -> Lookup:
        """The response cache's answer for request ``rid`` (gateway.cache)."""
        if entry is None:
            return BYPASSED
        try:
            lookup = await self.cache.look_up(
                entry, rid, spec, ttl_s=key_ttl_s, subscribe=subscribe, control=control
            )
        except BaseException:
            await self._abandon(None, idem, rid, principal, Limits())
            raise
        found = lookup.found
        # The client's Idempotency-Key now names the request that answers it.
        if found is not None and idem is not None:
            rebound = False
            try:
                rebound = await self.broker.rebind_idempotency_key(idem, found.rid, key_ttl_s, was=rid)
            finally:
                if not rebound:
                    await self._abandon(found.subscription, idem, rid, principal, Limits())
                    await self.broker.detach(found.rid, shared=True)
            if not rebound:
                raise _idempotency_conflict()
        return lookup

    async def _within_limits(
        self, principal: Principal, limits: Limits, rid: str, spec: RequestSpec
    ) -> dict[str, str]:
        """The key's (and its tenant's) limits admit this request, else 429; its x-ratelimit-* headers."""
        # A running request leaves the concurrency set when it is metered; this bound only frees the
        # place of one whose worker died (a started job runs past its queue deadline).
        deadline_ms = int((time.time() + spec.timeout_s + self.settings.result_ttl_s) * 1000)
        shared = principal.tenant_limits
        decision = await self.broker.ledger.admit(
            principal.tenant,
            principal.key_id,
            limits,
            rid=rid,
            tokens=spec.reserved_tokens,
            deadline_ms=deadline_ms,
            tenant_limits=shared,
        )
        if not decision.admitted:
            self.metrics.rejections.labels(spec.model, f"rate_limit_{decision.reason}").inc()
            tenant = self.settings.tenant_label(principal.tenant)
            self.metrics.tenant_rejections.labels(tenant, decision.reason).inc()
            raise refusal(limits, decision, shared)
        return rate_headers(limits, decision, shared)

    async def _existing(self, rid: str, subscribe: bool) -> Submission | None:
        """The request an Idempotency-Key is bound to; None when it expired."""
        record = await self._wait_for_record(rid)
        if record is None or not await self.broker.attach(rid):
            return None
        sub = await self.fanin.subscribe(rid) if subscribe else None
        replay = Submission.of(rid, record, sub)
        replay.headers = {HEADER: Outcome.BYPASS.value}  # the key's own request: the cache was not asked
        return replay

    async def _wait_for_record(self, rid: str) -> RequestRecord | None:
        # The first caller may be between binding the key and enqueueing (a few ms): wait briefly.
        deadline = time.monotonic() + 2.0
        while True:
            record = await self.broker.get_record(rid)
            if record is not None or time.monotonic() > deadline:
                return record
            await asyncio.sleep(0.02)

    async def withdraw(
        self, sub: Submission, idempotency_key: str | None, body: Body, principal: Principal
    ) -> None:
        """Take back a queued request (another choice of its group was refused): cancelled, its
        key released, its place in the concurrency limits freed."""
        await self.broker.cancel(sub.rid, self.settings.result_ttl_s, "another choice was refused")
        idem = None
        if idempotency_key:
            digest = body_digest(body.model_dump(mode="json"))
            idem = IdempotencyKey(principal.tenant, idempotency_key, digest)
        await self._abandon(sub.subscription, idem, sub.rid, principal, limits_of(principal.key))

    async def _abandon(
        self,
        sub: Subscription | None,
        idem: IdempotencyKey | None,
        rid: str,
        principal: Principal,
        limits: Limits,
        entry: CacheEntry | None = None,
    ) -> None:
        if sub is not None:
            await self.fanin.unsubscribe(sub)
        if idem is not None:
            await self.broker.release_idempotency_key(idem, rid)
        if entry is not None:
            await self.cache.release(entry, rid)
        if limits.max_concurrent or principal.tenant_limits.max_concurrent:
            await self.broker.ledger.release(principal.tenant, principal.key_id, rid)

    def check_context(self, prompt: str, limit: int | None, model: ModelInfo) -> None:
        # No worker has said (scale to zero, an upstream without max_model_len): use the bound.
        ctx = model.context_length if model.context_length > 0 else self.settings.max_context_tokens
        lower_bound = math.ceil(len(prompt.encode()) / BYTES_PER_TOKEN_BOUND)
        wanted = lower_bound + (limit or 0)
        if (limit is not None and limit >= ctx) or wanted > ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens; the prompt (at least {lower_bound} "
                f"tokens) plus max_tokens ({limit or 0}) does not fit.",
                code="context_length_exceeded",
                param="messages",
            )


def _idempotency_conflict() -> APIError:
    return APIError(
        409,
        "another request with this Idempotency-Key is being admitted; retry",
        code="idempotency_key_conflict",
        headers={"Retry-After": "1"},
    )
