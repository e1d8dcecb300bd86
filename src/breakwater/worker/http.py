"""The worker's small HTTP side: ``/healthz`` (liveness), ``/readyz`` (readiness) and ``/metrics``.

It runs on the worker's own event loop, so a wedged loop fails the liveness probe, and it starts
before the engine loads, so a startup probe can wait out a long model load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from breakwater.worker.worker import Worker

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class WorkerHTTP:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.worker: Worker | None = None  # set once the engine has loaded
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("worker http listening", extra={"fields": {"host": self.host, "port": self.port}})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

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

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5.0)
            while (line := await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                if len(line) > 8192:
                    return
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2:
                return
            status, body, ctype = self.respond(parts[0], parts[1])
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if parts[0] == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
