"""Admission: validate a request against its model, bind its Idempotency-Key, answer it from the
response cache or queue it (or 429). Its spec is built in gateway.specs."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial

from pydantic import BaseModel

from breakwater.broker import Broker, RequestSpec, Status
from breakwater.broker.errors import TRANSIENT
from breakwater.broker.fanin import FanIn, Subscription
from breakwater.broker.idempotency import IdempotencyKey, body_digest
from breakwater.broker.types import Admission, EnqueueResult
from breakwater.config import GatewaySettings
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
from breakwater.gateway.following import Submission, record_when_admitted
from breakwater.gateway.groups import GroupLimits
from breakwater.gateway.limits import (
    hold,
    limits_of,
    rate_headers,
    refusal,
    reserve,
    tokened,
    too_large,
)
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.models import ModelInfo, ModelRegistry
from breakwater.gateway.specs import Body, check_features, prompt_text, request_spec
from breakwater.protocol.embeddings import EmbeddingRequest
from breakwater.tenancy import ANONYMOUS, Principal
from breakwater.tenancy.limits import Limits

log = logging.getLogger(__name__)

# A lower bound on tokens from UTF-8 bytes: real tokenizers average 3-5 bytes per token, so a
# prompt refused by this estimate certainly cannot fit; the worker checks exactly.
BYTES_PER_TOKEN_BOUND = 6

RID_PREFIX = {"chat": "chatcmpl", "completion": "cmpl", "embedding": "embd"}


def client_key(principal: Principal, idempotency_key: str, body: BaseModel) -> IdempotencyKey:
    """The client's Idempotency-Key, in its tenant, bound to the body as the client sent it."""
    return IdempotencyKey(principal.tenant, idempotency_key, body_digest(body.model_dump(mode="json")))


def new_rid(kind: str) -> str:
    return f"{RID_PREFIX[kind]}-{uuid.uuid4().hex}"


