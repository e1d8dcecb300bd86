"""The response cache's key and rules (gateway.cache), and its entries in a real Redis with the
gateway in process: a new model revision, a failed or cancelled first request and an expired record
all miss; entries carry the cache TTL; the counters count."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from breakwater.broker import RequestRecord, RequestSpec, Status
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.gateway.cache import (
    SHARED_SCOPE,
    CacheControl,
    cache_entry,
    reproducible,
    reusable,
)
from breakwater.gateway.models import ModelInfo, _aggregate
from breakwater.keys import Keys
from breakwater.redis_server import RedisServer
from tests.inproc import InProc, inproc_gateway

SPEC = RequestSpec(
    model="sim",
    lane="interactive",
    kind="chat",
    request_id="r1",
    timeout_s=60.0,
    messages=[{"role": "user", "content": "hello"}],
    max_tokens=16,
    temperature=0.0,
    tenant="tenant-a",
)
MODEL = ModelInfo("sim", 4096, 1, 8, 0, features=frozenset({"embeddings"}), fingerprint="sim:sim")


def _key(spec: RequestSpec = SPEC, model: ModelInfo = MODEL, shared: bool = False) -> str:
    return cache_entry(Keys("bw"), spec, model, shared=shared).key


def test_the_key_ignores_what_does_not_change_the_answer() -> None:
    same = dataclasses.replace(SPEC, request_id="r2", timeout_s=5.0, lane="batch", key_id="key_2")
    assert _key(same) == _key()


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "hello!"}]},
        {"max_tokens": 17},
        {"temperature": None, "seed": 1},
        {"seed": 2},
        {"top_p": 0.5},
        {"top_k": 5},
        {"stop": ["x"]},
        {"ignore_eos": True},
        {"include_usage": True},
        {"logprobs": 2},
        {"response_format": '{"type": "json_object"}'},
        {"tool_call": "f"},
        {"tool_format": "hermes"},
        {"tools": '{"tools": []}'},
        {"tool_format": "hermes/1"},
        {"presence_penalty": 0.5},
        {"frequency_penalty": -0.5},
        {"logit_bias": '{"42": -100.0}'},
        {"kind": "completion", "messages": None, "prompt": "hello"},
        {"model": "other"},
        {"tenant": "tenant-b"},
    ],
)
def test_whatever_changes_the_answer_changes_the_key(change: dict[str, Any]) -> None:
    assert _key(dataclasses.replace(SPEC, **change)) != _key()


def test_a_new_fingerprint_or_feature_set_changes_the_key() -> None:
    assert _key(model=dataclasses.replace(MODEL, fingerprint="sim:sim@v2")) != _key()
    assert _key(model=dataclasses.replace(MODEL, features=frozenset())) != _key()


def test_a_shared_model_has_one_entry_for_every_tenant() -> None:
    b = dataclasses.replace(SPEC, tenant="tenant-b")
    assert _key(b, shared=True) == _key(shared=True) != _key()
    assert cache_entry(Keys("bw"), b, MODEL, shared=True).scope == SHARED_SCOPE


def test_the_key_names_model_and_scope_by_hash_for_purging() -> None:
    key = _key()
    assert key.startswith("bw:cache:") and "tenant-a" not in key and "sim" not in key
    assert Keys("bw").cache_pattern("sim", "tenant-a")[:-1] in key
    assert Keys("bw").cache_pattern("sim")[: len("bw:cache:") + 16] == key[: len("bw:cache:") + 16]


def test_only_reproducible_requests_are_cacheable() -> None:
    assert reproducible(SPEC)
    assert reproducible(dataclasses.replace(SPEC, temperature=0.7, seed=3))
    assert not reproducible(dataclasses.replace(SPEC, temperature=0.7))
    assert not reproducible(dataclasses.replace(SPEC, temperature=None))
    assert reproducible(dataclasses.replace(SPEC, kind="embedding", temperature=None, inputs=["x"]))


@pytest.mark.parametrize(
    ("header", "lookup", "store"),
    [
        (None, True, True),
        ("no-cache", False, True),
        ("No-Store", True, False),
        ("max-age=0, no-cache, no-store", False, False),
        ("private", True, True),
    ],
)
def test_cache_control(header: str | None, lookup: bool, store: bool) -> None:
    assert CacheControl.parse(header) == CacheControl(lookup, store)


@pytest.mark.parametrize(
    ("status", "tenant", "ok"),
    [
        (Status.QUEUED, "tenant-a", True),
        (Status.RUNNING, "tenant-a", True),
        (Status.DONE, "tenant-a", True),
        (Status.ERROR, "tenant-a", False),
        (Status.CANCELLED, "tenant-a", False),
        (Status.DONE, "tenant-b", False),
    ],
)
def test_only_a_live_or_successful_request_of_the_scope_answers(
    status: Status, tenant: str, ok: bool
) -> None:
    record = RequestRecord(spec=dataclasses.replace(SPEC, tenant=tenant), status=status)
    assert reusable(record, "tenant-a") is ok
    assert reusable(record, SHARED_SCOPE) is (status in (Status.QUEUED, Status.RUNNING, Status.DONE))


def test_an_unfinished_request_answers_only_on_its_lane_and_with_no_shorter_timeout() -> None:
    running = RequestRecord(spec=SPEC, status=Status.RUNNING)
    assert reusable(running, "tenant-a", SPEC)
    assert reusable(running, "tenant-a", dataclasses.replace(SPEC, timeout_s=30.0))
    assert not reusable(running, "tenant-a", dataclasses.replace(SPEC, lane="batch"))
    assert not reusable(running, "tenant-a", dataclasses.replace(SPEC, timeout_s=120.0))
    done = dataclasses.replace(running, status=Status.DONE)  # a finished answer is whole: any lane, any time
    assert reusable(done, "tenant-a", dataclasses.replace(SPEC, lane="batch", timeout_s=120.0))


def test_workers_serving_different_fingerprints_make_a_model_uncacheable() -> None:
    info = {"model": "sim", "capacity": 4, "context_length": 4096, "features": []}
    assert _aggregate("sim", [{**info, "fingerprint": "a"}, {**info, "fingerprint": "a"}]).fingerprint == "a"
    assert _aggregate("sim", [{**info, "fingerprint": "a"}, {**info, "fingerprint": "b"}]).fingerprint == ""
    assert _aggregate("sim", [info]).fingerprint == ""


@pytest.fixture
async def cached(redis_server: RedisServer, prefix: str) -> AsyncIterator[InProc]:
    async with inproc_gateway(redis_server.url, prefix, cache=True, cache_ttl_s=120) as inproc:
        await inproc.add_worker(model_revision="one")
        yield inproc


async def _ask(gw: InProc, text: str, **extra: Any) -> tuple[str, str]:
    resp = await gw.http.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": [{"role": "user", "content": text}], "temperature": 0, **extra},
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"], resp.headers["x-breakwater-cache"]


async def test_a_new_model_revision_misses(cached: InProc) -> None:
    first, _ = await _ask(cached, "revision", max_tokens=4)
    assert await _ask(cached, "revision", max_tokens=4) == (first, "hit")
    await cached.stop_workers()
    await cached.add_worker(model_revision="two", worker_id="w-two")
    again, header = await _ask(cached, "revision", max_tokens=4)
    assert header == "miss" and again != first


async def test_a_cancelled_answer_is_taken_over(redis_server: RedisServer, prefix: str) -> None:
    async with inproc_gateway(redis_server.url, prefix, cache=True) as gw:
        await gw.add_worker(SimEngine(SimOptions(decode_base_ms=20, decode_per_seq_ms=0)))
        body = {"max_tokens": 100, "ignore_eos": True}
        first = asyncio.create_task(_post(gw, "cancel me", **body))
        rid = await _entry(gw)
        assert (await gw.http.delete(f"/v1/requests/{rid}")).status_code == 200  # its only client
        cancelled = await first
        assert cancelled.status_code != 200 and cancelled.headers["x-breakwater-request-id"] == rid
        again = await _post(gw, "cancel me", **body)
        assert again.status_code == 200 and again.headers["x-breakwater-cache"] == "miss"
        assert again.json()["id"] != rid and again.json()["usage"]["completion_tokens"] == 100
        assert (await _post(gw, "cancel me", **body)).json()["id"] == again.json()["id"]


async def test_identical_requests_after_a_failed_answer_cost_one_generation(cached: InProc) -> None:
    """An entry whose request is gone is taken over by one of many identical requests; the others
    follow that one (they look again when they lose the takeover)."""
    first, _ = await _ask(cached, "herd", max_tokens=4)
    broker = cached.broker()
    try:
        await broker.redis.delete(cached.keys.request(first))  # gone: the next ones take the entry over
        before, _ = await broker.jobs_counts("sim", "interactive")
        answers = await asyncio.gather(*(_ask(cached, "herd", max_tokens=4) for _ in range(8)))
        after, _ = await broker.jobs_counts("sim", "interactive")
    finally:
        await broker.aclose()
    assert after - before == 1
    assert len({rid for rid, _ in answers}) == 1 and sorted(h for _, h in answers) == ["hit"] * 7 + ["miss"]


async def test_an_expired_answer_is_taken_over(cached: InProc) -> None:
    done, _ = await _ask(cached, "expire me", max_tokens=4)
    broker = cached.broker()
    try:
        await broker.redis.delete(cached.keys.request(done))  # as if result_ttl_s had passed
    finally:
        await broker.aclose()
    again, header = await _ask(cached, "expire me", max_tokens=4)
    assert header == "miss" and again != done
    assert await _ask(cached, "expire me", max_tokens=4) == (again, "hit")


async def _post(gw: InProc, text: str, **extra: Any) -> httpx.Response:
    return await gw.http.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": [{"role": "user", "content": text}], "temperature": 0, **extra},
    )


async def _entry(gw: InProc) -> str:
    """The request the model's only cache entry is bound to, once it is queued."""
    broker = gw.broker()
    try:
        async with asyncio.timeout(10):
            while True:
                keys = [k async for k in broker.redis.scan_iter(match=gw.keys.cache_pattern("sim"))]
                rid = str(await broker.redis.get(keys[0]) or "").partition(" ")[0] if keys else ""
                if rid and await broker.exists(rid):
                    return rid
                await asyncio.sleep(0.01)
    finally:
        await broker.aclose()


