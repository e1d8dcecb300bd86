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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

import orjson

from breakwater.broker import RequestRecord, RequestSpec, Status
from breakwater.gateway.models import ModelInfo
from breakwater.keys import Keys

HEADER = "X-Breakwater-Cache"
SHARED_SCOPE = "*"  # the scope of a model whose answers every tenant shares


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
    }
    digest = hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return CacheEntry(keys.cache(spec.model, scope, digest), scope)


def reusable(record: RequestRecord, scope: str) -> bool:
    """A request whose answer another identical one may take: not failed, cancelled or expired, and
    (unless its model is shared) the same tenant's (the key says so already; this checks it)."""
    if scope != SHARED_SCOPE and (record.spec.tenant or "anonymous") != scope:
        return False
    return record.status in (Status.QUEUED, Status.RUNNING, Status.DONE)
