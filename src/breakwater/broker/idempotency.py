"""An ``Idempotency-Key``: scoped to the tenant that sent it, bound to the body it was first sent with.

Stored as one string, ``<body digest> <rid>``, at ``bw:idem:<tenant>:<sha256 of the key>`` for as long
as the request's result lives (``idempotency.lua`` compares and sets it atomically).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson

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
