"""A request with a JSON body and without a valid key is refused before its body is read: a keyless
client made the gateway read and parse megabytes of JSON (~30 ms of CPU for 2.5 MB) only to answer
401, and on the routes FastAPI serves (embeddings, responses, batches) invalid JSON was a 400, not a
401. A request with a valid key is authenticated once, and refused for its body as before."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from starlette.types import Message

from breakwater.gateway.auth import Authenticator
from breakwater.redis_server import RedisServer
from breakwater.tenancy import Principal
from breakwater.tenancy.apikeys import ApiKey
from tests.inproc import inproc_gateway, post_scope

PEPPER = "auth-first-pepper-0123456789abcdef"


def _scope(path: str, authorization: str | None) -> dict[str, Any]:
    headers = [(b"content-length", b"2000000")]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    return post_scope(path, *headers)


JSON_POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/batches"]


@pytest.mark.parametrize("path", JSON_POSTS)
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


@pytest.mark.parametrize("path", JSON_POSTS)
async def test_invalid_json_or_megabytes_without_a_key_are_401_and_with_one_as_before(
    redis_server: RedisServer, prefix: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with inproc_gateway(
        redis_server.url, prefix, auth="keys", auth_pepper=PEPPER, auth_cache_s=0
    ) as gw:
        auth: Authenticator = gw.app.state.service.auth
        lookups: list[str | None] = []
        principal = auth.principal

        async def counted(key: str | None) -> Principal:
            lookups.append(key)
            return await principal(key)

        monkeypatch.setattr(auth, "principal", counted)
        json_type = {"Content-Type": "application/json"}
        huge = orjson.dumps({"model": "sim", "input": ["x" * 1000] * 3000})  # 3 MB
        for body in (b"{bad", huge):
            refused = await gw.http.post(path, content=body, headers=json_type)
            assert refused.status_code == 401, refused.text
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["error"]["code"] == "invalid_api_key"
        assert lookups == [None, None]

        store = gw.app.state.service.broker.api_keys(PEPPER.encode())
        secret, _ = await store.create(ApiKey(id="", tenant="t"))
        keyed = {**json_type, "Authorization": f"Bearer {secret}"}
        lookups.clear()
        bad = await gw.http.post(path, content=b"{bad", headers=keyed)
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"] == {
            "message": "request body is not valid JSON (RFC 8259: no NaN, Infinity or lone surrogates; "
            "at most 1024 levels of nesting)",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_json",
        }
        invalid = await gw.http.post(path, json={"model": 1}, headers=keyed)
        assert invalid.status_code == 400, invalid.text
        assert invalid.json()["error"]["type"] == "invalid_request_error"
        assert lookups == [secret, secret]  # once per request, though the body was read after
