"""The worker's probe and metrics port: what Kubernetes' startup, liveness and readiness probes
and Prometheus see while it loads, serves and drains."""

from __future__ import annotations

import signal
import threading
import uuid
from pathlib import Path

import httpx
import pytest

from breakwater.redis_server import RedisServer, free_port
from breakwater.worker.http import WorkerHTTP
from tests.helpers import StackProcs, metric_samples, wait_for

pytestmark = pytest.mark.timeout(120)


async def test_loading_answers_liveness_but_not_readiness() -> None:
    http = WorkerHTTP("127.0.0.1", free_port())
    await http.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http.port}") as client:
            live, ready, metrics = [await client.get(p) for p in ("/healthz", "/readyz", "/metrics")]
            assert (live.status_code, live.json()) == (200, {"status": "ok"})
            assert (ready.status_code, ready.json()) == (503, {"status": "loading"})
            assert metrics.status_code == 404  # no worker yet, nothing to report
            assert (await client.post("/healthz")).status_code == 405
            assert (await client.head("/healthz")).status_code == 200
    finally:
        await http.close()


def test_serving_then_draining(redis_server: RedisServer, log_dir: Path) -> None:
    procs = StackProcs(redis_server.url, f"h{uuid.uuid4().hex[:10]}", log_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        url = procs.add_gateway()
        worker = procs.add_worker(
            metrics_port=port, hourly_cost_usd=1.25, sim_decode_base_ms=50, heartbeat_s=0.5, drain_grace_s=20
        )
        procs.wait_workers(url)
        ready = httpx.get(f"{base}/readyz", timeout=2)
        assert (ready.status_code, ready.json()) == (200, {"status": "ready", "model": "sim"})
        assert httpx.get(f"{base}/nope", timeout=2).status_code == 404
        assert metric_samples(base, "breakwater_worker_hourly_cost_dollars")[0] == 1.25
        # Alert inputs exist before anything happened (so increase() has a baseline).
        assert metric_samples(base, "breakwater_dead_letters_total")[0] == 0

        # A long job in flight, then SIGTERM: not ready any more, still alive, job still running.
        done = threading.Event()

        def long_request() -> None:
            body = {
                "model": "sim",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 80,
                "seed": 1,
            }
            httpx.post(f"{url}/v1/chat/completions", json={**body, "ignore_eos": True}, timeout=60)
            done.set()

        threading.Thread(target=long_request, daemon=True).start()
        wait_for(lambda: _running(base) == 1, 10, 0.05, "job running")
        worker.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 503, 5, 0.05, "not ready")
        assert httpx.get(f"{base}/readyz", timeout=2).json() == {"status": "draining"}
        assert httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        assert not done.is_set()
        assert done.wait(30), "the in-flight job finished during the drain"
        assert worker.proc.wait(30) == 0
    finally:
        procs.stop()


def _running(base: str) -> float:
    return sum(metric_samples(base, "breakwater_worker_running"))
