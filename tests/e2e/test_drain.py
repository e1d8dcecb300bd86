"""SIGTERM drains: a gateway hands its clients to another gateway; a worker releases what it cannot
finish within its grace period for immediate reclaim."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, async_wait_for, expected_sim, wait_for


@pytest.fixture
def two_gateways(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    procs = StackProcs(redis_server.url, f"d{uuid.uuid4().hex[:10]}", log_dir)
    try:
        for _ in range(2):
            procs.add_gateway()
        procs.add_worker(sim_decode_base_ms=30, heartbeat_s=0.3, detach_grace_s=30)
        procs.wait_workers(procs.gateways[0][1])
        yield procs
    finally:
        procs.stop()


def _body(prompt: str, seed: int) -> dict[str, object]:
    return {"model": "sim", "prompt": prompt, "seed": seed, "max_tokens": 60, "ignore_eos": True}


async def test_gateway_sigterm_hands_streams_to_another_gateway(two_gateways: StackProcs) -> None:
    (gw_a, url_a), (_, url_b) = two_gateways.gateways
    ws_url = url_a.replace("http://", "ws://") + "/v1/ws"
    sse_parts: list[str] = []
    sse_lines: list[str] = []
    ws_parts: list[str] = []
    async with websockets.connect(ws_url) as ws, httpx.AsyncClient(timeout=60) as http:
        await ws.send(orjson.dumps(_body("drain over ws", 21)).decode())
        created = orjson.loads(await ws.recv())
        ws_rid = created["request_id"]
        async with http.stream(
            "POST", f"{url_a}/v1/completions", json={**_body("drain over sse", 22), "stream": True}
        ) as resp:
            sse_rid = resp.headers["x-breakwater-request-id"]
            last_sse = 0
            async for line in resp.aiter_lines():
                sse_lines.append(line)
                if line.startswith("id: "):
                    last_sse = int(line[4:])
                elif line.startswith("data: {"):
                    sse_parts.append(orjson.loads(line[6:])["choices"][0]["text"])
                    if len(sse_parts) == 5:
                        gw_a.proc.send_signal(signal.SIGTERM)
        assert "data: [DONE]" not in sse_lines  # ended early, without [DONE]: the client must resume
        assert 5 <= len(sse_parts) < 60
        last_ws = 0
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                msg = orjson.loads(await ws.recv())
                if msg["type"] == "token":
                    ws_parts.append(msg["text"])
                    last_ws = msg["seq"]
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        # Both resume on the other gateway and get exactly the rest.
        async with http.stream(
            "GET", f"{url_b}/v1/requests/{sse_rid}/events", headers={"Last-Event-ID": str(last_sse)}
        ) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    sse_parts.append(orjson.loads(line[6:])["choices"][0]["text"])
    async with websockets.connect(url_b.replace("http://", "ws://") + "/v1/ws") as ws:
        await ws.send(orjson.dumps({"resume": ws_rid, "after": last_ws}).decode())
        while True:
            msg = orjson.loads(await ws.recv())
            if msg["type"] == "token":
                ws_parts.append(msg["text"])
            elif msg["type"] == "done":
                break
    assert (
        "".join(sse_parts)
        == expected_sim(prompt="drain over sse", seed=22, max_tokens=60, ignore_eos=True)[0]
    )
    assert (
        "".join(ws_parts) == expected_sim(prompt="drain over ws", seed=21, max_tokens=60, ignore_eos=True)[0]
    )
    wait_for(lambda: not gw_a.alive(), 15, what="drained gateway exits")
    assert gw_a.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    assert '"msg":"draining"' in gw_a.log()


async def test_worker_releases_unfinished_jobs_at_the_drain_deadline(
    redis_server: RedisServer, log_dir: Path, redis: Redis
) -> None:
    procs = StackProcs(redis_server.url, f"d{uuid.uuid4().hex[:10]}", log_dir)
    # A 6 s lease (3 x 2 s heartbeats): without the release, the job would wait that long for reclaim.
    slow: dict[str, Any] = {"sim_decode_base_ms": 30, "heartbeat_s": 2.0, "drain_grace_s": 0.5}
    try:
        url = procs.add_gateway()
        first = procs.add_worker(**slow)
        procs.wait_workers(url)
        async with httpx.AsyncClient(timeout=60) as http:
            body = {**_body("release me", 31), "max_tokens": 150, "stream": True}
            async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                rid = resp.headers["x-breakwater-request-id"]
                procs.add_worker(**slow)
                procs.wait_workers(url, count=2)
                parts: list[str] = []
                async for line in resp.aiter_lines():
                    if line.startswith("data: {") and (text := orjson.loads(line[6:])["choices"][0]["text"]):
                        parts.append(text)
                        if len(parts) == 10:
                            first.proc.send_signal(signal.SIGTERM)
                            stopped = time.monotonic()
                            await async_wait_for(
                                lambda: _owner_is(redis, procs, rid, procs.workers[1].args[-1]),
                                4.5,
                                what="reclaimed by the other worker well before the 6 s lease",
                            )
                            taken_over = time.monotonic() - stopped
        record = await redis.hgetall(procs.keys_request(rid))
    finally:
        procs.stop()
    assert record["status"] == "done" and record["attempt"] == "2"
    assert "".join(parts) == expected_sim(prompt="release me", seed=31, max_tokens=150, ignore_eos=True)[0]
    assert taken_over < 4.5
    assert "released jobs for reclaim" in first.log()


async def _owner_is(redis: Redis, procs: StackProcs, rid: str, worker: str) -> bool:
    return await redis.hget(procs.keys_request(rid), "worker") == worker