class Admitter:
    def __init__(
        self,
        settings: GatewaySettings,
        broker: Broker,
        fanin: FanIn,
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
        prompts: int = 1,
        auto_tools: bool = True,
        digest_of: BaseModel | None = None,
        cache: CacheControl = DEFAULT_CONTROL,
        response: str = "",
        group: GroupLimits | None = None,
    ) -> Submission:
        """Queue ``body`` as request ``rid`` (new when empty), or follow an identical request's answer
        (gateway.cache); ``choices``: it is one of a request's choices (``n`` for each of its
        ``prompts``; gateway.choices), whose
        Idempotency-Key is bound to ``digest_of`` (the client's whole body), and whose limits
        ``group`` took already, when given (gateway.groups). ``response``: it serves a Responses API
        request, which keeps this (``RequestSpec.response``)."""
        model = await self.registry.resolve(body.model)
        spec = request_spec(
            body,
            request_id=request_id,
            default_timeout_s=self.settings.request_timeout_s,
            principal=principal,
            choices=choices,
            prompts=prompts,
            model=model,
            auto_tools=auto_tools,
        )
        if response:
            spec = replace(spec, response=response)
        check_features(spec, model, body.dimensions if isinstance(body, EmbeddingRequest) else None)
        prompt = prompt_text(spec)
        longest = max(spec.inputs, key=len) if spec.inputs else prompt  # each input is its own sequence
        self.check_context(longest, spec.max_tokens, model, spec.kind)
        rid = rid or new_rid(spec.kind)
        limits = limits_of(principal.key)
        shared = principal.tenant_limits
        share = group.shares.get(rid) if group is not None else None
        if share is not None:  # as its group took them (the model's context may have changed since)
            spec = replace(spec, reserved_tokens=share[0], held_tokens=share[1])
        elif tokened(limits, shared):
            spec = self.reserved(spec, prompt, model, (limits, shared))
        # The key lives exactly as long as the request's record: while it answers, so does the key.
        key_ttl_s = math.ceil(spec.timeout_s) + self.settings.result_ttl_s
        idem = None
        if idempotency_key:
            idem = client_key(principal, idempotency_key, digest_of or body)
            found = await self._bind(idem, rid, key_ttl_s, subscribe)
            if found is not None:
                return found
        entry = self.cache.entry(spec, model, principal, cache)
        lookup = await self._look_up(entry, idem, spec, rid, key_ttl_s, principal, subscribe, cache)
        if lookup.found is not None:  # answered by an identical request: not queued, no tokens spent
            return lookup.found
        owned = (entry, lookup.replaced) if entry is not None and lookup.bound else None
        self.metrics.cache_requests.labels(body.model, lookup.outcome.value).inc()
        headers: dict[str, str] = {HEADER: lookup.outcome.value}
        if group is not None:  # its group took the limits: from here on, this admission gives them back
            group.shares.pop(rid, None)
        elif limits.any or shared.any:  # after the Idempotency-Key: a replay is not a new request
            try:
                headers |= await self.take_limits(principal, limits, (rid,), spec)
            except BaseException:
                await self._abandon(None, idem, rid, principal, Limits(), owned)
                raise
        release = partial(self._abandon, idem=idem, rid=rid, principal=principal, limits=limits, entry=owned)
        result, sub = await self._queue(rid, spec, prompt, principal, subscribe, release)
        if not result.accepted:
            await self._abandon(sub, idem, rid, principal, limits, owned)
            raise await self._queue_full(body, model, spec, principal, result.waiting)
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
            logprobs=spec.logprobs >= 0,
            deadline=time.time() + spec.timeout_s,  # this host's clock: enqueue.lua's is Redis's
        )

    async def _queue_full(
        self, body: Body, model: ModelInfo, spec: RequestSpec, principal: Principal, waiting: int
    ) -> APIError:
        """The 429 for a request its lane had no room for; nothing of it was written, so no metering
        will give back its budget hold: given back here."""
        if spec.held_tokens:
            await self.broker.ledger.unhold(principal.tenant, principal.limit_id, spec.held_tokens)
        self.metrics.rejections.labels(body.model, "queue_full").inc()
        retry_after = retry_after_s(waiting, self.signals.drain_rate(model.name), model.capacity)
        return APIError(
            429,
            f"the {body.lane} queue for `{body.model}` is full ({waiting} waiting); retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(retry_after), "X-Breakwater-Reason": "queue_full"},
        )

    async def _queue(
        self,
        rid: str,
        spec: RequestSpec,
        prompt: str,
        principal: Principal,
        subscribe: bool,
        release: Callable[[Subscription | None], Awaitable[None]],
    ) -> tuple[EnqueueResult, Subscription | None]:
        """Subscribe (when asked) and queue; on a failure ``release`` what admission took, and give
        the budget hold back unless the job may have been queued."""
        # SUBSCRIBE is sent before the job is queued, and its confirmation awaited after (the two round
        # trips overlap). Confirmed, it delivers every event; the reader fills any gap from the stream.
        sub = None
        queued: bool | None = False  # None: not known (the enqueue itself raised)
        try:
            sub = await self.fanin.open(rid) if subscribe else None
            queued = None
            result = await self._enqueue(rid, spec, prompt, principal)
            queued = result.accepted
            if sub is not None and result.accepted and not await self.fanin.confirm(sub):
                log.warning("subscription not confirmed in time; reading the stream", extra={"rid": rid})
                sub.wake()  # the job is queued: follow it from the durable stream instead
        except BaseException:
            try:
                await release(sub)
            finally:
                if not queued:
                    await self._unhold_unqueued(rid, spec, principal, known=queued is False)
                if queued is not False:
                    await self._forsake(rid)
            raise
        return result, sub

    async def _forsake(self, rid: str) -> None:
        """A job that may have been queued for a client who never got its id (its admission was
        cancelled, its client gone, or failed after the enqueue; its Idempotency-Key released):
        nobody can follow it, so it is cancelled and withdrawn (``Requests.withdraw``) instead of
        running for nobody. Best effort: Redis may be away (then it waits for its deadline)."""
        try:
            await self._take_back(rid, "its admission did not complete", queued_only=True)
        except TRANSIENT as exc:
            log.warning("an unadmitted job stays queued", extra={"rid": rid, "fields": {"error": repr(exc)}})

    async def _take_back(self, rid: str, reason: str, queued_only: bool = False) -> None:
        """Cancel request ``rid`` (``queued_only``: unless a worker has it already); one that still
        waited is withdrawn from its lane and metered at once (``Broker.withdraw``), so its place in
        the queue and its key's concurrency and budget hold come back now, not when a worker reads it."""
        record = await self.broker.get_record(rid)
        if record is None or record.status.terminal or (queued_only and record.status is not Status.QUEUED):
            return
        cancelled = await self.broker.cancel(rid, self.settings.result_ttl_s, reason)
        if cancelled > 0 and record.status is Status.QUEUED and record.deadline_ms:
            queues = self.signals.partitions.queues(record.spec.model)
            await self.broker.withdraw(rid, record.spec.lane, record.deadline_ms, queues)

    async def _unhold_unqueued(self, rid: str, spec: RequestSpec, principal: Principal, known: bool) -> None:
        """A request admitted by the limits whose enqueue failed: unless it was queued after all (its
        record exists: the reply was lost), nothing will meter it, so its budget hold is given back.
        ``known``: the enqueue was never sent. Best effort: Redis may still be away (then the hold
        stays until the budget renews, on the safe side)."""
        if not spec.held_tokens:
            return
        try:
            if not known and await self.broker.get_record(rid) is not None:
                return  # queued: the worker's metering gives the hold back
            await self.broker.ledger.unhold(principal.tenant, principal.limit_id, spec.held_tokens)
        except TRANSIENT as exc:
            log.warning("budget hold not given back", extra={"rid": rid, "fields": {"error": repr(exc)}})

    async def _enqueue(self, rid: str, spec: RequestSpec, prompt: str, principal: Principal) -> EnqueueResult:
        """Queue the job on one of its model's partitions (gateway.partitions): the less loaded of
        two first; a full one passes it on to the next."""
        partitions = self.signals.partitions
        order = partitions.order(spec.model, spec.lane)
        result = await self.broker.enqueue(
            rid=rid,
            spec=spec,
            max_queued=partitions.limit(spec.model),
            result_ttl_s=self.settings.result_ttl_s,
            cost=spec.reserved_tokens or reserve(spec, prompt),
            weight=principal.key.weight if principal.key is not None else 1.0,
            queues=order,
        )
        if result.admission is Admission.QUEUED:
            partitions.observe(result.queue, spec.lane, result.waiting)
        return result

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

    async def take_limits(
        self, principal: Principal, limits: Limits, rids: Sequence[str], spec: RequestSpec, ahead: int = 0
    ) -> dict[str, str]:
        """The key's (and its tenant's) limits admit requests ``rids`` (one, or a group's choices as one
        arrival, ``spec`` reserving and holding their tokens in all, ``ahead`` of it held by the
        choices before the last), else 429; the x-ratelimit-* headers."""
        # A running request leaves the concurrency set when it is metered; this bound only frees the
        # place of one whose worker died (a started job runs past its queue deadline).
        deadline_ms = int((time.time() + spec.timeout_s + self.settings.result_ttl_s) * 1000)
        shared = principal.tenant_limits
        decision = await self.broker.ledger.admit(
            principal.tenant,
            principal.limit_id,
            limits,
            rids=rids,
            tokens=spec.reserved_tokens,
            deadline_ms=deadline_ms,
            tenant_limits=shared,
            held=spec.held_tokens,
            held_ahead=ahead,
        )
        if not decision.admitted:
            self.metrics.rejections.labels(spec.model, f"rate_limit_{decision.reason}").inc()
            tenant = self.settings.tenant_label(principal.tenant)
            self.metrics.tenant_rejections.labels(tenant, decision.reason).inc()
            raise refusal(limits, decision, shared)
        return rate_headers(limits, decision, shared)

    async def _existing(self, rid: str, subscribe: bool) -> Submission | None:
        """The request an Idempotency-Key is bound to; None when it expired."""
        record = await record_when_admitted(self.broker, rid, time.time() + 2.0)
        if record is None or not await self.broker.attach(rid):
            return None
        sub = await self.fanin.subscribe(rid) if subscribe else None
        replay = Submission.of(rid, record, sub)
        replay.headers = {HEADER: Outcome.BYPASS.value}  # the key's own request: the cache was not asked
        return replay

    async def withdraw(
        self, sub: Submission, idempotency_key: str | None, body: Body, principal: Principal
    ) -> None:
        """Take back a queued request (another choice of its group was refused): cancelled, its
        key released, its place in the concurrency limits and in its lane freed."""
        idem = client_key(principal, idempotency_key, body) if idempotency_key else None
        try:
            await self._take_back(sub.rid, "another choice was refused")
        finally:  # also when Redis failed it midway: what admission took is given back
            await self._abandon(sub.subscription, idem, sub.rid, principal, limits_of(principal.key))

    async def _abandon(
        self,
        sub: Subscription | None,
        idem: IdempotencyKey | None,
        rid: str,
        principal: Principal,
        limits: Limits,
        entry: tuple[CacheEntry, str | None] | None = None,
    ) -> None:
        """Give back what admitting request ``rid`` took; ``entry``: the cache entry it bound (and
        the binding it replaced, restored)."""
        if sub is not None:
            await self.fanin.unsubscribe(sub)
        if idem is not None:
            await self.broker.release_idempotency_key(idem, rid)
        if entry is not None:
            await self.cache.release(entry[0], rid, entry[1])
        if limits.max_concurrent or principal.tenant_limits.max_concurrent:
            await self.broker.ledger.release(principal.tenant, principal.limit_id, rid)

    def _context(self, model: ModelInfo) -> int:
        # No worker has said (scale to zero, an upstream without max_model_len): use the bound.
        return model.context_length if model.context_length > 0 else self.settings.max_context_tokens

    def reserved(
        self, spec: RequestSpec, prompt: str, model: ModelInfo, limits: tuple[Limits, Limits]
    ) -> RequestSpec:
        """``spec`` with the tokens it reserves against tokens per minute and holds against the
        budgets; a 400 when that alone is more than the key's (or tenant's) tokens per minute."""
        floor = math.ceil(len(prompt.encode()) / BYTES_PER_TOKEN_BOUND)
        held = hold(spec, prompt, self._context(model), floor, known=model.context_length > 0)
        spec = replace(spec, reserved_tokens=reserve(spec, prompt), held_tokens=held)
        for lim in limits:
            if lim.tpm and spec.reserved_tokens > lim.tpm:
                raise too_large(spec.reserved_tokens, lim)
        return spec

    def check_context(self, prompt: str, limit: int | None, model: ModelInfo, kind: str = "chat") -> None:
        ctx = self._context(model)
        lower_bound = math.ceil(len(prompt.encode()) / BYTES_PER_TOKEN_BOUND)
        wanted = lower_bound + (limit or 0)
        if (limit is not None and limit >= ctx) or wanted > ctx:
            prompt_param = {"chat": "messages", "completion": "prompt"}.get(kind, "input")
            asked = f" plus `max_tokens` ({limit})" if limit else ""  # (the Responses API renames it)
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens; the prompt (at least {lower_bound} "
                f"tokens){asked} does not fit.",
                code="context_length_exceeded",
                # What to shorten: the prompt when it alone cannot fit, else the answer asked for.
                param=prompt_param if lower_bound >= ctx or limit is None else "max_tokens",
            )


def _idempotency_conflict() -> APIError:
    return APIError(
        409,
        "another request with this Idempotency-Key is being admitted; retry",
        code="idempotency_key_conflict",
        headers={"Retry-After": "1"},
    )
