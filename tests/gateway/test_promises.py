"""What the docs promise, shown in process: drain and Redis outages answer 503 with Retry-After, the
queue bound holds under concurrency, lanes and sampling parameters reach the record, results stay
readable for result_ttl_s."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from breakwater.gateway.whole import restarting
from breakwater.redis_server import RedisServer
from breakwater.worker.jobs import generation_request
from tests.helpers import async_wait_for
from tests.inproc import InProc, inproc_gateway

CHAT = "/v1/chat/completions"


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": [{"role": "user", "content": "promise"}], "max_tokens": 6, **extra}


async def test_a_draining_gateway_refuses_new_work_and_is_not_ready(gw: InProc) -> None:
    assert (await gw.http.get("/readyz")).json() == {"status": "ready"}
    gw.app.state.service.begin_drain()
    resp = await gw.http.post(CHAT, json=_chat())
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "draining"
    assert resp.headers["retry-after"] == "1" and resp.headers["x-breakwater-reason"] == "draining"
    ready = await gw.http.get("/readyz")
    assert (ready.status_code, ready.json()) == (503, {"status": "draining"})


def test_every_draining_503_says_the_service_is_unavailable() -> None:
    """A request under way when the stream grace ended got ``invalid_request_error`` (the client's
    fault), where a new one's 503 says ``service_unavailable``, as a Redis outage's."""
    cut = restarting("chatcmpl-1", {"X-Breakwater-Request-Id": "chatcmpl-1"})
    assert (cut.status, cut.type, cut.code) == (503, "service_unavailable", "draining")
    assert cut.headers["X-Breakwater-Request-Id"] == "chatcmpl-1" and cut.headers["Retry-After"] == "1"


async def test_redis_outage_is_503_with_retry_after(tmp_path: Path, prefix: str) -> None:
    server = RedisServer(tmp_path / "r")
    server.start()
    try:
        async with inproc_gateway(server.url, prefix, models="sim") as gw:
            server.stop()
            resp = await gw.http.post(CHAT, json=_chat())
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "redis_unavailable"
            assert resp.headers["retry-after"] == "1"
            assert resp.headers["x-breakwater-reason"] == "redis_unavailable"
            ready = await gw.http.get("/readyz")
            assert (ready.status_code, ready.json()) == (503, {"status": "redis_unavailable"})
    finally:
        server.stop()


async def test_the_queue_bound_holds_under_concurrency(redis_server: RedisServer, prefix: str) -> None:
    """30 requests at once for a model with no worker yet and room for 5: exactly 5 are queued."""
    async with inproc_gateway(redis_server.url, prefix, models="cold", lane_max_queued=5) as gw:
        body = {"model": "cold", "messages": [{"role": "user", "content": "wait"}], "max_tokens": 2}
        calls = [asyncio.create_task(gw.http.post(CHAT, json=body)) for _ in range(30)]
        await async_wait_for(lambda: sum(c.done() for c in calls) == 25, 20, what="25 answers")
        answered = [c.result() for c in calls if c.done()]
        assert [r.status_code for r in answered] == [429] * 25
        assert all(
            r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1 for r in answered
        )
        broker = gw.broker()
        try:
            assert len([k async for k in broker.redis.scan_iter(match=f"{prefix}:req:*")]) == 5
            assert await broker.queue_depth("cold", "interactive") == (5, 0)
        finally:
            await broker.aclose()
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


async def test_lane_and_sampling_parameters_reach_the_engine(gw: InProc) -> None:
    resp = await gw.http.post(CHAT, json=_chat(lane="batch", top_p=0.5, top_k=7, temperature=0.3, seed=2))
    assert resp.status_code == 200, resp.text
    rid = resp.json()["id"]
    broker = gw.broker()
    try:
        record = await broker.get_record(rid)
        assert record is not None
        assert await broker.jobs_counts("sim", "batch") == (1, 1)  # it went through the batch lane
        assert await broker.jobs_counts("sim", "interactive") == (0, 0)
    finally:
        await broker.aclose()
    request = generation_request(rid, record)
    assert (request.top_p, request.top_k, request.temperature, request.seed) == (0.5, 7, 0.3, 2)
    assert request.messages == [{"role": "user", "content": "promise"}]


async def test_results_stay_readable_for_result_ttl(gw: InProc) -> None:
    resp = await gw.http.post(CHAT, json=_chat(seed=4))
    rid = resp.json()["id"]
    status = await gw.http.get(f"/v1/requests/{rid}")
    body = status.json()
    assert (body["status"], body["finish_reason"], body["usage"]) == (
        "done",
        "length",
        {"prompt_tokens": body["usage"]["prompt_tokens"], "completion_tokens": 6},
    )
    broker = gw.broker()
    try:
        ttl = await broker.redis.ttl(gw.keys.request(rid))
    finally:
        await broker.aclose()
    assert 3500 < ttl <= 3600  # result_ttl_s (default 3600) from the end, not from admission
    replay = await gw.http.get(f"/v1/requests/{rid}/events")
    assert replay.text.rstrip().endswith("data: [DONE]")
