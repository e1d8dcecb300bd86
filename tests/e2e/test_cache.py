"""The response cache end to end (issue #17), with the official openai client: two gateway processes
with ``cache=true`` and ``auth=keys``, two sim workers, keys made by ``breakwater keys``.

A repeated reproducible request is answered by the first one (hit), whole, streamed and over the
WebSocket, with the same content, usage and events; anything that changes the answer misses;
``Cache-Control`` is honoured; tenants never share answers; identical concurrent requests cost one
generation, which survives its first client leaving or cancelling and its worker's SIGKILL.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import orjson
import pytest
import websockets
from redis.asyncio import Redis

from breakwater.broker import Broker, Status
from breakwater.config import GatewaySettings
from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, breakwater_cli, kill_owner_at, read_record, sse_chunks

pytestmark = pytest.mark.timeout(180)

PEPPER = "cache-e2e-pepper-0123456789abcdef"
GATEWAY: dict[str, Any] = {"auth": "keys", "auth_pepper": PEPPER, "cache": "true", "auth_cache_s": 0.2}
WORKER: dict[str, Any] = {
    "sim_decode_base_ms": 15,
    "sim_decode_per_seq_ms": 0,
    "heartbeat_s": 0.3,
    "capacity": 32,
}


@dataclass
class CacheStack:
    procs: StackProcs
    urls: list[str]
    a_key: str  # tenant-a
    b_key: str  # tenant-b
    a_nocache_key: str  # tenant-a, a key whose requests bypass the cache
    opened: list[openai.AsyncOpenAI] = field(default_factory=list)  # closed after each test

    def client(self, key: str, gateway: int = 0) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.urls[gateway]}/v1", api_key=key, max_retries=0)
        self.opened.append(client)
        return client

    async def generations(self) -> int:
        """Jobs ever queued for model sim (each is one generation)."""
        broker = Broker.connect(GatewaySettings(redis_url=self.procs.redis_url, key_prefix=self.procs.prefix))
        try:
            admitted, _ = await broker.jobs_counts("sim", "interactive")
            return admitted
        finally:
            await broker.aclose()


def _create_key(procs: StackProcs, tenant: str, *options: str) -> str:
    return str(breakwater_cli(procs, "keys", "create", "--tenant", tenant, *options, pepper=PEPPER)["key"])


@pytest.fixture(scope="module")
def cache_stack(redis_server: RedisServer, log_dir: Any) -> Iterator[CacheStack]:
    procs = StackProcs(redis_server.url, f"c{uuid.uuid4().hex[:10]}", log_dir)
    try:
        urls = [procs.add_gateway(**GATEWAY) for _ in range(2)]
        for _ in range(2):
            procs.add_worker(**WORKER)
        a_key = _create_key(procs, "tenant-a")
        procs.wait_workers(urls[0], headers={"Authorization": f"Bearer {a_key}"})
        yield CacheStack(
            procs,
            urls,
            a_key,
            _create_key(procs, "tenant-b"),
            _create_key(procs, "tenant-a", "--no-cache"),
        )
    finally:
        procs.stop()


@pytest.fixture(autouse=True)
async def _close_clients(cache_stack: CacheStack) -> AsyncIterator[None]:
    yield
    for client in cache_stack.opened:
        await client.close()
    cache_stack.opened.clear()


def _ask(text: str) -> list[Any]:
    return [{"role": "user", "content": f"{text} {uuid.uuid4().hex[:8]}"}]


async def _chat(client: openai.AsyncOpenAI, **body: Any) -> tuple[Any, str]:
    """The parsed completion and its X-Breakwater-Cache header."""
    raw = await client.chat.completions.with_raw_response.create(model="sim", **body)
    return raw.parse(), raw.headers["x-breakwater-cache"]


async def _stream(
    client: openai.AsyncOpenAI, stop_after: int | None = None, **body: Any
) -> tuple[list[Any], str]:
    """Every chunk of a streamed chat and the cache header; ``stop_after``: close after that many."""
    chunks: list[Any] = []
    async with client.chat.completions.with_streaming_response.create(
        model="sim", stream=True, **body
    ) as resp:
        header = resp.headers["x-breakwater-cache"]
        async for chunk in await resp.parse():
            chunks.append(chunk)
            if stop_after is not None and len(chunks) >= stop_after:
                break
    return chunks, header


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_repeated_greedy_request_is_a_hit_with_the_same_answer(cache_stack: CacheStack) -> None:
    client = cache_stack.client(cache_stack.a_key)
    body: dict[str, Any] = {
        "messages": _ask("repeat me"),
        "temperature": 0,
        "max_tokens": 12,
        "extra_body": {"ignore_eos": True},
    }
    before = await cache_stack.generations()
    first, h1 = await _chat(client, **body)
    again, h2 = await _chat(cache_stack.client(cache_stack.a_key, gateway=1), **body)  # any gateway
    assert (h1, h2) == ("miss", "hit")
    assert again.choices[0].message.content == first.choices[0].message.content != ""
    assert again.usage == first.usage and first.usage is not None and first.usage.completion_tokens == 12
    assert again.id == first.id  # the same request answers both (resume and status use this id)
    assert await cache_stack.generations() == before + 1


async def test_streamed_hit_replays_the_same_chunks(cache_stack: CacheStack) -> None:
    client = cache_stack.client(cache_stack.a_key)
    body: dict[str, Any] = {
        "messages": _ask("stream me"),
        "seed": 11,
        "max_tokens": 10,
        "stream_options": {"include_usage": True},
        "extra_body": {"ignore_eos": True},  # else the sim's natural length (8..64) can be under 10
    }
    first, h1 = await _stream(client, **body)
    again, h2 = await _stream(client, **body)
    assert (h1, h2) == ("miss", "hit")
    assert [c.model_dump() for c in again] == [c.model_dump() for c in first]
    assert first[-1].usage is not None and first[-1].usage.completion_tokens == 10
    # A whole (non-streamed) request with the same parameters is the same request: a hit too.
    # `stream_options` is for a streamed request only (as OpenAI), so both go without it here.
    plain = {k: v for k, v in body.items() if k != "stream_options"}
    streamed, h3 = await _stream(client, **plain)
    whole, h4 = await _chat(client, **plain)
    assert (h3, h4) == ("miss", "hit")  # usage asked for or not: a different answer's chunks
    assert whole.choices[0].message.content == _text(streamed) == _text(first)


async def test_websocket_hit_has_the_same_events(cache_stack: CacheStack) -> None:
    url = cache_stack.urls[1].replace("http://", "ws://") + "/v1/ws"
    body: dict[str, Any] = {
        "model": "sim",
        "prompt": f"socket {uuid.uuid4().hex[:8]}",
        "max_tokens": 9,
        "temperature": 0,
    }
    runs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {cache_stack.a_key}"}
    ) as ws:
        for _ in range(2):
            await ws.send(orjson.dumps(body).decode())
            events: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                created = orjson.loads(await ws.recv())
                while not events or events[-1]["type"] not in ("done", "error"):
                    events.append(orjson.loads(await ws.recv()))
            runs.append((created, events))
    (c1, e1), (c2, e2) = runs
    assert (c1["cache"], c2["cache"]) == ("miss", "hit") and c1["request_id"] == c2["request_id"]
    assert e2 == e1 and e1[-1]["type"] == "done"
    assert [e["seq"] for e in e1] == list(range(1, len(e1) + 1))


async def test_whatever_changes_the_answer_misses(cache_stack: CacheStack) -> None:
    client = cache_stack.client(cache_stack.a_key)
    base = {"messages": _ask("vary me"), "temperature": 0, "max_tokens": 8}
    _, header = await _chat(client, **base)
    assert header == "miss"
    for change in ({"max_tokens": 9}, {"seed": 3}, {"stop": ["zz"]}, {"messages": _ask("vary me")}):
        _, header = await _chat(client, **{**base, **change})
        assert header == "miss", change
    _, header = await _chat(client, **base)
    assert header == "hit"


async def test_sampled_requests_without_a_seed_are_never_cached(cache_stack: CacheStack) -> None:
    client = cache_stack.client(cache_stack.a_key)
    body: dict[str, Any] = {"messages": _ask("sample me"), "max_tokens": 8}  # temperature 1 by default
    before = await cache_stack.generations()
    answers = [await _chat(client, **body) for _ in range(3)]
    assert [h for _, h in answers] == ["bypass"] * 3
    assert len({a.id for a, _ in answers}) == 3
    assert await cache_stack.generations() == before + 3


async def test_cache_control_no_cache_and_no_store(cache_stack: CacheStack) -> None:
    client = cache_stack.client(cache_stack.a_key)
    body: dict[str, Any] = {"messages": _ask("control me"), "temperature": 0, "max_tokens": 8}
    first, _ = await _chat(client, **body)
    fresh, header = await _chat(client, **body, extra_headers={"Cache-Control": "no-cache"})
    assert header == "bypass" and fresh.id != first.id  # generated again...
    assert fresh.choices[0].message.content == first.choices[0].message.content
    later, header = await _chat(client, **body)
    assert header == "hit" and later.id == fresh.id  # ...and the fresh answer is the one kept

    other = {"messages": _ask("do not keep me"), "temperature": 0, "max_tokens": 8}
    kept_nothing, header = await _chat(client, **other, extra_headers={"Cache-Control": "no-store"})
    assert header == "miss"
    after, header = await _chat(client, **other)
    assert header == "miss" and after.id != kept_nothing.id
    again, header = await _chat(client, **other, extra_headers={"Cache-Control": "no-store"})
    assert header == "hit" and again.id == after.id  # no-store still reads the cache

    # An Idempotency-Key replay is the key's own request, whatever the cache did the first time.
    key = {"Idempotency-Key": uuid.uuid4().hex}
    hit, header = await _chat(client, **other, extra_headers=key)
    assert header == "hit" and hit.id == after.id
    replay, header = await _chat(client, **other, extra_headers=key)
    assert header == "bypass" and replay.id == after.id


async def test_tenants_never_share_answers(cache_stack: CacheStack) -> None:
    body: dict[str, Any] = {"messages": _ask("whose answer"), "temperature": 0, "max_tokens": 8}
    a, ha = await _chat(cache_stack.client(cache_stack.a_key), **body)
    b, hb = await _chat(cache_stack.client(cache_stack.b_key), **body)
    assert (ha, hb) == ("miss", "miss") and a.id != b.id
    b2, hb2 = await _chat(cache_stack.client(cache_stack.b_key), **body)
    assert hb2 == "hit" and b2.id == b.id
    # A key with caching turned off neither reads nor writes the tenant's entries.
    c, hc = await _chat(cache_stack.client(cache_stack.a_nocache_key), **body)
    assert hc == "bypass" and c.id != a.id


async def test_embeddings_are_cached(cache_stack: CacheStack) -> None:
    client = cache_stack.client(cache_stack.a_key)
    inputs = [f"embed {uuid.uuid4().hex[:8]}", "second"]
    r1 = await client.embeddings.with_raw_response.create(model="sim", input=inputs)
    r2 = await client.embeddings.with_raw_response.create(model="sim", input=inputs)
    assert (r1.headers["x-breakwater-cache"], r2.headers["x-breakwater-cache"]) == ("miss", "hit")
    assert [e.embedding for e in r2.parse().data] == [e.embedding for e in r1.parse().data]


async def test_identical_concurrent_requests_cost_one_generation(cache_stack: CacheStack) -> None:
    body: dict[str, Any] = {
        "messages": _ask("twenty at once"),
        "temperature": 0,
        "max_tokens": 40,
        "extra_body": {"ignore_eos": True},
    }
    clients = [cache_stack.client(cache_stack.a_key, gateway=i % 2) for i in range(20)]
    before = await cache_stack.generations()
    results = await asyncio.gather(
        *(_stream(c, **body) if i % 2 else _chat(c, **body) for i, c in enumerate(clients))
    )
    assert await cache_stack.generations() == before + 1
    headers = sorted(h for _, h in results)
    assert headers == ["hit"] * 19 + ["miss"]
    texts = {_text(r) if isinstance(r, list) else r.choices[0].message.content for r, _ in results}
    assert len(texts) == 1
    (text,) = texts
    whole = next(r for r, _ in results if not isinstance(r, list))
    assert text and whole.usage.completion_tokens == 40


async def test_followers_finish_when_the_first_client_leaves_or_cancels(
    cache_stack: CacheStack, redis: Redis
) -> None:
    body: dict[str, Any] = {
        "messages": _ask("leader leaves"),
        "temperature": 0,
        "max_tokens": 60,
        "extra_body": {"ignore_eos": True},
    }
    client = cache_stack.client(cache_stack.a_key)
    async with client.chat.completions.with_streaming_response.create(
        model="sim", stream=True, **body
    ) as resp:
        assert resp.headers["x-breakwater-cache"] == "miss"
        rid = resp.headers["x-breakwater-request-id"]
        stream = await resp.parse()
        await anext(aiter(stream))  # generating now
        followers = [
            asyncio.create_task(_stream(cache_stack.client(cache_stack.a_key, i % 2), **body))
            for i in range(4)
        ]
        async with httpx.AsyncClient(timeout=10) as http:
            auth = {"Authorization": f"Bearer {cache_stack.a_key}"}
            deadline = asyncio.get_running_loop().time() + 10
            while True:  # the followers are attached
                status = (await http.get(f"{cache_stack.urls[0]}/v1/requests/{rid}", headers=auth)).json()
                record = await read_record(cache_stack.procs, redis, rid)
                if record.shared >= 4:
                    break
                assert asyncio.get_running_loop().time() < deadline, status
                await asyncio.sleep(0.02)
            cancel = await http.delete(f"{cache_stack.urls[0]}/v1/requests/{rid}", headers=auth)
            assert cancel.status_code == 409 and cancel.json()["error"]["code"] == "request_shared"
    # The first client has gone (its stream closed mid-answer); the followers still get all of it.
    results = await asyncio.gather(*followers)
    assert [h for _, h in results] == ["hit"] * 4
    assert len({_text(chunks) for chunks, _ in results}) == 1
    record = await read_record(cache_stack.procs, redis, rid)
    assert record.status is Status.DONE and record.tokens == 60


async def test_worker_sigkill_during_a_shared_generation_completes_every_client(
    cache_stack: CacheStack, redis: Redis
) -> None:
    body: dict[str, Any] = {
        "messages": _ask("survive a kill"),
        "temperature": 0,
        "max_tokens": 60,
        "ignore_eos": True,
    }
    procs = cache_stack.procs
    async with httpx.AsyncClient(timeout=60) as http:
        auth = {"Authorization": f"Bearer {cache_stack.a_key}"}

        async def follow(i: int, kill: bool) -> tuple[str, list[int], str]:
            url = f"{cache_stack.urls[i % 2]}/v1/chat/completions"
            seqs: list[int] = []
            parts: list[str] = []
            async with http.stream(
                "POST", url, json={"model": "sim", "stream": True, **body}, headers=auth
            ) as resp:
                rid = resp.headers["x-breakwater-request-id"]
                # the leader's worker dies once the record counts 8 tokens (not 8 read: a lagging
                # client would see the job end first)
                killer = asyncio.create_task(kill_owner_at(procs, redis, rid, 8)) if kill else None
                try:
                    async for seq, data in sse_chunks(resp):
                        if data["choices"]:
                            seqs.append(seq)
                            parts.append(data["choices"][0]["delta"].get("content") or "")
                    if killer is not None:
                        await asyncio.wait_for(killer, 1)
                finally:
                    if killer is not None:
                        killer.cancel()
            return rid, seqs, "".join(parts)

        leader = asyncio.create_task(follow(0, kill=True))
        await asyncio.sleep(0.1)
        results = await asyncio.gather(leader, *(follow(i, kill=False) for i in range(1, 5)))
    rids = {rid for rid, _, _ in results}
    assert len(rids) == 1
    for _, seqs, _ in results:
        assert seqs == list(range(1, len(seqs) + 1))  # exactly once, in order, for every client
    assert len({text for _, _, text in results}) == 1
    record = await read_record(procs, redis, rids.pop())
    assert record.status is Status.DONE and record.attempt == 2 and record.tokens == 60
    procs.add_worker(**WORKER)  # back to two workers for the tests after this one


def _cache_cli(procs: StackProcs, *args: str) -> dict[str, int]:
    result: dict[str, int] = breakwater_cli(procs, "cache", *args)
    return result


async def test_cache_stats_and_purge_by_tenant(cache_stack: CacheStack) -> None:
    body: dict[str, Any] = {"messages": _ask("purge me"), "temperature": 0, "max_tokens": 6}
    a, _ = await _chat(cache_stack.client(cache_stack.a_key), **body)
    b, _ = await _chat(cache_stack.client(cache_stack.b_key), **body)
    stats = _cache_cli(cache_stack.procs, "stats", "--model", "sim", "--tenant", "tenant-b")
    assert stats["entries"] == stats["answers"] >= 1 and stats["in_flight"] == 0
    assert stats["answer_bytes"] > stats["entry_bytes"] > 0
    assert _cache_cli(cache_stack.procs, "purge", "--tenant", "tenant-b") == {"purged": stats["entries"]}
    assert _cache_cli(cache_stack.procs, "stats", "--tenant", "tenant-b")["entries"] == 0
    b2, hb = await _chat(cache_stack.client(cache_stack.b_key), **body)
    assert hb == "miss" and b2.id != b.id
    a2, ha = await _chat(cache_stack.client(cache_stack.a_key), **body)
    assert ha == "hit" and a2.id == a.id


async def test_identical_requests_on_one_socket_are_each_answered(cache_stack: CacheStack) -> None:
    """Two identical requests in flight on one WebSocket: the second is generated on its own, so no
    request id is followed twice on the socket and both get every event."""
    url = cache_stack.urls[0].replace("http://", "ws://") + "/v1/ws"
    body = {"model": "sim", "prompt": f"twice {uuid.uuid4().hex[:8]}", "max_tokens": 30, "temperature": 0}
    headers = {"Authorization": f"Bearer {cache_stack.a_key}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(orjson.dumps(body).decode())
        await ws.send(orjson.dumps(body).decode())
        created: list[dict[str, Any]] = []
        events: dict[str, list[dict[str, Any]]] = {}
        async with asyncio.timeout(30):
            while len(created) < 2 or any(
                not e or e[-1]["type"] not in ("done", "error") for e in events.values()
            ):
                message = orjson.loads(await ws.recv())
                if message["type"] == "created":
                    created.append(message)
                    events.setdefault(message["request_id"], [])
                else:
                    events.setdefault(message["request_id"], []).append(message)
    assert [c["cache"] for c in created] == ["miss", "bypass"]
    assert len(events) == 2
    texts = set()
    for got in events.values():
        assert [e["seq"] for e in got] == list(range(1, len(got) + 1)) and got[-1]["type"] == "done"
        texts.add("".join(e.get("text", "") for e in got if e["type"] == "token"))
    assert len(texts) == 1


async def test_a_shared_request_can_be_cancelled_once_its_cache_followers_left(
    cache_stack: CacheStack, redis: Redis
) -> None:
    body: dict[str, Any] = {
        "messages": _ask("left alone"),
        "temperature": 0,
        "max_tokens": 400,
        "ignore_eos": True,
    }
    auth = {"Authorization": f"Bearer {cache_stack.a_key}"}
    url = f"{cache_stack.urls[0]}/v1/chat/completions"
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", url, json={"model": "sim", "stream": True, **body}, headers=auth) as lead,
    ):
        rid = lead.headers["x-breakwater-request-id"]
        async with http.stream("POST", url, json={"model": "sim", "stream": True, **body}, headers=auth) as f:
            assert f.headers["x-breakwater-cache"] == "hit"
            lines = f.aiter_lines()  # kept open: a dropped iterator closes the response
            await anext(lines)
            refused = await http.delete(f"{cache_stack.urls[0]}/v1/requests/{rid}", headers=auth)
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "request_shared"
        # The follower closed its stream: the request is the first client's alone again.
        async with asyncio.timeout(10):
            while int(await redis.hget(cache_stack.procs.keys_request(rid), "shared") or 0) != 0:
                await asyncio.sleep(0.02)
        cancelled = await http.delete(f"{cache_stack.urls[0]}/v1/requests/{rid}", headers=auth)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
