"""A worker in the gateway's own event loop (``gateway --embed-engine openai``).

For an engine that computes elsewhere (``openai``: an upstream server; ``sim``) the worker is a
relay, and a process of its own costs every token a context switch and a second interpreter's
caches on a shared core. Embedded, it is the same :class:`~breakwater.worker.Worker` (it pulls from
the same queues, appends to the same durable streams, holds leases and heartbeats), so a gateway
that dies takes its jobs with it exactly as a worker process would: another worker reclaims and
continues them, and their clients resume on any gateway. Engines that compute in-process
(``llamacpp``, ``vllm``) would stall the gateway's loop and are refused.

An embedded worker that fails is started again after a backoff (a fresh engine and worker), as
``breakwater up`` restarts a worker process; the gateway serves meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Counter

from breakwater.broker import Broker
from breakwater.config import CommonSettings, GatewaySettings, WorkerSettings
from breakwater.engines import build_engine, options_from_settings
from breakwater.worker import Worker
from breakwater.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)
EMBEDDABLE = ("openai", "sim")
RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
RESTART_STABLE_S = 60.0  # up this long: the next failure starts the backoff over


def embedded_settings(gateway: GatewaySettings) -> WorkerSettings:
    """The embedded worker's settings: the gateway's Redis, key prefix and the rest of what the two
    must agree on (as the gateway was given them, flags included); its engine's and the worker's
    own from the environment, as a worker's; its own /metrics listener off (the gateway's /metrics
    carries its series). With ``embed_redis_username`` it connects as that ACL user instead."""
    shared = {name: getattr(gateway, name) for name in CommonSettings.model_fields}
    if gateway.embed_redis_username:
        shared |= {
            "redis_username": gateway.embed_redis_username,
            "redis_password": None,
            "redis_password_file": gateway.embed_redis_password_file,
        }
    return WorkerSettings(**shared, engine=gateway.embed_engine, metrics_port=0)


class EmbeddedWorker:
    def __init__(self, settings: WorkerSettings) -> None:
        if settings.engine not in EMBEDDABLE:
            raise ValueError(
                f"engine {settings.engine!r} cannot run inside the gateway (embeddable: "
                f"{', '.join(EMBEDDABLE)}); run it as `breakwater worker`"
            )
        self.settings = settings
        # One set of series across restarts (counters go on); the process's own are the gateway's.
        self.metrics = WorkerMetrics(process=False)
        self.restarts = Counter(
            "breakwater_embedded_worker_restarts_total",
            "Times the gateway's embedded worker was started again after it failed or stopped",
            registry=self.metrics.registry,
        )
        self.worker: Worker | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedded-worker")

    def drain(self) -> None:
        """Stop pulling; in-flight jobs finish within the drain grace, the rest are released."""
        self._closing = True
        if self.worker is not None:
            self.worker.drain()

    async def close(self) -> None:
        """:meth:`drain`, and wait until the worker has stopped (one still starting, e.g. waiting
        for its upstream to come up, is cancelled: it holds no job)."""
        self.drain()
        if self._task is not None:
            if self.worker is None:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_INITIAL_S
        while not self._closing:
            began = loop.time()
            try:
                await self._serve()
                why = "embedded worker stopped"
            except Exception:
                why = "embedded worker failed"
                log.exception(why)
            if self._closing:
                return
            if loop.time() - began > RESTART_STABLE_S:
                delay = RESTART_INITIAL_S
            log.warning("%s; starting it again", why, extra={"fields": {"in_s": delay}})
            self.restarts.inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    async def _serve(self) -> None:
        engine = build_engine(options_from_settings(self.settings))
        broker = Broker.connect(self.settings, token_stream_maxlen=self.settings.token_stream_maxlen)
        try:
            await engine.start()
            self.worker = Worker(self.settings, engine, broker, self.metrics)
            if self._closing:
                return
            await self.worker.run()
        finally:
            self.worker = None
            await engine.close()
            await broker.aclose()
