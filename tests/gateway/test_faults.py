"""Faults the gateway must survive: a full or read-only Redis (503 + Retry-After, then recovery),
resume from a trimmed token stream (ends, never spins), Idempotency-Keys outliving their results."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from breakwater.broker.idempotency import IdempotencyKey
from breakwater.gateway.errors import APIError
from breakwater.redis_server import RedisServer
from tests.helpers import expected_sim
from tests.inproc import InProc, inproc_gateway

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "faults"}]


def _sse_events(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]


async def test_full_redis_is_503_with_retry_after_then_recovers(
    own_redis: tuple[RedisServer, Redis], prefix: str
) -> None:
    server, redis = own_redis
    async with inproc_gateway(server.url, prefix) as gw:
        await gw.add_worker()
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", str(used // 2))  # full: every write is refused (OOM)
        try:
            body = {"model": "sim", "messages": MESSAGES, "max_tokens": 5, "seed": 9}
            resp = await gw.http.post(CHAT, json=body)
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "1" and resp.headers["x-breakwater-reason"] == "redis_oom"
            assert resp.json()["error"]["code"] == "redis_unavailable"
            assert [k async for k in redis.scan_iter(match=f"{prefix}:req:*")] == []
        finally:
            await redis.config_set("maxmemory", "0")
        resp = await gw.http.post(CHAT, json=body)
        assert resp.status_code == 200, resp.text
        text, _, _ = expected_sim(messages=MESSAGES, seed=9, max_tokens=5)
        assert resp.json()["choices"][0]["message"]["content"] == text


async def test_read_only_redis_is_503(own_redis: tuple[RedisServer, Redis], prefix: str) -> None:
    server, redis = own_redis
    async with inproc_gateway(server.url, prefix) as gw:
        await gw.add_worker()
        await redis.execute_command("REPLICAOF", "127.0.0.1", "1")  # type: ignore[no-untyped-call]  # a replica: writes are refused
        try:
            resp = await gw.http.post(CHAT, json={"model": "sim", "messages": MESSAGES, "max_tokens": 5})
            assert resp.status_code == 503 and resp.headers["x-breakwater-reason"] == "redis_readonly"
        finally:
            await redis.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]


async def test_resume_from_a_trimmed_stream_ends_with_an_error(gw: InProc) -> None:
    body = {"model": "sim", "messages": MESSAGES, "max_tokens": 12, "seed": 5, "ignore_eos": True}
    resp = await gw.http.post(CHAT, json=body)
    rid = resp.json()["id"]
    broker = gw.broker()
    try:  # the first events were trimmed away (token_stream_maxlen, or a slow reader past the trim)
        await broker.redis.xtrim(gw.keys.tokens(rid), minid="4-0", approximate=False)
    finally:
        await broker.aclose()
    got = await asyncio.wait_for(gw.http.get(f"/v1/requests/{rid}/events?after=1"), 10)
    assert got.status_code == 200
    [event] = _sse_events(got.content)
    assert event["error"]["code"] == "events_trimmed"
    # From a position still in the stream, a resume replays exactly the rest.
    got = await asyncio.wait_for(
        gw.http.get(f"/v1/requests/{rid}/events", headers={"Last-Event-ID": "5"}), 10
    )
    seqs = [int(line[4:]) for line in got.content.decode().splitlines() if line.startswith("id: ")]
    assert seqs[0] == 6 and seqs == list(range(6, 6 + len(seqs)))


async def test_idempotency_key_after_its_request_expired_starts_a_new_one(gw: InProc) -> None:
    body = {"model": "sim", "messages": MESSAGES, "max_tokens": 5, "seed": 11}
    headers = {"Idempotency-Key": "order-42"}
    first = await gw.http.post(CHAT, json=body, headers=headers)
    again = await gw.http.post(CHAT, json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]  # replayed, not run twice
    broker = gw.broker()
    try:
        scoped = IdempotencyKey("anonymous", "order-42", "")  # auth off: the one tenant
        key_ttl = await broker.redis.ttl(scoped.redis_key(gw.keys))
        record_ttl = await broker.redis.ttl(gw.keys.request(first.json()["id"]))
        assert key_ttl >= record_ttl > 0  # the key never forgets a result that is still readable
        rid = first.json()["id"]
        await broker.redis.delete(gw.keys.request(rid), gw.keys.tokens(rid), gw.keys.emitted(rid))
    finally:
        await broker.aclose()
    later = await gw.http.post(CHAT, json=body, headers=headers)
    assert later.status_code == 200, later.text  # not a 409 until the key expires
    assert later.json()["id"] != first.json()["id"]
    assert (
        later.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    )


async def test_a_served_model_outlives_lapsed_registrations(gw: InProc) -> None:
    """While Redis is down or full, workers cannot renew their liveness keys: a model that was just
    served must queue (or 503), not turn into a 404."""
    registry = gw.app.state.service.registry
    assert (await registry.resolve("sim")).workers == 1
    broker = gw.broker()
    try:
        await broker.redis.delete(gw.keys.worker_alive("w0"))  # the registration lapsed
    finally:
        await broker.aclose()
    info = await registry.resolve("sim")
    assert (info.workers, info.context_length) == (0, 4096)  # still known, with its last context
    with pytest.raises(APIError) as unknown:
        await registry.resolve("never-served")
    assert unknown.value.status == 404
