"""Who is calling: the API key of a request (``Authorization: Bearer``) or of a WebSocket.

With ``auth=off`` every caller is :data:`ANONYMOUS`. With ``auth=keys`` a key is looked up by its
peppered hash and trusted for ``auth_cache_s`` (one second by default): a revoked or expired key is
refused by every gateway within that time. Unknown keys are cached too, so a flood of bad keys costs
one Redis lookup per key and second, not one per request.
"""

from __future__ import annotations

import time

from fastapi import Request

from breakwater.broker.api_keys import KeyStore
from breakwater.broker.ledger import Ledger
from breakwater.config import GatewaySettings
from breakwater.gateway.errors import APIError
from breakwater.tenancy import ANONYMOUS, ApiKey, Principal
from breakwater.tenancy.apikeys import well_formed
from breakwater.tenancy.limits import Limits

CACHE_MAX = 10_000  # keys remembered per gateway process


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


class Authenticator:
    def __init__(
        self, settings: GatewaySettings, store: KeyStore | None, ledger: Ledger | None = None
    ) -> None:
        self.enabled = settings.auth == "keys"
        self.cache_s = settings.auth_cache_s
        self.store = store
        self.ledger = ledger
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._tenants: dict[str, tuple[float, Limits]] = {}

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
        record = await self._lookup(key)
        if record is None:
            raise unauthorized("Incorrect API key provided.")
        why = record.usable(time.time())
        if why is not None:
            raise unauthorized(f"This API key ({record.id}) is {why}.")
        return Principal.of(record, await self._tenant_limits(record.tenant))

    async def _tenant_limits(self, tenant: str) -> Limits:
        if self.ledger is None:
            return Limits()
        now = time.monotonic()
        cached = self._tenants.get(tenant)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        limits = await self.ledger.tenant_limits(tenant)
        if len(self._tenants) >= CACHE_MAX:
            self._tenants.clear()
        self._tenants[tenant] = (now, limits)
        return limits

    async def _lookup(self, key: str) -> ApiKey | None:
        assert self.store is not None
        digest = self.store.digest(key)  # the cache holds hashes, not secrets
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        record = await self.store.lookup_digest(digest)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (now, record)
        return record


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
    """FastAPI dependency: the authenticated caller of this request."""
    auth: Authenticator = request.app.state.service.auth
    return await auth.principal(bearer(request.headers.get("authorization")))
