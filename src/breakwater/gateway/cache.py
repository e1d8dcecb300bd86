"""The response cache: identical reproducible requests share one generation (single-flight and
exact-match cache, by reference).

A request is cacheable when its answer is meant to be reproducible: ``temperature`` 0 or an explicit
``seed`` (chat and completions), and every embedding. Its entry's key is a digest of everything that
shapes the answer: the scope (the tenant; every tenant for the models an operator shares), the model,
what its live workers serve (their engines' fingerprint and features), and the canonical request
(messages or prompt or inputs, sampling parameters, stop, limits, output format, tools). The entry
is one string bound to the request that answers it, with the same compare-and-set as an
Idempotency-Key (``idempotency.lua``):

- the first request binds the entry and is queued: a **miss**;
- an identical request while that one is queued or running follows its durable token stream (the
  same events, the same seq numbers, the same id): **single-flight**, reported as a hit;
- an identical request after it finished successfully replays that stream: a **hit**, for as long as
  both the entry (``cache_ttl_s``) and the request's record (``result_ttl_s``) live;
- an entry bound to a request that failed, was cancelled or expired is taken over: a miss.

Entries are references, not copies, so the cache adds one small key per distinct request to Redis.
An entry's value is ``<rid> <claimed at, unix ms>``: a request with no record yet is being admitted
only within ``CLAIM_GRACE_S`` of its claim; after that it never will be.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import orjson
from redis.exceptions import RedisError

from breakwater.broker import Broker, RequestRecord, RequestSpec, Status
from breakwater.broker.fanin import FanIn
from breakwater.config import GatewaySettings
from breakwater.gateway.following import Submission, record_when_admitted
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.models import ModelInfo
from breakwater.keys import Keys
from breakwater.tenancy import Principal

log = logging.getLogger(__name__)
T = TypeVar("T")

HEADER = "X-Breakwater-Cache"
SHARED_SCOPE = "*"  # the scope of a model whose answers every tenant shares
CLAIM_GRACE_S = 3.0  # a claimed entry's request has its record within this (admission takes ms)
TAKEOVERS = 3  # lookups when another identical request keeps taking the entry over first


class Outcome(StrEnum):
    HIT = "hit"  # answered by an identical request, finished or still generating
    MISS = "miss"  # generated (and, unless no-store, reusable by the next identical request)
    BYPASS = "bypass"  # not looked up: not reproducible, caching off, or Cache-Control: no-cache


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The client's ``Cache-Control``: ``no-cache`` skips the lookup, ``no-store`` the entry."""

    lookup: bool = True
    store: bool = True

    @classmethod
    def parse(cls, header: str | None) -> CacheControl:
        directives = {part.split("=", 1)[0].strip().lower() for part in (header or "").split(",")}
        return cls(lookup="no-cache" not in directives, store="no-store" not in directives)


DEFAULT_CONTROL = CacheControl()
NO_CACHE = CacheControl(lookup=False, store=False)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """Where the answer to one request lives: ``key`` is bound to the request that generates it."""

    key: str
    scope: str


def reproducible(spec: RequestSpec) -> bool:
    """The answer is meant to be the same every time: greedy, seeded, or an embedding."""
    return spec.kind == "embedding" or spec.temperature == 0 or spec.seed is not None


def cache_entry(keys: Keys, spec: RequestSpec, model: ModelInfo, *, shared: bool) -> CacheEntry:
    """The entry for ``spec`` served by ``model``'s workers (whose fingerprint must be known)."""
    scope = SHARED_SCOPE if shared else (spec.tenant or "anonymous")
    canonical = {
        "scope": scope,
        "model": spec.model,
        "fingerprint": model.fingerprint,
        "features": sorted(model.features),
        "kind": spec.kind,
        "messages": spec.messages,
        "prompt": spec.prompt,
        "inputs": spec.inputs,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "top_k": spec.top_k,
        "seed": spec.seed,
        "stop": spec.stop,
        "ignore_eos": spec.ignore_eos,
        "include_usage": spec.include_usage,
        "logprobs": spec.logprobs,
        "response_format": spec.response_format,
        "tool_call": spec.tool_call,
        "tool_format": spec.tool_format,
        "tools": spec.tools,
        "presence_penalty": spec.presence_penalty,
        "frequency_penalty": spec.frequency_penalty,
        "logit_bias": spec.logit_bias,
    }
    digest = hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return CacheEntry(keys.cache(spec.model, scope, digest), scope)


def reusable(record: RequestRecord, scope: str, spec: RequestSpec | None = None) -> bool:
    """A request whose answer another identical one (``spec``) may take: not failed, cancelled or
    expired; the same tenant's unless its model is shared (the key says so already; this checks it);
    and, still queued or running, on the same lane with a timeout no shorter than the newcomer's
    (its deadline, not the newcomer's, ends it)."""
    if scope != SHARED_SCOPE and (record.spec.tenant or "anonymous") != scope:
        return False
    if record.status is Status.DONE:
        return True
    if record.status not in (Status.QUEUED, Status.RUNNING):
        return False
    return spec is None or (record.spec.lane == spec.lane and record.spec.timeout_s >= spec.timeout_s)


class CacheUnavailable(Exception):
    """The Redis that holds the entries failed: the request goes on without the cache."""


