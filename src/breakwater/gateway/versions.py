"""Aliases at admission (issue 19): the version a request runs on, picked once and queued on.

The gateway keeps the aliases it read last and reads them again in the background once they are
``alias_cache_s`` old (and every second from the rollout loop), so a change reaches every gateway
within about a second and no request waits on that read; ``alias_cache_s`` 0 reads them on every
request. A name that is no alias is served as it is: a model, or a pinned version
(``llama@2026-11``)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time

from breakwater.broker.rollouts import RolloutStore
from breakwater.config import GatewaySettings
from breakwater.gateway.errors import APIError
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.models import ModelRegistry
from breakwater.rollout.aliases import Alias, SmoothWeighted
from breakwater.stopping import stop_loop
from breakwater.tenancy import Principal

log = logging.getLogger(__name__)
JOIN_S = 0.05  # a request that needs the aliases read now joins a read started this recently


def _retrieved(task: asyncio.Task[None]) -> None:
    """A background read's failure was logged (or raised to whoever awaited it): not 'never retrieved'."""
    if not task.cancelled():
        task.exception()


class VersionRouter:
    def __init__(
        self, settings: GatewaySettings, store: RolloutStore, registry: ModelRegistry, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self._aliases: dict[str, Alias] = {}
        self._loaded = False
        self._read_at = float("-inf")  # the last read's start (failed or not)
        self._reading: asyncio.Task[None] | None = None
        self._generation = 0  # reads started
        self._applied = 0  # the latest read whose result was applied
        self._rotors: dict[tuple[str, str], SmoothWeighted] = {}
        self._exported: set[tuple[str, str]] = set()

    async def aliases(self, fresh: bool = False) -> dict[str, Alias]:
        """The aliases: read now when ``fresh``, when none were read yet, or with
        ``alias_cache_s`` 0; else the last read, refreshed in the background once stale. Reads
        started within ``JOIN_S`` of each other are one read; results apply in the order reads
        started (a fresh one never joins an earlier read: it must see what was written before it).
        While none was ever read, a failed read raises (Redis unavailable: 503)."""
        if fresh or self.settings.alias_cache_s == 0:
            await asyncio.shield(self._reading_now(join=False))  # one that starts after the call
        elif not self._loaded:
            await asyncio.shield(self._reading_now(join=True))
        elif time.monotonic() - self._read_at > self.settings.alias_cache_s:
            self._reading_now(join=True)
        return self._aliases

    def _reading_now(self, *, join: bool) -> asyncio.Task[None]:
        """A new read, or (``join``) one that started at most ``JOIN_S`` ago."""
        task = self._reading
        if not join or task is None or task.done() or time.monotonic() - self._read_at > JOIN_S:
            self._generation += 1
            self._read_at = time.monotonic()
            read = self._read(self._generation)  # shared by the requests that join it: no one's context
            task = self._reading = asyncio.create_task(read, name="aliases", context=contextvars.Context())
            task.add_done_callback(_retrieved)
        return task

    async def _read(self, generation: int) -> None:
        try:
            aliases = await self.store.aliases()
        except Exception as exc:  # Redis down, or refused (ACL): route as last read; retried when stale
            if not self._loaded:
                raise
            log.warning("aliases unavailable; using the last read", extra={"fields": {"error": str(exc)}})
            return
        if generation < self._applied:
            return  # a later read already applied (a guard's rollback must not be undone)
        self._applied, self._loaded = generation, True
        if aliases != self._aliases:
            self._changed(aliases)

    def _changed(self, aliases: dict[str, Alias]) -> None:
        self._aliases = aliases
        # The versions an alias names are served even before a worker of theirs starts (they queue).
        self.registry.aliased = frozenset(v for a in aliases.values() for v in a.versions)
        exported: set[tuple[str, str]] = set()
        for alias in aliases.values():
            for version in alias.versions:
                self.metrics.alias_weight.labels(alias.name, version).set(alias.weights.get(version, 0))
                self.metrics.alias_rolled_back.labels(alias.name, version).set(version in alias.rolled_back)
                self.metrics.version_requests.labels(alias.name, version)  # from 0, for increase()
                self.metrics.rollbacks.labels(alias.name, version)
                exported.add((alias.name, version))
        for gone in self._exported - exported:
            for gauge in (self.metrics.alias_weight, self.metrics.alias_rolled_back):
                gauge.remove(*gone)
        self._exported = exported

    async def alias(self, model: str) -> Alias | None:
        """The alias named ``model``, or None (a model or a version: served as it is)."""
        aliases = await self.aliases()
        if model not in aliases and model not in await self.registry.models():
            aliases = await self.aliases(fresh=True)  # an alias not read yet: the 404 is sure
        return aliases.get(model)

    def pick(self, alias: Alias, principal: Principal, user: str | None) -> str:
        """The version for one request: by the tenant's split (its own, or the alias's), sticky by
        user or tenant when the alias says so, else by smooth weighted round robin."""
        tenant = principal.tenant
        live = alias.live_for(tenant)
        if not live:
            raise APIError(
                503,
                f"the alias `{alias.name}` has no version with a weight above 0",
                type="service_unavailable",
                code="no_version",
                param="model",
            )
        if alias.sticky == "user" and user:
            version = alias.pick_by_hash(f"user\x1f{tenant}\x1f{user}", live)
        elif alias.sticky == "tenant":
            version = alias.pick_by_hash(f"tenant\x1f{tenant}", live)
        else:  # not sticky, or sticky by user and no `user` given: split by weight
            own = tenant if tenant in alias.tenants else ""
            version = self._rotors.setdefault((alias.name, own), SmoothWeighted()).pick(live)
        self.metrics.version_requests.labels(alias.name, version).inc()
        return version

    async def close(self) -> None:
        if self._reading is not None and not self._reading.done():
            with contextlib.suppress(Exception):
                await stop_loop(self._reading)
