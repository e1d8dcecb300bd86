"""A request's ``timeout`` is its queue's deadline: one still queued when it passes ends with the
``timeout`` error at the deadline (a whole answer's 504, a stream's last event), not when a worker
at last takes its job; one that started before it runs to its end."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.gateway import deadlines, following
from breakwater.redis_server import RedisServer
from tests.inproc import InProc, busy_gateway, inproc_gateway

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def _status(gw: InProc, rid: str) -> str:
    status: str = (await gw.http.get(f"/v1/requests/{rid}")).json()["status"]
    return status


async def test_a_whole_answer_queued_past_its_timeout_is_a_504_at_the_deadline(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with busy_gateway(redis_server.url, prefix, 3.0) as gw:
        rids = gw.queued_ids(monkeypatch)
        with pytest.raises(openai.APIStatusError) as raised:
            await gw.sdk().chat.completions.create(**CHAT, extra_body={"timeout": 0.3})  # type: ignore[call-overload]
        # Answered while the worker is still busy with the request ahead (a worker never took it).
        assert await _status(gw, gw.busy_rid) == "running"
        assert await _status(gw, rids[0]) == "error"
        metrics = gw.app.state.service.metrics
        assert metrics.registry.get_sample_value("breakwater_queue_timeouts_total", {"model": "sim"}) == 1
    assert raised.value.status_code == 504
    body: Any = raised.value.body
    assert (body["code"], body["type"]) == ("timeout", "timeout")


async def test_a_stream_queued_past_its_timeout_ends_with_the_timeout_error(
    redis_server: RedisServer, prefix: str
) -> None:
    async with busy_gateway(redis_server.url, prefix, 3.0, sse_keepalive_s=0) as gw:
        got = await gw.http.post("/v1/chat/completions", json={**CHAT, "stream": True, "timeout": 0.3})
        assert await _status(gw, gw.busy_rid) == "running"
    assert got.status_code == 200
    (event,) = [e for e in got.content.split(b"\n\n") if e]
    assert event.startswith(b"id: 1\ndata: ")
    error = orjson.loads(event.split(b"data: ", 1)[1])["error"]
    assert (error["code"], error["type"]) == ("timeout", "timeout")


async def test_a_stream_whose_deadline_write_meets_redis_away_still_ends_with_the_timeout_error(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write that ends the queued request at its deadline fails (Redis failing over): asked
    again shortly, as the stream's reads ride it out; the unhandled error broke the body before."""
    real = deadlines.end_queued
    failed: list[str] = []

    async def away(broker: Any, rid: str, ttl_s: int) -> int:
        if len(failed) < 2:
            failed.append(rid)
            raise RedisConnectionError("Redis is failing over")
        return await real(broker, rid, ttl_s)

    monkeypatch.setattr(following, "end_queued", away)
    async with busy_gateway(redis_server.url, prefix, 3.0, sse_keepalive_s=0) as gw:
        got = await gw.http.post("/v1/chat/completions", json={**CHAT, "stream": True, "timeout": 0.3})
        assert await _status(gw, gw.busy_rid) == "running"
    assert got.status_code == 200 and len(failed) == 2
    (event,) = [e for e in got.content.split(b"\n\n") if e]
    error = orjson.loads(event.split(b"data: ", 1)[1])["error"]
    assert (error["code"], error["type"]) == ("timeout", "timeout")


async def test_a_request_that_started_before_its_deadline_runs_to_its_end(
    redis_server: RedisServer, prefix: str
) -> None:
    """20 steps of 60 ms: it runs well past its 0.3 s; the deadline was its queue's."""
    async with inproc_gateway(redis_server.url, prefix, idle_poll_s=0.1) as gw:
        await gw.add_worker(SimEngine(SimOptions(decode_base_ms=60, decode_per_seq_ms=0)))
        body = {**CHAT, "max_tokens": 20, "ignore_eos": True, "timeout": 0.3}
        got = await gw.http.post("/v1/chat/completions", json=body)
    assert got.status_code == 200, got.text
    assert got.json()["usage"]["completion_tokens"] == 20
