"""SIGTERM drains: a gateway hands its clients to another gateway; a worker releases what it cannot
finish within its grace period for immediate reclaim."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
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


async def test_with_a_stream_grace_a_plain_openai_client_gets_its_whole_answer(
    redis_server: RedisServer, log_dir: Path
) -> None:
    """A gateway given ``stream_grace_s`` lets its open SSE streams run on after SIGTERM: the
    official client, which cannot resume, gets the whole answer and its finish reason; the gateway
    takes no new connection meanwhile and exits once its streams are done, well inside the grace."""
    procs = StackProcs(redis_server.url, f"d{uuid.uuid4().hex[:10]}", log_dir)
    parts: list[str] = []
    finish: str | None = None
    try:
        url = procs.add_gateway(stream_grace_s=60)
        procs.add_worker(sim_decode_base_ms=30, heartbeat_s=0.3, detach_grace_s=30)
        procs.wait_workers(url)
        ((gw, _),) = procs.gateways
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            stream = await client.completions.create(
                model="sim",
                prompt="drain gently",
                seed=23,
                max_tokens=60,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                parts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
                if len(parts) == 5:
                    gw.proc.send_signal(signal.SIGTERM)
                    await async_wait_for(lambda: _refused(url), 10, what="the draining gateway refusing")
        wait_for(lambda: not gw.alive(), 30, what="the gateway exiting once its stream ended")
    finally:
        procs.stop()
    text, reason, _ = expected_sim(prompt="drain gently", seed=23, max_tokens=60, ignore_eos=True)
    assert ("".join(parts), finish) == (text, reason)
    assert gw.proc.returncode in (0, -signal.SIGTERM)
    assert '"stream_grace_s":60.0' in gw.log()  # it drained with the grace
    assert "stream grace over" not in gw.log()  # and the stream ended on its own, inside it


async def test_with_a_stream_grace_a_websocket_gets_its_answers_then_closes(
    redis_server: RedisServer, log_dir: Path
) -> None:
    """With ``stream_grace_s`` a WebSocket's requests run on after SIGTERM, as SSE streams do: the
    socket gets every token and ``done``, a new request on it meanwhile is refused (503 draining),
    then it closes with 1012; a socket that follows nothing closes with 1012 at once."""
    procs = StackProcs(redis_server.url, f"d{uuid.uuid4().hex[:10]}", log_dir)
    parts: list[str] = []
    errors: list[tuple[int, str]] = []
    try:
        url = procs.add_gateway(stream_grace_s=60)
        procs.add_worker(sim_decode_base_ms=30, heartbeat_s=0.3, detach_grace_s=30)
        procs.wait_workers(url)
        ((gw, _),) = procs.gateways
        ws_url = url.replace("http://", "ws://") + "/v1/ws"
        async with websockets.connect(ws_url) as ws, websockets.connect(ws_url) as idle:
            await ws.send(orjson.dumps({**_body("drain a socket gently", 25), "max_tokens": 200}).decode())
            finish = None
            while finish is None:
                msg = orjson.loads(await ws.recv())
                if msg["type"] == "token":
                    parts.append(msg["text"])
                    if len(parts) == 5:
                        gw.proc.send_signal(signal.SIGTERM)
                        with pytest.raises(ConnectionClosed) as idle_closed:
                            await asyncio.wait_for(idle.recv(), 10)
                        await ws.send(orjson.dumps(_body("too late", 26)).decode())
                elif msg["type"] == "error":
                    errors.append((msg["status"], msg["error"]["code"]))
                elif msg["type"] == "done":
                    finish = msg["finish_reason"]
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        wait_for(lambda: not gw.alive(), 30, what="the gateway exiting once its socket closed")
    finally:
        procs.stop()
    assert idle_closed.value.rcvd is not None and idle_closed.value.rcvd.code == 1012
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert errors == [(503, "draining")]
    text, reason, _ = expected_sim(prompt="drain a socket gently", seed=25, max_tokens=200, ignore_eos=True)
    assert ("".join(parts), finish) == (text, reason)
    assert "stream grace over" not in gw.log()  # the socket's request ended on its own, inside it


async def test_a_socket_still_authenticating_at_sigterm_is_closed_before_the_shutdown_timeout(
    redis_server: RedisServer, log_dir: Path
) -> None:
    """A WebSocket that has not sent its key yet is no request's: it is closed with 1012 shortly
    before uvicorn's graceful-shutdown timeout (5 s without a stream grace), not cancelled by it."""
    procs = StackProcs(redis_server.url, f"d{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway(auth="keys", auth_pepper="test-pepper-for-drain")
        ((gw, _),) = procs.gateways
        async with websockets.connect(url.replace("http://", "ws://") + "/v1/ws") as ws:
            gw.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 15)
        wait_for(lambda: not gw.alive(), 15, what="the gateway exiting")
    finally:
        procs.stop()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert "timeout graceful shutdown exceeded" not in gw.log() and "Traceback" not in gw.log()


async def _refused(url: str) -> bool:
    """The gateway takes no new request: its listener is closed, or it answers 503 draining."""
    async with httpx.AsyncClient(timeout=2) as http:
        try:
            resp = await http.get(f"{url}/readyz")
        except httpx.TransportError:
            return True
    return resp.status_code == 503 and "draining" in resp.text


async def test_a_stream_still_open_when_the_grace_is_over_ends_for_its_client_to_resume(
    redis_server: RedisServer, log_dir: Path
) -> None:
    """Streams outlasting ``stream_grace_s`` go on streaming until it is over, then end without
    ``[DONE]``, as without a grace; the rest is read on another gateway."""
    procs = StackProcs(redis_server.url, f"d{uuid.uuid4().hex[:10]}", log_dir)
    lines: list[str] = []
    parts: list[str] = []
    try:
        url = procs.add_gateway(stream_grace_s=1)
        other = procs.add_gateway()
        procs.add_worker(sim_decode_base_ms=30, heartbeat_s=0.3, detach_grace_s=30)
        procs.wait_workers(url)
        gw = procs.gateways[0][0]
        body = {**_body("outlast the grace", 24), "max_tokens": 400, "stream": True}
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                rid = resp.headers["x-breakwater-request-id"]
                async for line in resp.aiter_lines():
                    lines.append(line)
                    if line.startswith("data: {"):
                        parts.append(orjson.loads(line[6:])["choices"][0]["text"])
                        if len(parts) == 5:
                            gw.proc.send_signal(signal.SIGTERM)
                            signalled = len(lines)
            last = max(int(line[4:]) for line in lines if line.startswith("id: "))
            cut = len(parts)
            headers = {"Last-Event-ID": str(last)}
            async with http.stream("GET", f"{other}/v1/requests/{rid}/events", headers=headers) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        parts.append(orjson.loads(line[6:])["choices"][0]["text"])
        wait_for(lambda: not gw.alive(), 15, what="the gateway exiting")
    finally:
        procs.stop()
    assert "data: [DONE]" not in lines  # ended early: the client resumes
    # It streamed on through the grace (1 s of 30 ms steps), and ended long before its 400 tokens.
    assert 15 < cut < 200 and len(lines) > signalled + 20
    text = expected_sim(prompt="outlast the grace", seed=24, max_tokens=400, ignore_eos=True)[0]
    assert "".join(parts) == text
    assert "stream grace over; ending streams" in gw.log()
