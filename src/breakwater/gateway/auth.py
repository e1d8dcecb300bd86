"""Who is calling: the API key of a request (``Authorization: Bearer``) or of a WebSocket.

With ``auth=off`` every caller is :data:`ANONYMOUS`. With ``auth=keys`` a key is looked up by its
peppered hash and trusted for ``auth_cache_s`` (one second by default): a revoked or expired key is
refused by every gateway within that time. Unknown keys are cached too, so a flood of bad keys costs
one Redis lookup per key and second, not one per request.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from fastapi import Request

from breakwater.broker.api_keys import KeyStore
from breakwater.broker.ledger import Ledger
from breakwater.config import GatewaySettings
from breakwater.gateway.errors import APIError
from breakwater.logs import caller_var
from breakwater.tenancy import ANONYMOUS, ApiKey, Principal
from breakwater.tenancy.apikeys import well_formed
from breakwater.tenancy.limits import Limits

CACHE_MAX = 10_000  # keys (and tenants) remembered per gateway process
MAX_ROTATIONS = 16  # successors followed from a key that ended by rotation (a chain, never a loop)
CALLER_STATE = "caller"  # the request's scope state: its caller, once authenticated
K = TypeVar("K")
V = TypeVar("V")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def bearer(authorization: str | None) -> str | None:
    """The key from an ``Authorization`` header value; None when there is none."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise unauthorized("The Authorization header must be `Bearer <API key>`.")
    return token.strip()


class _Recent(Generic[K, V]):
    """Values looked up in the last ``ttl_s`` seconds: at most CACHE_MAX found ones, and apart at
    most CACHE_MAX / 10 lookups that found nothing (None), so that a flood of made-up keys never
    pushes the real ones out (each then a Redis lookup per request). Full, the oldest goes."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._items: dict[K, tuple[float, V]] = {}
        self._misses: dict[K, tuple[float, V]] = {}

    async def get(self, key: K, load: Callable[[K], Awaitable[V]]) -> V:
        now = time.monotonic()
        cached = self._items.get(key) or self._misses.get(key)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        value = await load(key)
        items, most = (self._misses, CACHE_MAX // 10) if value is None else (self._items, CACHE_MAX)
        items.pop(key, None)  # (re)inserted last: the dict's order is the entries' age
        if len(items) >= most:
            del items[next(iter(items))]
        items[key] = (now, value)
        return value


class Authenticator:
    def __init__(
        self, settings: GatewaySettings, store: KeyStore | None, ledger: Ledger | None = None
    ) -> None:
        self.enabled = settings.auth == "keys"
        self.store = store
        self.ledger = ledger
        self._keys: _Recent[str, ApiKey | None] = _Recent(settings.auth_cache_s)  # by digest, not secret
        self._tenants: _Recent[str, Limits] = _Recent(settings.auth_cache_s)

    async def principal(self, key: str | None) -> Principal:
        """The caller of a request that presented ``key`` (None: no key at all); 401 if not valid."""
        if not self.enabled:
            return ANONYMOUS
        if not key:
            raise unauthorized(
                "You didn't provide an API key. Send it in the Authorization header: Bearer <API key>."
            )
        if not well_formed(key):
            raise unauthorized("Incorrect API key provided: it is not a Breakwater key (bw-...).")
        assert self.store is not None
        record = await self._keys.get(self.store.digest(key), self.store.lookup_digest)
        if record is None:
            raise unauthorized("Incorrect API key provided.")
        why = record.usable(time.time())
        if why is not None:
            caller_var.set((record.tenant, record.id))  # a refusal an operator may want to trace
            raise unauthorized(f"This API key ({record.id}) is {why}.")
        limits = (
            await self._tenants.get(record.tenant, self.ledger.tenant_limits) if self.ledger else Limits()
        )
        caller_var.set((record.tenant, record.id))  # the request's log lines name them from here on
        return Principal.of(record, limits)

    async def principal_of(self, key_id: str) -> Principal:
        """The caller that holds key ``key_id`` now (work it started runs on as it: a batch): the key,
        or once it ended by a rotation the key that replaced it; 401 once that is revoked, expired
        or gone."""
        if not self.enabled:
            return ANONYMOUS
        assert self.store is not None
        record = await self.store.get(key_id) if key_id else None
        for _ in range(MAX_ROTATIONS):
            if record is None or not record.successor or record.usable(time.time()) is None:
                break
            successor = await self.store.get(record.successor)
            record = successor if successor is None or successor.tenant == record.tenant else None
        why = "gone" if record is None else record.usable(time.time())
        if record is None or why is not None:
            named = key_id if record is None or record.id == key_id else f"{key_id}, now {record.id},"
            raise unauthorized(f"The API key that created this work ({named}) is {why}.")
        limits = (
            await self._tenants.get(record.tenant, self.ledger.tenant_limits) if self.ledger else Limits()
        )
        return Principal.of(record, limits)


def check_model(principal: Principal, model: str) -> None:
    if not principal.may_use(model):
        raise APIError(
            403,
            f"This API key may not use the model `{model}`.",
            type="invalid_request_error",
            code="model_not_allowed",
            param="model",
        )


async def caller(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller of this request, found once per request (a route
    with a body asks before FastAPI reads it, body.OrjsonRoute; the dependency then finds it here)."""
    state = request.scope.setdefault("state", {})
    who: Principal | None = state.get(CALLER_STATE)
    if who is None:
        auth: Authenticator = request.app.state.service.auth
        who = state[CALLER_STATE] = await auth.principal(bearer(request.headers.get("authorization")))
    return who
