"""A resume from a stream's very last event id: only ``[DONE]`` may have been lost, so ``[DONE]`` is
all it gets, for one choice whose tool calls the gateway parses (its events are replayed from the
start for the parser) and for ``n > 1`` (whose last id names every choice's last event)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.gateway import following
from breakwater.redis_server import RedisServer
from tests.gateway.test_openai_params import TOOLS, CallingSim
from tests.inproc import InProc, busy_gateway, inproc_gateway


def _events(body: str) -> list[tuple[str, str]]:
    """The stream's (id, data) pairs in order (id '' for an event without one)."""
    out = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            out.append((fields.get("id", ""), fields["data"]))
    return out


async def _streamed(gw: InProc, body: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    resp = await gw.http.post("/v1/chat/completions", json={**body, "stream": True})
    assert resp.status_code == 200, resp.text
    return resp.headers["x-breakwater-request-id"], _events(resp.text)


async def _resumed(gw: InProc, rid: str, last_id: str) -> list[tuple[str, str]]:
    resp = await gw.http.get(f"/v1/requests/{rid}/events", headers={"Last-Event-ID": last_id})
    assert resp.status_code == 200, resp.text
    return _events(resp.text)


@pytest.mark.parametrize("usage", [False, True])
async def test_the_models_own_calls_resumed_at_the_end_get_only_done(gw_empty: InProc, usage: bool) -> None:
    """The finish chunk (and usage) went out again: the client saw them twice."""
    await gw_empty.add_worker(CallingSim())
    body: dict[str, Any] = {
        "model": "sim",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": TOOLS,
        "max_tokens": 4,
        "ignore_eos": True,
        "stream_options": {"include_usage": usage},
    }
    rid, events = await _streamed(gw_empty, body)
    assert events[-1] == ("", "[DONE]")
    chunks = [orjson.loads(d)["choices"] for _, d in events[:-1]]
    assert any(c and c[0]["delta"].get("tool_calls") for c in chunks)
    assert chunks[-1 - usage][0]["finish_reason"] == "length"  # (cut at max_tokens after its calls)
    last_id = [i for i, _ in events if i][-1]
    assert await _resumed(gw_empty, rid, last_id) == [("", "[DONE]")]
    earlier = next(i for i, _ in events if i)  # from an earlier id: the rest, as sent the first time
    assert await _resumed(gw_empty, rid, earlier) == [
        e for e in events if not e[0] or int(e[0]) > int(earlier)
    ]


async def test_n_choices_resumed_at_the_end_get_only_done(gw: InProc) -> None:
    """It was a 400 ('every choice was delivered') for a client that lost only ``[DONE]``."""
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 4}
    rid, events = await _streamed(gw, body)
    assert events[-1] == ("", "[DONE]")
    last_id = [i for i, _ in events if i][-1]
    assert await _resumed(gw, rid, last_id) == [("", "[DONE]")]


async def test_n_choices_resumed_after_the_error_that_ended_them_get_nothing_more(
    redis_server: RedisServer, prefix: str
) -> None:
    """One failed choice fails the response, its error the last event: a resume from that event's
    id got the other choice's error too, under an id the stream never had."""
    async with busy_gateway(redis_server.url, prefix, 3.0, sse_keepalive_s=0) as gw:
        body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 4}
        rid, events = await _streamed(gw, {**body, "timeout": 0.3})
        (last_id, data) = events[-1]
        assert orjson.loads(data)["error"]["code"] == "timeout"
        assert await _resumed(gw, rid, last_id) == []
        assert (await gw.http.get(f"/v1/requests/{gw.busy_rid}")).json()["status"] == "running"


async def test_a_resume_from_past_a_running_streams_end_answers_when_it_ends(
    redis_server: RedisServer, prefix: str
) -> None:
    """``after`` beyond the last event of a request still running: its events up to its end are all
    at or before it, so the resume has nothing to give; it answered only at the next idle re-read
    of the stream (``idle_poll_s``, here 30 s), not when the request ended (~0.5 s)."""
    async with inproc_gateway(redis_server.url, prefix, idle_poll_s=30, sse_keepalive_s=0) as gw:
        await gw.add_worker(SimEngine(SimOptions(decode_base_ms=50, decode_per_seq_ms=0)))
        rids = gw.queued_ids(pytest.MonkeyPatch())
        body = {"model": "sim", "prompt": "hi", "max_tokens": 10, "ignore_eos": True, "stream": True}
        streamed = asyncio.create_task(gw.http.post("/v1/completions", json=body))
        deadline = time.monotonic() + 10
        while not rids or (await gw.http.get(f"/v1/requests/{rids[0]}")).json()["status"] != "running":
            assert time.monotonic() < deadline, "the request did not start"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        resumed = await gw.http.get(f"/v1/requests/{rids[0]}/events", params={"after": 1000})
        assert resumed.status_code == 200 and _events(resumed.text) == [("", "[DONE]")]
        assert time.monotonic() - started < 10  # at its end, not at the re-read 30 s on
        events = _events((await streamed).text)
        assert [i for i, _ in events if i] == [str(seq) for seq in range(1, len(events))]


@pytest.mark.parametrize("failures", [3, 1000])
async def test_a_stream_rides_out_redis_away_then_ends_with_an_error_event(
    gw: InProc, monkeypatch: pytest.MonkeyPatch, failures: int
) -> None:
    """The stream's reads of Redis fail (a failover longer than the client's own retries): retried
    for a while, then the stream ends with a ``redis_unavailable`` event; it broke mid-body with an
    unhandled error (``Exception in ASGI application``), neither said nor resumable as such."""
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    rid, events = await _streamed(gw, body)
    broker = gw.app.state.service.broker
    read = broker.read_events
    left = [failures]

    async def away(*args: Any, **kwargs: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise RedisConnectionError("Redis is failing over")
        return await read(*args, **kwargs)

    monkeypatch.setattr(broker, "read_events", away)
    monkeypatch.setattr(following, "RIDE_OUT_S", 0.5)
    resumed = await _resumed(gw, rid, "0")
    if failures < 1000:
        assert resumed == events  # ridden out: the whole stream, as sent the first time
        return
    [(event_id, data)] = resumed
    error = orjson.loads(data)["error"]
    assert (event_id, error["code"], error["type"]) == ("", "redis_unavailable", "service_unavailable")
