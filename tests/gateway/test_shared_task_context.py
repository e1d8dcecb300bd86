"""Work shared by requests (the alias read that requests join) runs in a context of its own, so its
log lines never name the request (its id, tenant and key) that happened to start it."""

from __future__ import annotations

from typing import Any

from breakwater.config import GatewaySettings
from breakwater.gateway.versions import VersionRouter
from breakwater.logs import caller_var, request_id_var


class _Store:
    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    async def aliases(self) -> dict[str, Any]:
        self.seen.append((caller_var.get(), request_id_var.get()))
        return {}


async def test_the_shared_alias_read_carries_no_requests_context() -> None:
    store = _Store()
    router = VersionRouter(GatewaySettings(alias_cache_s=0), store, None, None)  # type: ignore[arg-type]
    caller, request = caller_var.set(("acme", "key_1")), request_id_var.set("acme-request")
    try:
        await router.aliases(fresh=True)
    finally:
        caller_var.reset(caller)
        request_id_var.reset(request)
    assert store.seen == [(None, None)]
