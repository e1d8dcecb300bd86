"""An ``Idempotency-Key``: scoped to the tenant that sent it, bound to the body it was first sent with.

Stored as one string, ``<body digest> <rid>``, at ``bw:idem:<tenant>:<sha256 of the key>`` for as long
as the request's result lives (``idempotency.lua`` compares and sets it atomically).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from breakwater.broker.scripts import Script
from breakwater.keys import Keys


def body_digest(body: object) -> str:
    """A request body's fingerprint: the same parameters in any key order or spacing match."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class Binding:
    """The request an Idempotency-Key is bound to, and the body that made it."""

    rid: str
    body_digest: str


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    tenant: str
    key: str
    body_digest: str

    def redis_key(self, keys: Keys) -> str:
        return keys.idempotency(self.tenant, hashlib.sha256(self.key.encode()).hexdigest())

    def bound(self, rid: str) -> str:
        return f"{self.body_digest} {rid}"

    def parse(self, value: str) -> Binding:
        digest, _, rid = value.rpartition(" ")
        # A value written before bodies were bound holds only the rid: it matches any body.
        return Binding(rid, digest or self.body_digest)

    def matches(self, binding: Binding) -> bool:
        return binding.body_digest == self.body_digest


class Bindings:
    """Keys bound to a request, compared and set atomically (``idempotency.lua``): Idempotency-Keys
    and the response cache's entries. Part of :class:`~breakwater.broker.Broker`."""

    redis: Redis
    keys: Keys
    _idempotency: Script

    # -- idempotency keys (admission itself: admission.py)
    async def claim_idempotency_key(self, key: IdempotencyKey, rid: str, ttl_s: int) -> Binding | None:
        """Bind ``key`` to ``rid``; returns what it was already bound to (request and body), or None
        if it is new."""
        existing: Any = await self._idempotency(
            keys=[key.redis_key(self.keys)], args=["claim", key.bound(rid), ttl_s]
        )
        return key.parse(str(existing)) if existing else None

    async def rebind_idempotency_key(self, key: IdempotencyKey, rid: str, ttl_s: int, *, was: str) -> bool:
        """Move ``key`` from the expired request ``was`` to ``rid``, unless another caller did first."""
        res = await self._idempotency(
            keys=[key.redis_key(self.keys)], args=["rebind", key.bound(rid), ttl_s, key.bound(was)]
        )
        return bool(res)

    async def release_idempotency_key(self, key: IdempotencyKey, rid: str) -> None:
        await self._idempotency(keys=[key.redis_key(self.keys)], args=["release", key.bound(rid), 0])

    # -- response cache (gateway.cache): the same compare-and-set on a key bound to a request ------
    async def claim_binding(self, key: str, rid: str, ttl_s: int) -> str | None:
        """Bind ``key`` to ``rid`` unless it is bound already; the rid it was bound to, or None."""
        existing: Any = await self._idempotency(keys=[key], args=["claim", rid, ttl_s])
        return str(existing) if existing else None

    async def binding(self, key: str) -> str | None:
        found: Any = await self.redis.get(key)
        return str(found) if found else None

    async def rebind(self, key: str, rid: str, ttl_s: int, *, was: str) -> bool:
        return bool(await self._idempotency(keys=[key], args=["rebind", rid, ttl_s, was]))

    async def unbind(self, key: str, rid: str) -> None:
        await self._idempotency(keys=[key], args=["release", rid, 0])
