"""The worker's liveness half (mixed into :class:`~breakwater.worker.worker.Worker`): the registry
entry and heartbeat, lease renewal that stops when an engine step hangs, and the per-heartbeat check
of cancelled and unwatched requests (DESIGN §2-§3)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from breakwater.broker import Broker, Job, Status
from breakwater.broker.errors import TRANSIENT
from breakwater.config import WorkerSettings
from breakwater.engines.base import Engine
from breakwater.engines.stepcost import Rating
from breakwater.protocol.toolformats import FEATURE_PREFIX
from breakwater.worker.jobs import InFlight
from breakwater.worker.metrics import WorkerMetrics

log = logging.getLogger("breakwater.worker.worker")


class LivenessMixin:
    # The worker's state this half uses (defined by Worker).
    settings: WorkerSettings
    engine: Engine
    broker: Broker
    model: str
    metrics: WorkerMetrics
    inflight: dict[str, InFlight]
    held: list[tuple[Job, bool]]
    draining: bool
    hung: bool
    _step_started: float | None
    rating: Rating

    async def _drop(self, flight: InFlight, *, fenced: bool, why: str) -> None:
        raise NotImplementedError

    def registry_info(self) -> dict[str, Any]:
        info = self.engine.info
        stats = self.engine.stats()
        rated = self.rating.jobs_per_s()
        self.metrics.rated.labels(self.model).set(rated or 0.0)
        return {
            "model": self.model,
            "engine": info.engine,
            "features": sorted(self.features()),
            "fingerprint": self.fingerprint(),
            "capacity": info.capacity,
            "context_length": info.context_length,
            "embedding_dim": info.embedding_dim,
            "vocab_size": info.vocab_size,
            "active": self.engine.running(),
            # The room it would pull into now (jobs claimed but not yet in the engine count as taken).
            "free": 0
            if self.draining
            else max(0, min(self.engine.free_slots(), info.capacity - len(self.inflight))),
            "draining": self.draining,
            "kv_cache_usage": stats.get("kv_cache_usage"),
            # Jobs/s with its slots full, from its own step cost (absent until known).
            **({"rated": float(f"{rated:.4g}")} if rated else {}),
            "engine_stats": stats,
            "ts_ms": int(time.time() * 1000),
        }

    def fingerprint(self) -> str:
        revision = self.settings.model_revision
        return self.engine.fingerprint() + (f"@{revision}" if revision else "")

    def features(self) -> set[str]:
        """The engine's features and the model's tool-call format (``tool_format:<name>``)."""
        fmt = self.settings.tool_format or self.engine.tool_format
        return {*self.engine.features, *([FEATURE_PREFIX + fmt] if fmt and fmt != "none" else [])}

    def step_hung(self) -> bool:
        """The engine has been inside one step longer than ``step_timeout_s`` (stuck decode, stalled
        upstream) while it has work (:meth:`busy`): the process is alive but its jobs make no progress.
        A step that waits with none (the last one was cancelled while it waited) is an idle engine's."""
        started = self._step_started
        return (
            started is not None
            and self.engine.watched_steps
            and self.busy()
            and time.monotonic() - started > self.settings.step_timeout_s
        )

    def busy(self) -> bool:
        """Whether the engine has work of this worker's: a sequence or an embedding job not paused and
        still generating (what a step that does not return holds up; the engine's ``running()``
        counts no embedding)."""
        return any(f.paused_at < 0 and not f.finishing for f in self.inflight.values())

    async def _heartbeat_once(self) -> None:
        hung = self.step_hung()
        if self.hung and not hung:  # the step came back: serving (and watching) again
            self.hung = False
            log.warning("engine step returned; serving again")
        if hung:
            if not self.hung:
                self.hung = True
                log.error(
                    "engine step hung; no longer renewing leases, so other workers take the jobs",
                    extra={
                        "fields": {
                            "step_timeout_s": self.settings.step_timeout_s,
                            "in_flight": len(self.inflight),
                        }
                    },
                )
                await self.broker.deregister(self.settings.worker_id)
            return
        ttl = self.settings.lease_s
        await self.broker.heartbeat(self.settings.worker_id, self.registry_info(), ttl)
        lost = await self.broker.refresh_leases(
            [f.lease for f in self.inflight.values()],
            self.settings.worker_id,
            result_ttl_s=self.settings.result_ttl_s,
        )
        await self.broker.hold_leases([job for job, _ in self.held], self.settings.worker_id)
        for lease in lost:  # another attempt owns it now (or it ended): stop generating it here
            flight = self.inflight.get(lease.job.rid)
            if flight is not None and flight.attempt == lease.attempt:
                await self._drop(flight, fenced=True, why="lease taken over")
        kv = self.engine.stats().get("kv_cache_usage")
        if kv is not None:
            self.metrics.kv_cache_usage.labels(self.model).set(float(kv))

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._heartbeat_once()
                await self._check_in_flight()
            except TRANSIENT as exc:
                log.warning("heartbeat failed", extra={"fields": {"error": str(exc)}})
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _check_in_flight(self) -> None:
        """Drop cancelled sequences; cancel ones nobody has watched for the detach grace period
        (measured on Redis's clock, like every deadline)."""
        flights = list(self.inflight.values())
        if not flights or self.hung:
            return
        now_ms, watches = await self.broker.watch([f.job.rid for f in flights])
        grace_ms = self.settings.detach_grace_s * 1000
        for flight, watch in zip(flights, watches, strict=True):
            if self.inflight.get(flight.job.rid) is not flight:
                continue
            if watch.status is not Status.RUNNING:
                why = f"status {watch.status.value if watch.status else 'gone'}"
                await self._drop(flight, fenced=False, why=why)
                continue
            if watch.watchers <= 0 and watch.detached_ms and now_ms - watch.detached_ms > grace_ms:
                await self.broker.cancel(
                    flight.job.rid,
                    self.settings.result_ttl_s,
                    reason="no client reattached within the grace period",
                )
                await self._drop(flight, fenced=False, why="detached")
