"""A completion request without a valid key is refused before its body is read: a keyless client
made the gateway read and parse megabytes of JSON (~30 ms of CPU for 2.5 MB) only to answer 401."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from starlette.types import Message

from breakwater.redis_server import RedisServer
from tests.inproc import inproc_gateway, post_scope

PEPPER = "auth-first-pepper-0123456789abcdef"


def _scope(path: str, authorization: str | None) -> dict[str, Any]:
    headers = [(b"content-length", b"2000000")]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    return post_scope(path, *headers)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("authorization", [None, "Bearer bw-not-a-real-key", "Basic abc"])
async def test_a_request_without_a_valid_key_is_401_with_its_body_unread(
    redis_server: RedisServer, prefix: str, path: str, authorization: str | None
) -> None:
    async with inproc_gateway(redis_server.url, prefix, auth="keys", auth_pepper=PEPPER) as gw:
        chunk = orjson.dumps({"model": "sim", "prompt": "x" * 1_000_000})
        asked: list[str] = []
        sent: list[Message] = []

        async def receive() -> Message:
            asked.append("body")
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: Message) -> None:
            sent.append(message)

        await asyncio.wait_for(gw.app(_scope(path, authorization), receive, send), 10)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 401, body
    assert orjson.loads(body)["error"]["code"] == "invalid_api_key"
    assert asked == []  # not one part of the body was asked for