@dataclass(frozen=True, slots=True)
class Lookup:
    found: Submission | None  # the request that answers this one (a hit)
    bound: bool  # the entry is now bound to this request: released if it is not queued
    outcome: Outcome
    replaced: str | None = None  # the binding it took over (restored if it is released)


BYPASSED = Lookup(None, False, Outcome.BYPASS)


class ResponseCache:
    """Looks entries up and binds them (in ``index``, the queue's Redis or one of its own); follows
    the requests they name (in ``broker``)."""

    def __init__(
        self,
        settings: GatewaySettings,
        broker: Broker,
        index: Broker,
        fanin: FanIn,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.index = index
        self.fanin = fanin
        self.metrics = metrics

    def entry(
        self, spec: RequestSpec, model: ModelInfo, principal: Principal, control: CacheControl
    ) -> CacheEntry | None:
        """The request's entry; None when it bypasses the cache: caching is off (here or for its
        key), its answer is not reproducible, it is one of n choices, the client said ``no-cache,
        no-store``, or its model's live workers do not all serve one fingerprint."""
        if not (self.settings.cache and reproducible(spec) and spec.choices == 1 and model.fingerprint):
            return None
        if (principal.key is not None and not principal.key.cache) or not (control.lookup or control.store):
            return None
        return cache_entry(self.index.keys, spec, model, shared=spec.model in self.settings.cache_shared)

    async def look_up(
        self,
        entry: CacheEntry,
        rid: str,
        spec: RequestSpec,
        *,
        ttl_s: int,
        subscribe: bool,
        control: CacheControl,
    ) -> Lookup:
        """The identical request that answers request ``rid`` (a hit), or whether ``entry`` is now
        bound to ``rid``. Raises only what following the found request raised."""
        missed = Outcome.MISS if control.lookup else Outcome.BYPASS
        value = f"{rid} {int(time.time() * 1000)}"
        ttl_s = min(ttl_s, self.settings.cache_ttl_s)
        for _ in range(TAKEOVERS):
            try:
                if control.store:
                    existing = await self._index(self.index.claim_binding(entry.key, value, ttl_s))
                else:
                    existing = await self._index(self.index.binding(entry.key))
            except CacheUnavailable:
                return BYPASSED
            if existing is None:
                return Lookup(None, control.store, missed)
            if control.lookup:
                found = await self._follow(existing, entry, spec, subscribe)
                if found is not None:
                    return Lookup(found, False, Outcome.HIT)
            if not control.store:
                return Lookup(None, False, missed)
            try:  # not reusable (failed, cancelled, expired) or not looked up: take the entry over
                if await self._index(self.index.rebind(entry.key, value, ttl_s, was=existing)):
                    return Lookup(None, True, missed, existing)
            except CacheUnavailable:
                return BYPASSED
            # Another identical request took it over first: its request may be the answer now.
        return Lookup(None, False, missed)

    async def release(self, entry: CacheEntry, rid: str, replaced: str | None = None) -> None:
        """Unbind ``entry`` from request ``rid``, which was not queued after all; the binding it
        ``replaced`` (a ``no-cache`` request's, or one not reusable) is bound again, so a request
        refused (a 429) costs no one the answer it would have replaced."""
        try:
            found = await self._index(self.index.binding(entry.key))
            if found is None or found.partition(" ")[0] != rid:
                return
            claimed = replaced.partition(" ")[2] if replaced is not None else ""
            ends_s = int(claimed) / 1000 + self.settings.cache_ttl_s if claimed.isdigit() else 0.0
            left_s = int(ends_s - time.time())
            if replaced is not None and left_s > 0:  # for what it had left, not a new lifetime
                await self._index(self.index.rebind(entry.key, replaced, left_s, was=found))
            else:
                await self._index(self.index.unbind(entry.key, found))
        except CacheUnavailable:  # left bound to a request that never ran: the next one takes it over
            log.warning("cache entry not released", extra={"rid": rid})

    async def _follow(
        self, value: str, entry: CacheEntry, spec: RequestSpec, subscribe: bool
    ) -> Submission | None:
        rid, _, claimed = value.partition(" ")
        record = await record_when_admitted(self.broker, rid, int(claimed or 0) / 1000 + CLAIM_GRACE_S)
        if record is None or not reusable(record, entry.scope, spec):
            return None
        if not await self.broker.attach(rid, shared=True):
            return None
        try:
            sub = await self.fanin.subscribe(rid) if subscribe else None
        except BaseException:
            await self.broker.detach(rid, shared=True)
            raise
        found = Submission.of(rid, record, sub)
        found.headers = {HEADER: Outcome.HIT.value}
        found.cached = True
        running = not record.status.terminal
        self.metrics.cache_requests.labels(record.spec.model, Outcome.HIT.value).inc()
        self.metrics.cache_single_flight.labels(record.spec.model).inc(running)
        log.info("answered from the cache", extra={"rid": rid, "fields": {"single_flight": running}})
        return found

    @staticmethod
    async def _index(call: Awaitable[T]) -> T:
        try:
            return await call
        except (RedisError, OSError) as exc:  # unreachable, full, refused: never fail the request for it
            log.warning("response cache unavailable; bypassing it", extra={"fields": {"error": str(exc)}})
            raise CacheUnavailable from exc
