"""The worker's small HTTP side: ``/healthz`` (liveness), ``/readyz`` (readiness) and ``/metrics``.

It runs on the worker's own event loop, so a wedged loop fails the liveness probe, and it starts
before the engine loads, so a startup probe can wait out a long model load.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from breakwater.plainhttp import PlainHTTP

if TYPE_CHECKING:
    from breakwater.worker.worker import Worker

log = logging.getLogger(__name__)


class WorkerHTTP(PlainHTTP):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port, self.respond, "worker")
        self.worker: Worker | None = None  # set once the engine has loaded

    def state(self) -> tuple[int, bytes, str]:
        """(status, body, content type) for a path."""
        worker = self.worker
        if worker is None:
            return 503, orjson.dumps({"status": "loading"}), "application/json"
        if worker.draining:
            return 503, orjson.dumps({"status": "draining"}), "application/json"
        return 200, orjson.dumps({"status": "ready", "model": worker.model}), "application/json"

    def respond(self, method: str, path: str) -> tuple[int, bytes, str]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, orjson.dumps({"error": "method not allowed"}), "application/json"
        if path == "/healthz":  # answering means the loop is alive; Redis outages are not ours
            if self.worker is not None and self.worker.step_hung():  # alive, but its engine is stuck
                return 503, orjson.dumps({"status": "engine_step_hung"}), "application/json"
            return 200, orjson.dumps({"status": "ok"}), "application/json"
        if path == "/readyz":
            return self.state()
        if path == "/metrics" and self.worker is not None:
            return 200, generate_latest(self.worker.metrics.registry), CONTENT_TYPE_LATEST
        return 404, orjson.dumps({"error": "not found"}), "application/json"
