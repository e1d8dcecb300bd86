"""A request its key's budget admitted holds tokens against the budget until it is metered. When its
enqueue fails (Redis lost mid-admission), nothing will meter it unless it was queued after all: the
gateway gives the hold back, or keeps it for the worker's metering when the job did reach Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.keys import Keys
from breakwater.redis_server import RedisServer
from breakwater.tenancy.apikeys import ApiKey
from tests.helpers import async_wait_for
from tests.inproc import InProc, inproc_gateway

PEPPER = "test-pepper-for-budget-holds"
BODY = {"model": "sim", "prompt": "held", "max_tokens": 20, "ignore_eos": True}


@pytest.fixture
async def keyed(redis_server: RedisServer, prefix: str) -> AsyncIterator[tuple[InProc, str, str]]:
    """A gateway with API keys, a sim worker, and a key with a daily budget: (gateway, secret, key id)."""
    async with inproc_gateway(redis_server.url, prefix, auth="keys", auth_pepper=PEPPER) as gw:
        await gw.add_worker()
        broker = gw.broker()
        try:
            secret, key = await broker.api_keys(PEPPER.encode()).create(
                ApiKey(id="", tenant="holds", budget_day=1_000_000)
            )
        finally:
            await broker.aclose()
        yield gw, secret, key.id


async def _held(redis: Redis, prefix: str, key_id: str) -> int:
    usage = Keys(prefix).usage("holds", datetime.now(UTC).strftime("%Y-%m-%d"))
    return int(await redis.hget(usage, f"{key_id}:held") or 0)


@pytest.mark.parametrize("reached_redis", [False, True])
async def test_a_failed_enqueue_gives_the_hold_back_unless_the_job_was_queued(
    keyed: tuple[InProc, str, str],
    redis: Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    reached_redis: bool,
) -> None:
    gw, secret, key_id = keyed
    broker = gw.app.state.service.broker
    enqueue = broker.enqueue

    async def failing(*args: Any, **kwargs: Any) -> Any:
        if reached_redis:  # queued, and the reply lost on the way back
            await enqueue(*args, **kwargs)
        raise RedisConnectionError("Connection reset by peer")

    monkeypatch.setattr(broker, "enqueue", failing)
    headers = {"Authorization": f"Bearer {secret}"}
    resp = await gw.http.post("/v1/completions", json=BODY, headers=headers)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "redis_unavailable"
    if not reached_redis:
        assert await _held(redis, prefix, key_id) == 0  # nothing queued: given back at once
        return
    # Queued after all: the hold stays for the worker, whose metering gives it back (once).
    assert await _held(redis, prefix, key_id) > 0

    async def metered() -> bool:
        return await _held(redis, prefix, key_id) == 0

    await async_wait_for(metered, 30, what="the queued request metered")
    monkeypatch.setattr(broker, "enqueue", enqueue)
    served = await gw.http.post("/v1/completions", json=BODY, headers=headers)
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 20
    assert await _held(redis, prefix, key_id) == 0


@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_prompts_of_more_tokens_than_their_estimate_pass_a_budget_by_one_request_at_most(
    redis_server: RedisServer, prefix: str, kind: str
) -> None:
    """A prompt of short words is twice as many tokens as the usual 4 bytes a token: held as its
    estimate, two such requests at once started on a 1,000-token budget and used 3,700 of it. Each
    now holds what its prompt can be at most (a token a byte), so the second waits for the first
    to be metered, and the budget is passed by one request at most."""
    async with inproc_gateway(redis_server.url, prefix, auth="keys", auth_pepper=PEPPER) as gw:
        await gw.add_worker(SimEngine(SimOptions(decode_base_ms=10, decode_per_seq_ms=0)))
        store = gw.app.state.service.broker.api_keys(PEPPER.encode())
        secret, _ = await store.create(ApiKey(id="", tenant="holds", budget_day=1000))
        words = "a " * 1800  # 3,600 bytes, 1,800 tokens
        body: dict[str, Any] = {"model": "sim", "max_tokens": 50, "ignore_eos": True}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": words}]
        else:
            body["prompt"] = words
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        headers = {"Authorization": f"Bearer {secret}"}
        replies = await asyncio.gather(*(gw.http.post(path, json=body, headers=headers) for _ in range(4)))
        served = [r.json()["usage"]["total_tokens"] for r in replies if r.status_code == 200]
        assert served and all(
            r.json()["error"]["code"] == "insufficient_quota" for r in replies if r.status_code != 200
        )
        assert sum(served) < 1000 + max(served), served


def test_a_hold_is_what_the_prompt_can_be_and_no_more_than_the_models_context() -> None:
    """A token a byte at most, with a chat template's own per message (and names and tool calls,
    which are prompt too), plus max_tokens; no more than the model's context where a worker said
    it, but not capped by the gateway's own bound (the model's may be larger)."""
    from breakwater.broker import RequestSpec
    from breakwater.gateway.limits import SPECIAL_TOKENS, TEMPLATE_TOKENS, hold
    from breakwater.gateway.specs import prompt_text

    text = RequestSpec(model="m", lane="interactive", kind="completion", request_id="", timeout_s=60,
                       prompt="a " * 60, max_tokens=4)  # fmt: skip
    assert hold(text, prompt_text(text), 4096, 0) == 120 + SPECIAL_TOKENS + 4
    assert hold(text, prompt_text(text), 64, 0) == 64  # the model's context: no request uses more
    assert hold(text, prompt_text(text), 64, 0, known=False) == 120 + SPECIAL_TOKENS + 4
    messages = [
        {"role": "user", "name": "ann", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": '[{"id":"c"}]'},
    ]
    chat = RequestSpec(model="m", lane="interactive", kind="chat", request_id="", timeout_s=60,
                       messages=messages, max_tokens=4)  # fmt: skip
    said = len("ann\nhi\n" + '[{"id":"c"}]')
    assert hold(chat, prompt_text(chat), 4096, 0) == said + 3 * TEMPLATE_TOKENS + 4
