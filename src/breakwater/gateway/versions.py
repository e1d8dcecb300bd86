"""Aliases at admission (issue 19): the version a request runs on, picked once and queued on.

Aliases are read from Redis at most every ``alias_cache_s`` (and every second by the gauge loop), so
a change reaches every gateway within about a second. A name that is no alias is served as it is:
a model, or a pinned version (``llama@2026-11``)."""

from __future__ import annotations

import logging
import time

from breakwater.broker.errors import TRANSIENT
from breakwater.broker.rollouts import RolloutStore
from breakwater.config import GatewaySettings
from breakwater.gateway.errors import APIError
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.models import ModelRegistry
from breakwater.rollout.aliases import Alias, SmoothWeighted
from breakwater.tenancy import Principal

log = logging.getLogger(__name__)


class VersionRouter:
    def __init__(
        self, settings: GatewaySettings, store: RolloutStore, registry: ModelRegistry, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self._aliases: dict[str, Alias] = {}
        self._read_at = float("-inf")
        self._rotors: dict[str, SmoothWeighted] = {}
        self._exported: set[tuple[str, str]] = set()

    async def aliases(self, fresh: bool = False) -> dict[str, Alias]:
        """The aliases, read again when older than ``alias_cache_s``; the last ones read while Redis
        does not answer (a request still routes as it did)."""
        if fresh or time.monotonic() - self._read_at > self.settings.alias_cache_s:
            try:
                aliases = await self.store.aliases()
            except TRANSIENT as exc:
                log.warning("aliases unavailable; using the last read", extra={"fields": {"error": str(exc)}})
                return self._aliases
            self._read_at = time.monotonic()
            if aliases != self._aliases:
                self._changed(aliases)
        return self._aliases

    def _changed(self, aliases: dict[str, Alias]) -> None:
        self._aliases = aliases
        # The versions an alias names are served even before a worker of theirs starts (they queue).
        self.registry.aliased = frozenset(v for a in aliases.values() for v in a.weights)
        exported: set[tuple[str, str]] = set()
        for alias in aliases.values():
            for version, weight in alias.weights.items():
                self.metrics.alias_weight.labels(alias.name, version).set(weight)
                self.metrics.alias_rolled_back.labels(alias.name, version).set(version in alias.rolled_back)
                self.metrics.version_requests.labels(alias.name, version)  # from 0, for increase()
                self.metrics.rollbacks.labels(alias.name, version)
                exported.add((alias.name, version))
        for gone in self._exported - exported:
            for gauge in (self.metrics.alias_weight, self.metrics.alias_rolled_back):
                gauge.remove(*gone)
        self._exported = exported

    async def route(self, model: str, principal: Principal, user: str | None) -> str:
        """The version to queue a request for ``model`` on: ``model`` itself unless it is an alias."""
        aliases = await self.aliases()
        if model not in aliases and model not in await self.registry.models():
            aliases = await self.aliases(fresh=True)  # a new alias, not read yet: the 404 is sure
        alias = aliases.get(model)
        if alias is None:
            return model
        live = alias.live
        if not live:
            raise APIError(
                503,
                f"the alias `{model}` has no version with a weight above 0",
                type="service_unavailable",
                code="no_version",
                param="model",
            )
        if alias.sticky == "user" and user:
            version = alias.pick_by_hash(f"user\x1f{principal.tenant}\x1f{user}")
        elif alias.sticky == "tenant":
            version = alias.pick_by_hash(f"tenant\x1f{principal.tenant}")
        else:  # not sticky, or sticky by user and no `user` given: split by weight
            version = self._rotors.setdefault(model, SmoothWeighted()).pick(live)
        self.metrics.version_requests.labels(model, version).inc()
        return version
