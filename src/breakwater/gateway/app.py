"""``build_app(settings)``: the gateway's FastAPI app; the lifespan owns every client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST

from breakwater.broker import Broker, redacted
from breakwater.broker.batches import BatchStore
from breakwater.config import GatewaySettings
from breakwater.gateway import batches, responses, routes, ws
from breakwater.gateway.batch_runner import BatchRunner
from breakwater.gateway.body import BodyLimitMiddleware
from breakwater.gateway.cors import CrossSiteGuard, HostGuard, add_cors
from breakwater.gateway.deadlines import QueueReaper
from breakwater.gateway.embedded import EmbeddedWorker, embedded_settings
from breakwater.gateway.errors import install_error_handlers
from breakwater.gateway.fastpath import FastCompletions
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.middleware import RequestIdMiddleware
from breakwater.gateway.service import GatewayService
from breakwater.gateway.streaming import GatewayApp
from breakwater.hosts import host_rule
from breakwater.plainhttp import PlainHTTP
from breakwater.runtime import settle_heap
from breakwater.stopping import stop_loops

log = logging.getLogger(__name__)
GAUGE_INTERVAL_S = 1.0
MULTIPART_SLACK = 64 << 10  # an upload's form fields and boundaries beside the file itself


async def _refresh_gauges(svc: GatewayService) -> None:
    while True:
        try:
            await svc.signals.refresh()
        except Exception as exc:  # Redis down: keep serving, try again next tick
            log.warning("gauge refresh failed", extra={"fields": {"error": str(exc)}})
        await asyncio.sleep(GAUGE_INTERVAL_S)


async def _rollouts(svc: GatewayService) -> None:
    """Aliases read again, this gateway's counts per version flushed, canaries judged: every second,
    in a loop of its own (a slow {rollout} slot must not hold up the autoscaling gauges)."""
    while True:
        try:
            await svc.guard.tick()
        except Exception as exc:
            log.warning("rollout guard failed", extra={"fields": {"error": str(exc)}})
        await asyncio.sleep(GAUGE_INTERVAL_S)


def metrics_listener(settings: GatewaySettings, metrics: GatewayMetrics) -> PlainHTTP | None:
    """``/metrics`` (and ``/healthz``) on ``metrics_port``, off the public listener."""
    if not settings.metrics_port:
        return None

    def respond(method: str, path: str) -> tuple[int, bytes, str]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed", "text/plain"
        if path == "/metrics":
            return 200, metrics.exposition(), CONTENT_TYPE_LATEST
        if path == "/healthz":
            return 200, b'{"status":"ok"}', "application/json"
        return 404, b"not found", "text/plain"

    return PlainHTTP(
        settings.metrics_host, settings.metrics_port, respond, "gateway metrics", settings.allowed_hosts
    )


def build_app(settings: GatewaySettings) -> FastAPI:
    embedded = EmbeddedWorker(embedded_settings(settings)) if settings.embed_engine else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        broker = Broker.connect(settings)
        cache_settings = settings.cache_index()
        index = Broker.connect(cache_settings) if cache_settings is not None else broker
        metrics = GatewayMetrics()
        if embedded is not None:
            metrics.beside.append(embedded.metrics.registry)
        fanin = broker.fanin(settings.stream_buffer, on_overflow=metrics.stream_overflows.inc)
        await fanin.start()
        svc = GatewayService(settings, broker, fanin, metrics, cache_index=index)
        app.state.service = svc
        app.state.batches = store = BatchStore(broker.redis, broker.fast, broker.keys)
        gauges = asyncio.create_task(_refresh_gauges(svc), name="gauges")
        rollouts = asyncio.create_task(_rollouts(svc), name="rollouts")
        reaper = QueueReaper(broker, metrics, settings.result_ttl_s)
        deadlines = asyncio.create_task(reaper.run(GAUGE_INTERVAL_S), name="deadlines")
        app.state.batch_runner = BatchRunner(svc, store)
        runner = asyncio.create_task(
            app.state.batch_runner.run() if settings.batch_runner else asyncio.Event().wait(), name="batches"
        )
        admin = metrics_listener(settings, metrics)
        if admin is not None:
            await admin.start()
        if embedded is not None:
            embedded.start()
        settle_heap()
        log.info(
            "gateway ready",
            extra={
                "fields": {
                    "redis": redacted(settings.redis_url),
                    "prefix": settings.key_prefix,
                    "auth": settings.auth,
                    "embedded_engine": settings.embed_engine or None,
                }
            },
        )
        try:
            yield
        finally:
            if embedded is not None:  # its jobs' clients were told to resume elsewhere (drain)
                await embedded.close()
            svc.end_grace()
            await stop_loops([gauges, rollouts, deadlines, runner])  # they log their own failures
            if admin is not None:
                await admin.close()
            await svc.versions.close()
            await fanin.close()
            await broker.aclose()
            if index is not broker:
                await index.aclose()

    # FastAPI's schema and its pages: with API keys, not on the public listener (the schema is no
    # secret, but an exposed surface should not serve pages that load a CDN's scripts).
    public = settings.auth != "keys"
    app = GatewayApp(
        title="Breakwater",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if public else None,
        redoc_url="/redoc" if public else None,
        openapi_url="/openapi.json" if public else None,
    )
    app.state.embedded = embedded
    install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(responses.router)
    app.include_router(batches.router)
    app.include_router(ws.router)
    app.add_middleware(FastCompletions)  # innermost: after X-Request-ID and the body limit
    uploads = {"/v1/files": settings.files_max_bytes + MULTIPART_SLACK}
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, paths=uploads)
    app.add_middleware(CrossSiteGuard, origins=settings.cors_origins)
    app.add_middleware(RequestIdMiddleware)
    add_cors(app, settings.cors_origins)  # a preflight needs none of the others
    if (rule := host_rule(settings.host, settings.allowed_hosts)) is not None:
        app.add_middleware(HostGuard, rule=rule)  # outermost: a name not the gateway's, nothing runs
    return app
