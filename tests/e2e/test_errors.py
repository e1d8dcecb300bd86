"""Bad input gets the right 4xx in OpenAI's error body and leaves nothing behind in Redis."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.helpers import StackProcs

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

CASES: list[tuple[str, str, Any, int, str | None]] = [
    ("malformed json", CHAT, b'{"model": "sim", "messages": [', 400, None),
    ("not an object", CHAT, b"[1, 2]", 400, None),
    ("missing messages", CHAT, {"model": "sim"}, 400, "messages"),
    ("missing model", CHAT, {"messages": USER}, 400, "model"),
    ("empty messages", CHAT, {"model": "sim", "messages": []}, 400, "messages"),
    (
        "bad role",
        CHAT,
        {"model": "sim", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    (
        "wrong type max_tokens",
        CHAT,
        {"model": "sim", "messages": USER, "max_tokens": "many"},
        400,
        "max_tokens",
    ),
    ("negative max_tokens", CHAT, {"model": "sim", "messages": USER, "max_tokens": -5}, 400, "max_tokens"),
    (
        "zero max_completion_tokens",
        CHAT,
        {"model": "sim", "messages": USER, "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ("temperature too high", CHAT, {"model": "sim", "messages": USER, "temperature": 7}, 400, "temperature"),
    ("n over the bound", CHAT, {"model": "sim", "messages": USER, "n": 17}, 400, "n"),
    ("stream wrong type", CHAT, {"model": "sim", "messages": USER, "stream": "yes please"}, 400, "stream"),
    (
        "too many stops",
        CHAT,
        {"model": "sim", "messages": USER, "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
    ),
    ("missing prompt", COMPLETIONS, {"model": "sim"}, 400, "prompt"),
    ("prompt wrong type", COMPLETIONS, {"model": "sim", "prompt": 42}, 400, "prompt"),
    (
        "negative max_tokens completions",
        COMPLETIONS,
        {"model": "sim", "prompt": "x", "max_tokens": -1},
        400,
        "max_tokens",
    ),
    ("n zero completions", COMPLETIONS, {"model": "sim", "prompt": "x", "n": 0}, 400, "n"),
    (
        "max_tokens over context",
        COMPLETIONS,
        {"model": "sim", "prompt": "x", "max_tokens": 100000},
        400,
        None,
    ),
]


async def _keys(redis: Redis, prefix: str) -> set[str]:
    return {k async for k in redis.scan_iter(match=f"{prefix}:*")}


async def _queued(redis: Redis, prefix: str) -> int:
    total = 0
    for key in await _keys(redis, prefix):
        if key.startswith(f"{prefix}:jobs:"):
            total += int(await redis.xlen(key))
    return total


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_request_gets_openai_error_and_writes_nothing(
    stack: StackProcs, redis: Redis, name: str, path: str, body: Any, status: int, param: str | None
) -> None:
    url = stack.gateways[0][1]
    before = {k for k in await _keys(redis, stack.prefix) if ":req:" in k or ":tok:" in k}
    queued_before = await _queued(redis, stack.prefix)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        if isinstance(body, bytes):
            resp = await client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            resp = await client.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-request-id"]
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    after = {k for k in await _keys(redis, stack.prefix) if ":req:" in k or ":tok:" in k}
    assert after == before, "a refused request left keys in Redis"
    assert await _queued(redis, stack.prefix) == queued_before


async def test_unknown_model_is_404_model_not_found(stack: StackProcs, redis: Redis) -> None:
    url = stack.gateways[0][1]
    before = await _keys(redis, stack.prefix)
    async with httpx.AsyncClient(base_url=url) as client:
        resp = await client.post(CHAT, json={"model": "gpt-nonexistent", "messages": USER})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"
    assert resp.json()["error"]["param"] == "model"
    assert await _keys(redis, stack.prefix) == before


async def test_gateway_keeps_serving_after_bad_input(stack: StackProcs) -> None:
    url = stack.gateways[0][1]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(20):
            await client.post(CHAT, content=b"\xff\xfe garbage", headers={"content-type": "application/json"})
        resp = await client.post(COMPLETIONS, json={"model": "sim", "prompt": "still alive", "max_tokens": 3})
    assert resp.status_code == 200
    assert resp.json()["usage"]["completion_tokens"] == 3


async def test_unknown_request_id_is_404(stack: StackProcs) -> None:
    url = stack.gateways[0][1]
    async with httpx.AsyncClient(base_url=url) as client:
        for method, path in (
            ("GET", "/v1/requests/cmpl-nope"),
            ("GET", "/v1/requests/cmpl-nope/events"),
            ("DELETE", "/v1/requests/cmpl-nope"),
        ):
            resp = await client.request(method, path)
            assert resp.status_code == 404, (method, path)
            assert resp.json()["error"]["code"] == "request_not_found"
