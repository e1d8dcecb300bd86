"""A request's ``timeout`` is its queue's deadline: one still queued when it passes ends with the
``timeout`` error at the deadline (a whole answer's 504, a stream's last event), not when a worker
at last takes its job; one that started before it runs to its end."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
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
