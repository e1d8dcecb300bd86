"""The completion endpoints' fast path (gateway/fastpath.py): a well-formed request skips FastAPI's
routing and dependency solving; everything else reaches FastAPI with its body intact, and both paths
answer alike (X-Request-ID once, OpenAI error bodies, the same status codes)."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from breakwater.gateway.fastpath import FastCompletions
from tests.helpers import expected_sim
from tests.inproc import InProc

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


class Counted:
    """FastAPI's side of the fast path: counts the requests it gets."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.paths.append(scope["path"])
        await self.app(scope, receive, send)


@pytest.fixture
async def fallback(gw: InProc) -> Counted:
    """Wraps what the fast path hands over to (the middleware stack is built by the first request)."""
    assert (await gw.http.get("/healthz")).status_code == 200
    app: Any = gw.app.middleware_stack
    while not isinstance(app, FastCompletions):
        app = app.app
    counted = Counted(app.app)
    app.app = counted
    return counted


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": MESSAGES, "max_tokens": 4, "seed": 1, **extra}


async def test_a_well_formed_request_takes_the_fast_path(gw: InProc, fallback: Counted) -> None:
    text, _, _ = expected_sim(messages=MESSAGES, seed=1, max_tokens=4)
    resp = await gw.http.post(CHAT, json=_chat(), headers={"X-Request-ID": "abc-1"})
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == text
    assert resp.headers.get_list("x-request-id") == ["abc-1"]
    async with gw.http.stream(
        "POST", "/v1/completions", json={"model": "sim", "prompt": "hi", "max_tokens": 4, "stream": True}
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert len(stream.headers.get_list("x-request-id")) == 1
        lines = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert fallback.paths == []


async def test_its_refusals_are_the_routes_own(gw: InProc, fallback: Counted) -> None:
    """Errors raised past validation (admission, auth) are answered by the same handlers."""
    resp = await gw.http.post(CHAT, json=_chat(model="nope"), headers={"X-Request-ID": "abc-2"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"
    assert resp.headers.get_list("x-request-id") == ["abc-2"]
    resp = await gw.http.post(CHAT, json=_chat(logit_bias={"1": 5}))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "logit_bias"
    assert fallback.paths == []


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b'{"model": "sim", "messages": [}', {}, 400, "invalid_json"),
        (b'{"model": "sim", "max_tokens": NaN}', {}, 400, "invalid_json"),
        (b"[1, 2]", {}, 400, "invalid_value"),
        (b'{"model": "sim", "max_tokens": 4}', {}, 400, "missing_required_parameter"),  # no messages
        (
            b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}',
            {"Idempotency-Key": "k" * 257},
            400,
            "invalid_value",
        ),
    ],
)
async def test_malformed_requests_reach_fastapi_with_their_body(
    gw: InProc, fallback: Counted, content: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    resp = await gw.http.post(
        CHAT,
        content=content,
        headers={"Content-Type": "application/json", "X-Request-ID": "abc-3", **headers},
    )
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert resp.headers.get_list("x-request-id") == ["abc-3"]
    assert fallback.paths == [CHAT]


async def test_another_content_type_or_none_is_fastapis_to_judge(gw: InProc, fallback: Counted) -> None:
    body = b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}'
    resp = await gw.http.post(CHAT, content=body, headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415 and resp.json()["error"]["type"] == "invalid_request_error"
    assert fallback.paths == [CHAT]
    resp = await gw.http.post(CHAT, content=body)  # no Content-Type at all
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"
    assert fallback.paths == [CHAT, CHAT]
    plain = await gw.http.post(
        CHAT, content=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert plain.status_code == 200, plain.text
    assert fallback.paths == [CHAT, CHAT]  # the fast path's


async def test_other_routes_are_untouched(gw: InProc, fallback: Counted) -> None:
    assert (await gw.http.get("/v1/models")).status_code == 200
    resp = await gw.http.post("/v1/embeddings", json={"model": "sim", "input": "hi"})
    assert resp.status_code == 200, resp.text
    assert fallback.paths == ["/v1/models", "/v1/embeddings"]


async def test_an_oversized_body_is_still_413(gw: InProc, fallback: Counted) -> None:
    """Sent chunked (no Content-Length): refused while it is read."""

    async def chunks() -> Any:
        for _ in range(8):
            yield b"x" * (1 << 20)

    resp = await gw.http.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert fallback.paths == []