async def test_entries_expire_and_the_counters_count(cached: InProc) -> None:
    ids = [(await _ask(cached, f"unique {i}", max_tokens=2))[0] for i in range(5)]
    await _ask(cached, "unique 0", max_tokens=2)
    broker = cached.broker()
    try:
        entries = [k async for k in broker.redis.scan_iter(match=cached.keys.cache_pattern("sim"))]
        assert len(entries) == 5
        for key in entries:
            assert 0 < await broker.redis.ttl(key) <= 120
        assert sorted([str(await broker.redis.get(k)).partition(" ")[0] for k in entries]) == sorted(ids)
    finally:
        await broker.aclose()
    text = (await cached.http.get("/metrics")).text
    assert _samples(text, "breakwater_cache_requests_total", result="hit") == [1.0]
    assert _samples(text, "breakwater_cache_requests_total", result="miss") == [5.0]
    assert _samples(text, "breakwater_cache_single_flight_total") == [0.0]
    assert _samples(text, "breakwater_cache_tokens_saved_total") == [2.0]


def _samples(text: str, name: str, **labels: str) -> list[float]:
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


async def test_entries_expire_after_the_cache_ttl(redis_server: RedisServer, prefix: str) -> None:
    async with inproc_gateway(redis_server.url, prefix, cache=True, cache_ttl_s=1) as gw:
        await gw.add_worker()
        first, _ = await _ask(gw, "short-lived", max_tokens=2)
        assert await _ask(gw, "short-lived", max_tokens=2) == (first, "hit")
        broker = gw.broker()
        try:
            async with asyncio.timeout(5):
                while [k async for k in broker.redis.scan_iter(match=gw.keys.cache_pattern())]:
                    await asyncio.sleep(0.05)
        finally:
            await broker.aclose()
        again, header = await _ask(gw, "short-lived", max_tokens=2)
        assert header == "miss" and again != first


