"""The models the gateway serves: live workers' models (from the registry) and declared ones."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from breakwater.broker import Broker
from breakwater.config import GatewaySettings
from breakwater.gateway.errors import APIError
from breakwater.rollout.aliases import VERSION_SEP


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    context_length: int
    workers: int
    capacity: int
    active: int
    free: int = 0  # the slots the live workers would fill now (an engine short of KV cache has none)
    # Jobs/s one worker finishes with its slots full, from the workers' fitted step costs (their
    # mean; 0 while none knows it): the autoscaler's capacity per worker (gateway.autoscale).
    rated: float = 0.0
    owned_by: str = "breakwater"
    kv_cache_usage: float | None = None
    features: frozenset[str] = frozenset()  # what every live worker's engine can do (engines.base)
    # What every live worker serves (Engine.fingerprint); '' when they differ (a rollout) or none is live.
    fingerprint: str = ""
    # The width of its embeddings, where every live worker's engine says the same (0: not known).
    embedding_dim: int = 0
    vocab_size: int = 0  # its vocabulary, where every live worker's engine says the same (0: not known)

    @classmethod
    def without_workers(cls, name: str) -> ModelInfo:
        """A model no live worker serves (declared for scale to zero, or its last worker left)."""
        return cls(name, context_length=0, workers=0, capacity=0, active=0)


class ModelRegistry:
    """Models served by live workers, and declared ones (cached for ``model_cache_s``)."""

    def __init__(self, settings: GatewaySettings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self._models: dict[str, ModelInfo] = {}
        self._models_at = 0.0
        # Models seen with live workers, and when: while Redis is down or full the workers' liveness
        # keys lapse, and a model that was just served must not turn into a 404.
        self._seen: dict[str, tuple[float, ModelInfo]] = {}
        # Versions named by an alias (gateway.versions): served, queueing until a worker starts.
        self.aliased: frozenset[str] = frozenset()

    async def models(self, fresh: bool = False) -> dict[str, ModelInfo]:
        if fresh or time.monotonic() - self._models_at > self.settings.model_cache_s:
            workers = await self.broker.live_workers()
            grouped: dict[str, list[dict[str, Any]]] = {}
            for info in workers.values():
                grouped.setdefault(str(info["model"]), []).append(info)
            models = {name: _aggregate(name, infos) for name, infos in grouped.items()}
            now = time.monotonic()
            self._seen.update({name: (now, info) for name, info in models.items()})
            for name, (seen_at, last) in list(self._seen.items()):
                if now - seen_at > self.settings.model_grace_s:
                    del self._seen[name]
                elif name not in models:  # its workers' registrations lapsed: queue for them
                    models[name] = replace(
                        last, workers=0, capacity=0, active=0, free=0, rated=0.0, fingerprint=""
                    )
            for name in [*self.settings.declared_models, *self.aliased]:  # queue until a worker starts
                models.setdefault(name, ModelInfo.without_workers(name))
            self._models, self._models_at = models, time.monotonic()
        return self._models

    async def resolve(self, name: str) -> ModelInfo:
        models = await self.models()
        if name not in models:
            models = await self.models(fresh=True)
        if name not in models and name in self.aliased:
            return ModelInfo.without_workers(name)
        if name not in models:
            what = "model version" if VERSION_SEP in name else "model"
            raise APIError(
                404,
                f"The {what} `{name}` does not exist or has no live worker.",
                code="model_not_found",
                param="model",
            )
        return models[name]


def _aggregate(name: str, infos: list[dict[str, Any]]) -> ModelInfo:
    kv = [float(i["kv_cache_usage"]) for i in infos if i.get("kv_cache_usage") is not None]
    rated = [float(i["rated"]) for i in infos if float(i.get("rated") or 0) > 0]
    return ModelInfo(
        name=name,
        context_length=min(int(i.get("context_length", 0)) for i in infos),
        workers=len(infos),
        capacity=sum(int(i.get("capacity", 0)) for i in infos),
        active=sum(int(i.get("active", 0)) for i in infos),
        free=sum(
            int(i.get("free", max(0, int(i.get("capacity", 0)) - int(i.get("active", 0))))) for i in infos
        ),
        kv_cache_usage=sum(kv) / len(kv) if kv else None,
        rated=sum(rated) / len(rated) if rated else 0.0,
        features=frozenset.intersection(*(frozenset(i.get("features") or ()) for i in infos)),
        fingerprint=_common({str(i.get("fingerprint") or "") for i in infos}),
        embedding_dim=int(_common({str(i.get("embedding_dim") or 0) for i in infos}) or 0),
        vocab_size=int(_common({str(i.get("vocab_size") or 0) for i in infos}) or 0),
    )


def _common(values: set[str]) -> str:
    return values.pop() if len(values) == 1 else ""
