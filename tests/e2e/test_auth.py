"""API keys end to end: two gateway processes with ``auth=keys``, keys made by ``breakwater keys``.

Shows that every /v1 route needs a valid key (HTTP, the official openai client and the WebSocket),
that expiry and revocation reach every gateway within about a second, that a key's model list is
enforced, and that one tenant can neither see another's requests nor share its Idempotency-Keys.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import orjson
import pytest
import websockets
from openai.types.chat import ChatCompletionMessageParam
from websockets.typing import Origin

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, expected_sim

pytestmark = pytest.mark.timeout(180)

PEPPER = "auth-e2e-pepper-0123456789abcdef"  # 32 characters, shared by the gateways and the CLI
UNKNOWN_KEY = "bw-" + "A" * 43  # well formed, never created
T = TypeVar("T")


@dataclass
class AuthStack:
    procs: StackProcs
    urls: list[str]  # gateways A and B
    a_key: str  # tenant-a
    a_key2: str  # tenant-a, a second key
    b_key: str  # tenant-b

    def keys(self, *args: str) -> dict[str, Any]:
        """Run ``breakwater keys ARGS`` against the stack's Redis; its JSON output."""
        env = {
            **os.environ,
            "BREAKWATER_REDIS_URL": self.procs.redis_url,
            "BREAKWATER_KEY_PREFIX": self.procs.prefix,
            "BREAKWATER_AUTH_PEPPER": PEPPER,
        }
        done = subprocess.run(
            [sys.executable, "-m", "breakwater", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"keys {args}: {done.stderr}"
        result: dict[str, Any] = orjson.loads(done.stdout)
        return result

    def create(self, tenant: str, *options: str) -> dict[str, Any]:
        return self.keys("create", "--tenant", tenant, *options)

    @property
    def a(self) -> str:
        return self.urls[0]

    def ws_url(self) -> str:
        return self.a.replace("http://", "ws://") + "/v1/ws"


@pytest.fixture(scope="module")
def auth_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[AuthStack]:
    procs = StackProcs(redis_server.url, f"a{uuid.uuid4().hex[:10]}", log_dir)
    try:
        urls = [procs.add_gateway(auth="keys", auth_pepper=PEPPER) for _ in range(2)]
        procs.add_worker(sim_decode_base_ms=1, heartbeat_s=0.5)
        stack = AuthStack(procs, urls, "", "", "")
        stack.a_key = stack.create("tenant-a")["key"]
        stack.a_key2 = stack.create("tenant-a", "--name", "second")["key"]
        stack.b_key = stack.create("tenant-b")["key"]
        for url in urls:
            procs.wait_workers(url, headers=bearer(stack.a_key))
        yield stack
    finally:
        procs.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def models(url: str, key: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models", headers=bearer(key), timeout=10)


def error_of(resp: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = resp.json()["error"]
    return error


def first(fn: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll ``fn`` until it returns something, within the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = fn()
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


# 1. A valid key works with the official client.


async def test_a_valid_key_works_with_the_openai_client(auth_stack: AuthStack) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello with a key"}]
    with client(auth_stack.a, auth_stack.a_key) as sync:
        resp = sync.chat.completions.create(
            model="sim", messages=messages, max_tokens=5, seed=3, extra_body={"ignore_eos": True}
        )
    text, _, _ = expected_sim(messages=messages, seed=3, max_tokens=5, ignore_eos=True)
    assert resp.choices[0].message.content == text != ""
    assert resp.usage is not None and resp.usage.completion_tokens == 5

    async with openai.AsyncOpenAI(
        base_url=f"{auth_stack.a}/v1", api_key=auth_stack.a_key, max_retries=0
    ) as aclient:
        stream = await aclient.completions.create(
            model="sim",
            prompt="stream with a key",
            max_tokens=8,
            seed=4,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
    text, _, _ = expected_sim(prompt="stream with a key", seed=4, max_tokens=8, ignore_eos=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text != ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


# 2. No key, a malformed one, or an unknown one: 401.


def test_missing_or_malformed_key_is_401(auth_stack: AuthStack) -> None:
    body = {"model": "sim", "prompt": "no key", "max_tokens": 2}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/v1/requests/x")):
        resp = httpx.request(method, f"{auth_stack.a}{path}", json=body if method == "POST" else None)
        assert resp.status_code == 401, (method, path, resp.text)
        assert error_of(resp)["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer not-a-key", "Basic abc"):
        resp = httpx.post(f"{auth_stack.a}/v1/completions", json=body, headers={"Authorization": header})
        assert resp.status_code == 401, (header, resp.text)
        assert error_of(resp)["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"


def test_unknown_key_is_an_authentication_error(auth_stack: AuthStack) -> None:
    with client(auth_stack.a, UNKNOWN_KEY) as unknown, pytest.raises(openai.AuthenticationError) as err:
        unknown.completions.create(model="sim", prompt="who am I", max_tokens=2)
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"


# 3, 4. Expiry and revocation reach every gateway.


def test_an_expired_key_is_refused(auth_stack: AuthStack) -> None:
    # 3s, not 2s: the expiry is whole seconds from creation, so 2s could leave just over one second
    # for the CLI to exit and the first request to be answered.
    key = auth_stack.create("tenant-x", "--expires-in", "3s")["key"]
    assert models(auth_stack.a, key).status_code == 200

    def refused() -> httpx.Response | None:
        resp = models(auth_stack.a, key)
        return resp if resp.status_code == 401 else None

    resp = first(refused, 10, "the key to expire")
    assert error_of(resp)["code"] == "invalid_api_key"
    assert "expired" in error_of(resp)["message"]


def test_a_revoked_key_is_refused_by_every_gateway_within_seconds(auth_stack: AuthStack) -> None:
    made = auth_stack.create("tenant-r")
    for url in auth_stack.urls:  # both gateways have the key cached now
        assert models(url, made["key"]).status_code == 200
    assert auth_stack.keys("revoke", made["id"])["revoked"]
    revoked_at = time.monotonic()
    refused: dict[str, httpx.Response] = {}

    def all_refused() -> dict[str, httpx.Response] | None:
        for url in auth_stack.urls:
            if url not in refused:
                resp = models(url, made["key"])
                if resp.status_code == 401:
                    refused[url] = resp
        return refused if len(refused) == len(auth_stack.urls) else None

    first(all_refused, 3, "both gateways to refuse the revoked key")
    assert time.monotonic() - revoked_at < 3
    for resp in refused.values():
        assert error_of(resp)["code"] == "invalid_api_key"
        assert "revoked" in error_of(resp)["message"]


# 5. A key's model list.


def test_a_model_the_key_may_not_use_is_403(auth_stack: AuthStack) -> None:
    key = auth_stack.create("tenant-m", "--models", "other-model")["key"]
    with client(auth_stack.a, key) as restricted, pytest.raises(openai.PermissionDeniedError) as err:
        restricted.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "not mine"}], max_tokens=2
        )
    assert err.value.status_code == 403
    assert err.value.code == "model_not_allowed"
    assert "sim" not in [m["id"] for m in models(auth_stack.a, key).json()["data"]]
    assert "sim" in [m["id"] for m in models(auth_stack.a, auth_stack.a_key).json()["data"]]


# 6. Requests belong to a tenant.


def test_another_tenants_request_is_not_found(auth_stack: AuthStack) -> None:
    with client(auth_stack.a, auth_stack.a_key) as a:
        rid = a.completions.create(model="sim", prompt="mine only", max_tokens=4).id
    b = httpx.Client(base_url=auth_stack.a, headers=bearer(auth_stack.b_key), timeout=10)
    with b:
        unknown = b.get("/v1/requests/cmpl-" + uuid.uuid4().hex)
        assert unknown.status_code == 404
        for method, path in (
            ("GET", f"/v1/requests/{rid}"),
            ("GET", f"/v1/requests/{rid}/events"),
            ("DELETE", f"/v1/requests/{rid}"),
        ):
            resp = b.request(method, path)
            assert resp.status_code == unknown.status_code == 404, (method, path, resp.text)
            assert error_of(resp)["code"] == error_of(unknown)["code"] == "request_not_found"
            assert error_of(resp)["type"] == error_of(unknown)["type"]

    a2 = httpx.Client(base_url=auth_stack.a, headers=bearer(auth_stack.a_key2), timeout=30)
    with a2:
        status = a2.get(f"/v1/requests/{rid}")
        assert status.status_code == 200, status.text
        assert status.json()["status"] == "done"  # tenant-b's DELETE did nothing
        with a2.stream("GET", f"/v1/requests/{rid}/events") as events:
            assert events.status_code == 200
            lines = [line for line in events.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_another_tenants_response_is_not_found(auth_stack: AuthStack) -> None:
    """The Responses API's ids are request ids: another tenant can neither read, stream, cancel
    nor continue one (404, as for an id nobody made)."""
    with client(auth_stack.a, auth_stack.a_key) as a:
        mine = a.responses.create(model="sim", input="mine only", max_output_tokens=4)
    with client(auth_stack.a, auth_stack.b_key) as b:
        for call in (
            lambda: b.responses.retrieve(mine.id),
            lambda: b.responses.retrieve(mine.id, stream=True),
            lambda: b.responses.cancel(mine.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.NotFoundError) as info:
            b.responses.create(model="sim", input="and then?", previous_response_id=mine.id)
        assert isinstance(info.value.body, dict) and info.value.body["param"] == "previous_response_id"
    with client(auth_stack.a, auth_stack.a_key2) as a2:  # the same tenant's other key sees it
        again = a2.responses.retrieve(mine.id)
        assert (again.status, again.output_text) == ("incomplete", mine.output_text)


# 7. The WebSocket: a header, or a first message.


async def recv(ws: Any) -> dict[str, Any]:
    async with asyncio.timeout(30):
        message: dict[str, Any] = orjson.loads(await ws.recv())
    return message


async def run_on_socket(ws: Any, prompt: str) -> list[dict[str, Any]]:
    """Submit a completion on ``ws``; its messages from "created" to "done"."""
    body = {"model": "sim", "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
    await ws.send(orjson.dumps(body).decode())
    got = [await recv(ws)]
    assert got[0]["type"] == "created", got
    while got[-1]["type"] not in ("done", "error"):
        got.append(await recv(ws))
    return got


def assert_completed(messages: list[dict[str, Any]]) -> None:
    assert [m["type"] for m in messages] == ["created", "token", "token", "token", "token", "done"]
    assert "".join(m["text"] for m in messages if m["type"] == "token")
    assert messages[-1]["usage"]["completion_tokens"] == 4


async def test_websocket_with_an_authorization_header(auth_stack: AuthStack) -> None:
    async with websockets.connect(auth_stack.ws_url(), additional_headers=bearer(auth_stack.a_key)) as ws:
        assert_completed(await run_on_socket(ws, "ws auth"))


async def test_websocket_with_a_first_auth_message(auth_stack: AuthStack) -> None:
    async with websockets.connect(auth_stack.ws_url()) as ws:
        await ws.send(orjson.dumps({"auth": auth_stack.a_key}).decode())
        assert await recv(ws) == {"type": "authenticated", "tenant": "tenant-a"}
        assert_completed(await run_on_socket(ws, "ws auth message"))


async def test_websocket_with_an_unknown_key_is_closed_1008(auth_stack: AuthStack) -> None:
    async with websockets.connect(auth_stack.ws_url()) as ws:
        await ws.send(orjson.dumps({"auth": "bw-" + "B" * 43}).decode())
        message = await recv(ws)
        assert message["type"] == "error" and message["status"] == 401
        assert message["error"]["code"] == "invalid_api_key"
        async with asyncio.timeout(10):
            await ws.wait_closed()
        assert ws.close_code == 1008


async def test_websocket_handshake_from_another_sites_page_is_refused_and_logged(
    auth_stack: AuthStack,
) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(auth_stack.ws_url(), origin=Origin("https://evil.example")):
            pass
    assert refused.value.response.status_code == 403
    gateway = auth_stack.procs.gateways[0][0]

    def logged() -> dict[str, Any] | None:
        lines = [orjson.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
        return next((line for line in lines if line.get("code") == "origin_not_allowed"), None)

    line = first(logged, 10, "the refusal's log line")
    assert (line["msg"], line["method"], line["status"]) == ("request refused", "WEBSOCKET", 403)


async def test_websocket_resume_of_another_tenants_request_is_404(auth_stack: AuthStack) -> None:
    with client(auth_stack.a, auth_stack.a_key) as a:
        rid = a.completions.create(model="sim", prompt="not yours to resume", max_tokens=3).id
    async with websockets.connect(auth_stack.ws_url(), additional_headers=bearer(auth_stack.b_key)) as ws:
        await ws.send(orjson.dumps({"resume": rid}).decode())
        message = await recv(ws)
    assert message["type"] == "error" and message["status"] == 404, message
    assert message["error"]["code"] == "request_not_found"


# 8. Idempotency-Keys are per tenant and bound to the body.


def test_idempotency_keys_are_per_tenant_and_bound_to_the_body(auth_stack: AuthStack) -> None:
    idem = {"Idempotency-Key": "order-1"}
    with client(auth_stack.a, auth_stack.a_key) as a, client(auth_stack.a, auth_stack.b_key) as b:
        one = a.completions.create(model="sim", prompt="order one", max_tokens=3, extra_headers=idem)
        again = a.completions.create(model="sim", prompt="order one", max_tokens=3, extra_headers=idem)
        assert again.id == one.id
        assert again.choices[0].text == one.choices[0].text
        with pytest.raises(openai.UnprocessableEntityError) as err:
            a.completions.create(model="sim", prompt="order two", max_tokens=3, extra_headers=idem)
        assert err.value.status_code == 422
        assert err.value.code == "idempotency_key_reuse"
        other = b.completions.create(model="sim", prompt="order one", max_tokens=3, extra_headers=idem)
        assert other.id != one.id


async def test_an_open_websocket_stops_serving_a_key_revoked_meanwhile(auth_stack: AuthStack) -> None:
    made = auth_stack.create("tenant-ws-revoked")
    async with websockets.connect(auth_stack.ws_url(), additional_headers=bearer(made["key"])) as ws:
        assert_completed(await run_on_socket(ws, "before the revocation"))
        assert auth_stack.keys("revoke", made["id"])["revoked"]
        deadline = time.monotonic() + 5
        while True:  # each message is checked against the key again (cached ~1 s)
            body = {"model": "sim", "prompt": "after the revocation", "max_tokens": 2, "ignore_eos": True}
            await ws.send(orjson.dumps(body).decode())
            message = await recv(ws)
            if message["type"] == "error":
                break
            assert message["type"] == "created" and time.monotonic() < deadline, message
            while message["type"] not in ("done", "error"):
                message = await recv(ws)
        assert message["status"] == 401 and message["error"]["code"] == "invalid_api_key"
        assert "revoked" in message["error"]["message"]
        async with asyncio.timeout(10):
            await ws.wait_closed()
        assert ws.close_code == 1008


async def test_a_websocket_rate_limit_refusal_says_its_type_and_when_to_retry(auth_stack: AuthStack) -> None:
    """A 429 on the socket is OpenAI's rate_limit_error (it said invalid_request_error) with the
    wait HTTP gives in retry-after-ms, so a client on the socket can back off as the SDK does."""
    made = auth_stack.create("tenant-ws-limited", "--rpm", "1")
    async with websockets.connect(auth_stack.ws_url(), additional_headers=bearer(made["key"])) as ws:
        assert_completed(await run_on_socket(ws, "the minute's one"))
        body = {"model": "sim", "prompt": "one too many", "max_tokens": 2}
        await ws.send(orjson.dumps(body).decode())
        message = await recv(ws)
    assert message["type"] == "error" and message["status"] == 429, message
    assert (
        message["error"]["type"] == "rate_limit_error" and message["error"]["code"] == "rate_limit_exceeded"
    )
    assert 30_000 < message["retry_after_ms"] <= 60_000

    def logged() -> dict[str, Any] | None:  # the gateway's line for it: who, and why (never the key)
        lines = [orjson.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
        return next(
            (line for line in lines if line.get("key") == made["id"] and line.get("status") == 429), None
        )

    gateway = auth_stack.procs.gateways[0][0]
    line = first(logged, 10, "the refusal's log line")
    assert (line["msg"], line["method"], line["path"]) == ("request refused", "WEBSOCKET", "/v1/ws")
    assert (line["tenant"], line["code"]) == ("tenant-ws-limited", "rate_limit_exceeded")
    assert made["key"] not in gateway.log()