async def test_a_cache_redis_of_its_own_holds_the_entries_and_may_evict_them(
    redis_server: RedisServer, prefix: str, own_redis: tuple[RedisServer, Any]
) -> None:
    """With BREAKWATER_CACHE_REDIS_URL the queue's Redis holds no entry; an LRU cache Redis at its
    memory bound evicts entries (they miss), and nothing fails; without it, requests bypass the cache."""
    server, cache_redis = own_redis
    async with inproc_gateway(redis_server.url, prefix, cache=True, cache_redis_url=server.url) as gw:
        await gw.add_worker()
        first, _ = await _ask(gw, "kept apart", max_tokens=2)
        assert await _ask(gw, "kept apart", max_tokens=2) == (first, "hit")
        queue = gw.broker()
        try:
            assert [k async for k in queue.redis.scan_iter(match=gw.keys.cache_pattern())] == []
        finally:
            await queue.aclose()
        entries = [
            await cache_redis.get(k) async for k in cache_redis.scan_iter(match=gw.keys.cache_pattern())
        ]
        assert [str(e).partition(" ")[0] for e in entries] == [first]
        used = int((await cache_redis.info("memory"))["used_memory"])
        room = 64 * 1024
        await cache_redis.config_set("maxmemory-policy", "allkeys-lru")
        await cache_redis.config_set("maxmemory", str(used + room))
        async with asyncio.timeout(60):  # a hang here (CI saw one in this test) names its phase
            headers = [(await _ask(gw, f"unique {i}", max_tokens=1))[1] for i in range(600)]  # ~120 KB
        assert headers == ["miss"] * 600
        stats = await cache_redis.info("stats")
        memory = await cache_redis.info("memory")
        assert int(stats["evicted_keys"]) > 0
        assert int(memory["used_memory"]) <= used + room + 8 * 1024  # the bound, give or take a client buffer
        server.stop()
        async with asyncio.timeout(30):
            answer, header = await _ask(gw, "the cache is down", max_tokens=2)
        assert header == "bypass" and answer


