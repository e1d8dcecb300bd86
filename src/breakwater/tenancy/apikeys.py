"""API keys: their format, their peppered hash, and the record a key's hash points to.

A key is ``bw-`` and 43 URL-safe characters (256 random bits): the prefix lets secret scanners find
leaked keys. Only ``HMAC-SHA256(pepper, key)`` is stored; the key itself is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

import orjson

from breakwater.tenancy.limits import Limits

KEY_PREFIX = "bw-"
KEY_RE = re.compile(r"^bw-[A-Za-z0-9_-]{43}$")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def generate_key_id() -> str:
    """The key's public name (listing, revoking, logs): not a secret."""
    return "key_" + secrets.token_hex(8)


def well_formed(key: str) -> bool:
    return KEY_RE.match(key) is not None


def key_digest(key: str, pepper: bytes) -> str:
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What a key may do; stored at ``bw:apikey:<digest>``. Zero means "no limit" for every limit."""

    id: str
    tenant: str
    name: str = ""
    models: tuple[str, ...] = ()  # empty: every model
    lane: str | None = None  # requests are queued on this lane whatever they ask for
    weight: float = 1.0  # share among tenants when the queue is contended
    rpm: int = 0
    tpm: int = 0
    max_concurrent: int = 0
    budget_day: int = 0  # tokens (prompt + completion) per UTC day
    budget_month: int = 0  # tokens per UTC calendar month
    created: int = 0  # unix seconds
    expires: int = 0  # unix seconds; 0: never
    revoked: int = 0  # unix seconds it was revoked; 0: live
    cache: bool = True  # its requests may use the response cache (gateway.cache), where it is on
    successor: str = ""  # the id of the key that replaced this one (`keys rotate`); "": none
    # The first key of its rotations (`keys rotate`), whose id its limits, budgets and usage are
    # counted under, so that a rotation starts none of them afresh; "": its own (never rotated to).
    lineage: str = ""

    @property
    def limit_id(self) -> str:
        """The id its limits, budgets and usage are counted under: its lineage's first key's."""
        return self.lineage or self.id

    def usable(self, now: float) -> str | None:
        """None when the key may be used now, else why not."""
        if self.revoked:
            return "revoked"
        if self.expires and now >= self.expires:
            return "expired"
        return None

    def to_hash(self) -> dict[str, str]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "models": orjson.dumps(list(self.models)).decode(),
            "lane": self.lane or "",
            "weight": repr(self.weight),
            "rpm": str(self.rpm),
            "tpm": str(self.tpm),
            "max_concurrent": str(self.max_concurrent),
            "budget_day": str(self.budget_day),
            "budget_month": str(self.budget_month),
            "created": str(self.created),
            "expires": str(self.expires),
            "revoked": str(self.revoked),
            "cache": "1" if self.cache else "0",
            "successor": self.successor,
            "lineage": self.lineage,
        }

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> ApiKey:
        return cls(
            id=h["id"],
            tenant=h["tenant"],
            name=h.get("name", ""),
            models=tuple(orjson.loads(h.get("models") or "[]")),
            lane=h.get("lane") or None,
            weight=float(h.get("weight") or 1.0),
            rpm=int(h.get("rpm") or 0),
            tpm=int(h.get("tpm") or 0),
            max_concurrent=int(h.get("max_concurrent") or 0),
            budget_day=int(h.get("budget_day") or 0),
            budget_month=int(h.get("budget_month") or 0),
            created=int(h.get("created") or 0),
            expires=int(h.get("expires") or 0),
            revoked=int(h.get("revoked") or 0),
            cache=h.get("cache", "1") != "0",
            successor=h.get("successor", ""),
            lineage=h.get("lineage", ""),
        )

    def public(self) -> dict[str, object]:
        """For `breakwater keys list|show` (JSON): everything but the secret, which is not stored."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "models": list(self.models),
            "lane": self.lane,
            "weight": self.weight,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrent": self.max_concurrent,
            "budget_day": self.budget_day,
            "budget_month": self.budget_month,
            "created": self.created,
            "expires": self.expires or None,
            "revoked": self.revoked or None,
            "cache": self.cache,
            "successor": self.successor or None,
            "lineage": self.lineage or None,
        }


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant that owns what they create, and the key's permissions."""

    tenant: str
    key: ApiKey | None = None  # None: auth is off
    models: frozenset[str] = field(default_factory=frozenset)
    tenant_limits: Limits = field(default_factory=Limits)  # shared by all the tenant's keys

    @classmethod
    def of(cls, key: ApiKey, tenant_limits: Limits | None = None) -> Principal:
        return cls(key.tenant, key, frozenset(key.models), tenant_limits or Limits())

    @property
    def key_id(self) -> str:
        return self.key.id if self.key is not None else ""

    @property
    def limit_id(self) -> str:
        """The id its key's limits, budgets and usage count under (:attr:`ApiKey.limit_id`)."""
        return self.key.limit_id if self.key is not None else ""

    def may_use(self, model: str) -> bool:
        """Its key allows ``model``; a version (``llama@2026-11``) when it allows the model."""
        return not self.models or model in self.models or model.split("@", 1)[0] in self.models


# With auth off every caller is this one tenant: requests stay reachable by id, as before keys.
ANONYMOUS = Principal("anonymous")
