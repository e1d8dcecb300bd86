"""The in-process tier: the gateway app from its factory driven through ``httpx.ASGITransport``, and
workers with the sim engine, all in the test's event loop against the real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI

from breakwater.broker import Broker
from breakwater.config import GatewaySettings, WorkerSettings
from breakwater.engines.base import Engine
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.gateway.app import build_app
from breakwater.keys import Keys
from breakwater.worker import Worker

STOP_S = 30.0  # how long a cancelled worker may take to stop


@dataclass
class InProc:
    redis_url: str
    prefix: str
    app: FastAPI
    http: httpx.AsyncClient
    workers: list[tuple[Worker, asyncio.Task[None]]] = field(default_factory=list)
    busy_rid: str = ""  # busy_gateway's own request

    def sdk(self) -> openai.AsyncOpenAI:
        """The official ``openai`` client driving this gateway in-process (the SDK brings its own
        httpx, ``httpx2``, whose ASGI transport runs the app)."""
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.app), base_url="http://gw")
        return openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0)

    def broker(self) -> Broker:
        """A fresh broker for the test's own checks (closed by the fixture)."""
        return Broker.connect(GatewaySettings(redis_url=self.redis_url, key_prefix=self.prefix))

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def queued_ids(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """From now on, the id of every request the gateway queues (as it opens its live channel),
        in order: a test's handle on a request whose answer (with its id) has not come yet."""
        fanin = self.app.state.service.fanin
        rids: list[str] = []
        opened = fanin.open

        async def open_and_note(rid: str, *args: Any, **kwargs: Any) -> Any:
            rids.append(rid)
            return await opened(rid, *args, **kwargs)

        monkeypatch.setattr(fanin, "open", open_and_note)
        return rids

    async def records(self) -> list[str]:
        """The request records in Redis (a refused request must leave none)."""
        broker = self.broker()
        try:
            return [k async for k in broker.redis.scan_iter(match=f"{self.prefix}:req:*")]
        finally:
            await broker.aclose()

    async def add_worker(self, engine: Engine | None = None, **settings: Any) -> Worker:
        ws = WorkerSettings(
            redis_url=self.redis_url,
            key_prefix=self.prefix,
            heartbeat_s=settings.pop("heartbeat_s", 0.2),
            worker_id=settings.pop("worker_id", f"w{len(self.workers)}"),
            **settings,
        )
        engine = engine or SimEngine(SimOptions(decode_base_ms=1, decode_per_seq_ms=0))
        await engine.start()
        worker = Worker(ws, engine, Broker.connect(ws))
        task = asyncio.create_task(worker.run(), name=ws.worker_id)
        self.workers.append((worker, task))
        deadline = asyncio.get_running_loop().time() + 10
        while ws.worker_id not in await worker.broker.live_workers():  # registered: requests resolve
            assert not task.done(), task
            assert asyncio.get_running_loop().time() < deadline, "worker did not register"
            await asyncio.sleep(0.01)
        return worker

    async def stop_workers(self) -> None:
        """Cancel every worker, then wait for them all, bounded: one that does not stop fails the
        test naming it, with the stacks of every task still running (its loops are tasks of their
        own), instead of hanging the fixture until pytest's timeout."""
        workers, self.workers = self.workers, []
        for worker, task in workers:
            worker.drain()
            task.cancel()
        tasks = [task for _, task in workers]
        stuck: set[asyncio.Task[None]] = set()
        try:
            if tasks:
                _, stuck = await asyncio.wait(tasks, timeout=STOP_S)
            for task in tasks:
                if task not in stuck:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        task.result()
        finally:
            for worker, _ in workers:  # bounded too: a close that hangs names itself
                closing = asyncio.ensure_future(worker.broker.aclose())
                if not (await asyncio.wait({closing}, timeout=STOP_S))[0]:
                    raise AssertionError(
                        f"worker {worker.settings.worker_id}'s Redis clients still closing after "
                        f"{STOP_S} s:\n{_stacks()}"
                    )
        if stuck:
            names = ", ".join(sorted(task.get_name() for task in stuck))
            raise AssertionError(f"workers {names} still running {STOP_S} s after cancel:\n{_stacks()}")


def _stacks() -> str:
    """Every other task's stack, for a test that fails because something did not stop."""
    where = io.StringIO()
    for other in asyncio.all_tasks():
        if other is not asyncio.current_task():
            other.print_stack(file=where)
    return where.getvalue()


@contextlib.asynccontextmanager
async def inproc_gateway(redis_url: str, prefix: str, **settings: Any) -> AsyncIterator[InProc]:
    settings.setdefault("allowed_hosts", "gw")  # the name the tests reach it by (hosts.py)
    app = build_app(GatewaySettings(redis_url=redis_url, key_prefix=prefix, model_cache_s=0, **settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30) as http,
    ):
        inproc = InProc(redis_url, prefix, app, http)
        try:
            yield inproc
        finally:
            await inproc.stop_workers()


@contextlib.asynccontextmanager
async def busy_gateway(redis_url: str, prefix: str, busy_s: float, **settings: Any) -> AsyncIterator[InProc]:
    """A gateway whose one worker, with room for one sequence, is busy for about ``busy_s`` (20 steps)
    with a request that is not the test's: the test's next request waits in the queue that long."""
    async with inproc_gateway(redis_url, prefix, **settings) as gw:
        step_ms = busy_s * 1000 / 20
        await gw.add_worker(SimEngine(SimOptions(capacity=1, decode_base_ms=step_ms, decode_per_seq_ms=0)))
        rids = gw.queued_ids(pytest.MonkeyPatch())
        body = {"model": "sim", "prompt": "busy", "max_tokens": 20, "ignore_eos": True}
        blocker = asyncio.create_task(gw.http.post("/v1/completions", json=body))
        deadline = time.monotonic() + 10
        while not rids or (await gw.http.get(f"/v1/requests/{rids[0]}")).json()["status"] != "running":
            assert time.monotonic() < deadline and not blocker.done(), "the busy request did not start"
            await asyncio.sleep(0.01)
        gw.busy_rid = rids[0]
        try:
            yield gw
        finally:
            assert (await blocker).status_code == 200


def post_scope(path: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    """A raw ASGI scope of a JSON POST to the in-process gateway (by the name it is reached by), for
    a test that drives the app's ``receive`` and ``send`` itself."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gw"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("gw", 80),
    }