async def test_a_no_cache_request_refused_by_its_limits_leaves_the_cached_answer(
    redis_server: RedisServer, prefix: str
) -> None:
    """A ``no-cache`` request takes the entry over before its limits are asked; refused (429), it
    gives the entry back to the answer it replaced, not to no one: the next identical request is
    still a hit, not a miss that its limits refuse too."""
    from breakwater.tenancy.apikeys import ApiKey

    pepper = "cache-refusal-pepper-0123456789"
    async with inproc_gateway(
        redis_server.url, prefix, cache=True, auth="keys", auth_pepper=pepper, auth_cache_s=0
    ) as gw:
        await gw.add_worker()
        keys = gw.app.state.service.broker.api_keys(pepper.encode())
        secret, _ = await keys.create(ApiKey(id="", tenant="t", rpm=1))
        auth = {"Authorization": f"Bearer {secret}"}
        messages = [{"role": "user", "content": "once"}]
        body = {"model": "sim", "messages": messages, "max_tokens": 4, "temperature": 0}
        first = await gw.http.post("/v1/chat/completions", json=body, headers=auth)
        assert first.status_code == 200 and first.headers["x-breakwater-cache"] == "miss", first.text
        hit = await gw.http.post("/v1/chat/completions", json=body, headers=auth)
        assert (hit.status_code, hit.headers["x-breakwater-cache"]) == (200, "hit")
        fresh = {**auth, "Cache-Control": "no-cache"}
        refused = await gw.http.post("/v1/chat/completions", json=body, headers=fresh)
        assert refused.status_code == 429, refused.text
        again = await gw.http.post("/v1/chat/completions", json=body, headers=auth)
        assert (again.status_code, again.headers["x-breakwater-cache"]) == (200, "hit"), again.text
        assert again.json()["id"] == first.json()["id"]
