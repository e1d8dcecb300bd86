"""Versions and aliases in-process (issue 19), through the official ``openai`` client: weighted
splits, pinned versions, stickiness, 404 for an unknown version, /v1/models, propagation to a second
gateway, Idempotency-Key replays through an alias, and the rollback guard."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.redis_server import RedisServer
from breakwater.rollout.aliases import Alias, Guard
from breakwater.tenancy import ApiKey
from tests.helpers import async_wait_for
from tests.inproc import InProc, inproc_gateway

A, B = "llama@a", "llama@b"


def _client(gw: InProc) -> openai.AsyncOpenAI:
    # The openai SDK brings its own httpx (httpx2): its ASGI transport drives the app in-process.
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app), base_url="http://gw")
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0)


async def _engine(error_rate: float = 0.0, decode_base_ms: float = 0.0) -> SimEngine:
    options = SimOptions(
        model="llama", decode_base_ms=decode_base_ms, decode_per_seq_ms=0, capacity=128, error_rate=error_rate
    )
    return SimEngine(options)


@pytest.fixture
async def gw(redis_server: RedisServer, prefix: str) -> AsyncIterator[InProc]:
    """A gateway with one worker for each of two versions of `llama`."""
    async with inproc_gateway(redis_server.url, prefix, alias_cache_s=0) as inproc:
        await inproc.add_worker(await _engine(), model_version="a")
        await inproc.add_worker(await _engine(), model_version="b")
        yield inproc


async def _set(gw: InProc, alias: Alias) -> Alias:
    broker = gw.broker()
    try:
        store = broker.rollouts()
        return await store.put(alias, expected=await store.revision(alias.name))
    finally:
        await broker.aclose()


async def _models(client: openai.AsyncOpenAI, n: int, model: str = "llama", **kw: object) -> list[str]:
    gate = asyncio.Semaphore(32)

    async def one(i: int) -> str:
        async with gate:
            r = await client.completions.create(model=model, prompt=f"split {i}", max_tokens=1, **kw)  # type: ignore[call-overload]
            return str(r.model)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_a_90_10_split_over_2000_requests_lands_within_2_percent(gw: InProc) -> None:
    await _set(gw, Alias("llama", {A: 90, B: 10}))
    async with _client(gw) as client:
        served = Counter(await _models(client, 2000))
    assert set(served) == {A, B}, served
    assert abs(served[A] / 2000 - 0.90) <= 0.02 and abs(served[B] / 2000 - 0.10) <= 0.02, served


async def test_a_pinned_version_always_gets_that_version(gw: InProc) -> None:
    await _set(gw, Alias("llama", {A: 100, B: 0}))
    async with _client(gw) as client:
        assert set(await _models(client, 60, model=B)) == {B}
        assert set(await _models(client, 20)) == {A}  # the alias: only the version with weight
        chunks = [
            c
            async for c in await client.completions.create(
                model=B, prompt="pinned", max_tokens=4, stream=True
            )
        ]
    assert {c.model for c in chunks} == {B}


async def test_sticky_by_user_keeps_each_user_on_one_version(gw: InProc) -> None:
    await _set(gw, Alias("llama", {A: 50, B: 50}, sticky="user"))
    async with _client(gw) as client:
        seen: dict[str, set[str]] = {}
        for u in range(24):
            user = f"user-{u}"
            seen[user] = set(await _models(client, 6, user=user))
    assert all(len(v) == 1 for v in seen.values()), seen
    both = Counter(next(iter(v)) for v in seen.values())
    assert set(both) == {A, B}, both  # users are spread over both versions


async def test_sticky_by_tenant_without_keys_puts_everyone_on_one_version(gw: InProc) -> None:
    await _set(gw, Alias("llama", {A: 50, B: 50}, sticky="tenant"))
    async with _client(gw) as client:
        assert len(set(await _models(client, 40))) == 1  # auth off: one tenant


async def test_an_unknown_version_is_a_404_naming_it(gw: InProc) -> None:
    async with _client(gw) as client:
        with pytest.raises(openai.NotFoundError) as err:
            await client.completions.create(model="llama@nope", prompt="x", max_tokens=1)
    assert "llama@nope" in str(err.value) and err.value.code == "model_not_found"


async def test_an_alias_whose_weights_are_all_zero_is_a_503(gw: InProc) -> None:
    await _set(gw, Alias("llama", {A: 0, B: 0}))
    async with _client(gw) as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.completions.create(model="llama", prompt="x", max_tokens=1)
    assert err.value.status_code == 503 and "llama" in str(err.value)


async def test_models_lists_versions_and_aliases(gw: InProc) -> None:
    await _set(gw, Alias("llama", {A: 90, B: 10}, sticky="user"))
    async with _client(gw) as client:
        models = {m.id: m.model_dump() for m in (await client.models.list()).data}
    assert models[A]["base"] == "llama" and models[A]["version"] == "a" and models[A]["workers"] == 1
    assert models[B]["version"] == "b"
    alias = models["llama"]
    assert alias["versions"] == [{"id": A, "weight": 90}, {"id": B, "weight": 10}]
    assert alias["sticky"] == "user" and alias["workers"] == 2 and alias["context_length"] == 4096


async def test_a_second_gateway_sees_an_alias_change_within_a_second(
    gw: InProc, redis_server: RedisServer
) -> None:
    await _set(gw, Alias("llama", {A: 100}))
    async with inproc_gateway(redis_server.url, gw.prefix) as other, _client(other) as client:
        assert set(await _models(client, 5)) == {A}
        await _set(gw, Alias("llama", {B: 100}))
        changed = time.monotonic()
        while (await _models(client, 1)) != [B]:
            assert time.monotonic() - changed < 1.5, "the second gateway still routes to the old version"
            await asyncio.sleep(0.02)


async def test_an_idempotency_key_replay_through_an_alias_is_the_same_request(gw: InProc) -> None:
    await _set(gw, Alias("llama", {A: 50, B: 50}))
    body = {"model": "llama", "prompt": "once", "max_tokens": 3}
    headers = {"Idempotency-Key": "k-versions-1"}
    first = await gw.http.post("/v1/completions", json=body, headers=headers)
    # The alias moves everything to the version the first did not run on: a replay still finds it.
    other = B if first.json()["model"] == A else A
    await _set(gw, Alias("llama", {other: 100}))
    again = [await gw.http.post("/v1/completions", json=body, headers=headers) for _ in range(3)]
    assert first.status_code == 200 and all(r.status_code == 200 for r in again)
    assert {r.json()["id"] for r in again} == {first.json()["id"]}
    assert {r.json()["model"] for r in again} == {first.json()["model"]}
    assert first.headers["x-breakwater-model"] == first.json()["model"] in (A, B)


def _gauge(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def test_a_failing_canary_is_rolled_back_by_the_guard(redis_server: RedisServer, prefix: str) -> None:
    async with inproc_gateway(redis_server.url, prefix, alias_cache_s=0) as gw:
        await gw.add_worker(await _engine(), model_version="a")
        await gw.add_worker(await _engine(error_rate=0.2), model_version="b")
        guard = Guard(max_error_delta=0.05, min_requests=40, window_s=60, baseline=A)
        await _set(gw, Alias("llama", {A: 50, B: 50}, guard=guard))
        errors: Counter[str] = Counter()
        async with _client(gw) as client:
            gate = asyncio.Semaphore(16)

            async def one(i: int) -> None:
                async with gate:
                    try:
                        await client.completions.create(model="llama", prompt=f"guard {i}", max_tokens=2)
                    except openai.APIError as exc:
                        errors[type(exc).__name__] += 1

            broker = gw.broker()
            try:
                store = broker.rollouts()

                async def rolled_back() -> bool:
                    alias = await store.alias("llama")
                    return alias is not None and alias.weights[B] == 0

                # Continuous load until the guard acts (evidence counts from the second after the
                # alias was set, once both versions finished min_requests).
                sent = 0
                deadline = time.monotonic() + 30
                while not await rolled_back():
                    assert time.monotonic() < deadline, "the guard did not roll llama@b back"
                    await asyncio.gather(*(one(sent + i) for i in range(50)))
                    sent += 50
                assert sum(errors.values()) > 5, errors  # the canary's injected failures reached clients
                alias = await store.alias("llama")
                assert alias is not None and alias.weights == {A: 50, B: 0} and B in alias.rolled_back
                last = (await store.history("llama"))[-1]
                assert last.by == "rollback-guard" and "llama@b" in last.note and "error rate" in last.note
            finally:
                await broker.aclose()
            metrics: GatewayMetrics = gw.app.state.service.metrics
            await async_wait_for(
                lambda: metrics.alias_rolled_back.labels("llama", B)._value.get() == 1, 5, what="gauge"
            )
            assert metrics.rollbacks.labels("llama", B)._value.get() == 1
            assert set(await _models(client, 30)) == {A}  # nothing goes to the canary any more
        text = (await gw.http.get("/metrics")).text
        assert _gauge(text, "breakwater_alias_rolled_back", alias="llama", version=B) == 1.0
        assert _gauge(text, "breakwater_alias_weight", alias="llama", version=B) == 0.0


async def test_a_canary_burning_the_ttft_slo_is_rolled_back(redis_server: RedisServer, prefix: str) -> None:
    async with inproc_gateway(redis_server.url, prefix, alias_cache_s=0) as gw:
        await gw.add_worker(await _engine(), model_version="a")
        await gw.add_worker(await _engine(decode_base_ms=300), model_version="b")  # first token ~300 ms
        guard = Guard(min_requests=20, window_s=60, baseline=A, ttft_slo_ms=250)
        await _set(gw, Alias("llama", {A: 50, B: 50}, guard=guard))
        broker = gw.broker()
        try:
            store = broker.rollouts()
            deadline = time.monotonic() + 30
            async with _client(gw) as client:
                while (alias := await store.alias("llama")) is not None and alias.weights[B]:
                    assert time.monotonic() < deadline, "the guard did not roll the slow canary back"
                    await _models(client, 64)  # streaming or not, TTFT is the first token's time
            assert alias is not None and alias.weights == {A: 50, B: 0}
            assert "TTFT over 250 ms for 100.0%" in alias.rolled_back[B]
        finally:
            await broker.aclose()


async def test_a_sound_canary_is_kept(gw: InProc) -> None:
    guard = Guard(max_error_delta=0.05, min_requests=20, window_s=60, baseline=A)
    stored = await _set(gw, Alias("llama", {A: 50, B: 50}, guard=guard))
    async with _client(gw) as client:
        until = time.monotonic() + 3.0  # three of the guard's judgements, with evidence on both sides
        served: Counter[str] = Counter()
        while time.monotonic() < until:
            served.update(await _models(client, 40))
    assert served[A] >= 40 and served[B] >= 40, served
    broker = gw.broker()
    try:
        assert await broker.rollouts().alias("llama") == stored  # untouched
    finally:
        await broker.aclose()


async def test_an_unreadable_alias_record_is_skipped_and_the_others_route(gw: InProc) -> None:
    await _set(gw, Alias("llama", {B: 100}))
    broker = gw.broker()
    try:  # a record from a newer release, or damaged: not JSON this release reads
        await broker.redis.hset(broker.keys.aliases(), "broken", '{"name": "broken", "weights": 7}')
    finally:
        await broker.aclose()
    async with _client(gw) as client:
        assert set(await _models(client, 5)) == {B}
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="broken", prompt="x", max_tokens=1)


async def test_a_tenants_own_split(redis_server: RedisServer, prefix: str) -> None:
    pepper = "p" * 32
    async with inproc_gateway(
        redis_server.url, prefix, alias_cache_s=0, auth="keys", auth_pepper=pepper
    ) as gw:
        await gw.add_worker(await _engine(), model_version="a")
        await gw.add_worker(await _engine(), model_version="b")
        broker = gw.broker()
        try:
            keys = broker.api_keys(pepper.encode())
            acme, _ = await keys.create(ApiKey(id="", tenant="acme"))
            other, _ = await keys.create(ApiKey(id="", tenant="other"))
        finally:
            await broker.aclose()
        await _set(gw, Alias("llama", {A: 100}, tenants={"acme": {B: 100}}))
        for key, want in ((acme, B), (other, A)):
            http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app), base_url="http://gw")
            async with openai.AsyncOpenAI(
                base_url="http://gw/v1", api_key=key, http_client=http, max_retries=0
            ) as c:
                assert set(await _models(c, 10)) == {want}
                listed = {m.id: m.model_dump() for m in (await c.models.list()).data}
                assert listed["llama"]["versions"] == [{"id": want, "weight": 100}]  # its own split
