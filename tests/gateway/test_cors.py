"""CORS and the WebSocket's Origin check (gateway.cors): off by default, the listed origins only
when set; a request without an Origin (any non-browser client) is never touched."""

from __future__ import annotations

import pytest

from breakwater.gateway.cors import websocket_origin_allowed
from breakwater.redis_server import RedisServer
from tests.inproc import InProc, inproc_gateway

APP = "https://app.example.com"
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
}
BODY = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _scope(origin: str | None, host: str = "gw.example.com:8000") -> dict[str, object]:
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {"type": "websocket", "headers": headers}


@pytest.mark.parametrize(
    ("origin", "origins", "allowed"),
    [
        (None, [], True),  # not a browser
        ("", [], True),
        # the Host a page names: a DNS-rebinding page shares it, so it proves nothing
        ("http://gw.example.com:8000", [], False),
        ("https://evil.example", [], False),
        (APP, [APP], True),
        ("HTTPS://App.Example.com/", [APP], True),  # scheme and host compare in lower case
        ("https://app.example.com:8443", [APP], False),  # another port: another origin
        ("https://evil.example", [APP], False),
        ("https://evil.example", ["*"], True),
    ],
)
def test_a_websocket_origin_is_allowed_only_when_absent_or_listed(
    origin: str | None, origins: list[str], allowed: bool
) -> None:
    assert websocket_origin_allowed(_scope(origin), origins) is allowed


async def test_without_cors_origins_a_preflight_is_refused_and_no_header_is_added(gw: InProc) -> None:
    preflight = await gw.http.options("/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    answered = await gw.http.post("/v1/chat/completions", json=BODY, headers={"Origin": APP})
    assert answered.status_code == 200 and "access-control-allow-origin" not in answered.headers


async def test_a_listed_origin_gets_its_preflight_and_reads_the_request_id(
    redis_server: RedisServer, prefix: str
) -> None:
    listed = "HTTPS://APP.example.com/, https://b.example"
    async with inproc_gateway(redis_server.url, prefix, cors_allow_origins=listed) as gw:
        await gw.add_worker()
        preflight = await gw.http.options("/v1/chat/completions", headers=PREFLIGHT)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == APP
        assert "POST" in preflight.headers["access-control-allow-methods"]
        allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "idempotency-key"} <= allowed
        answered = await gw.http.post("/v1/chat/completions", json=BODY, headers={"Origin": APP})
        assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == APP
        exposed = answered.headers["access-control-expose-headers"].lower()
        assert "x-breakwater-request-id" in exposed and "retry-after" in exposed
        other = await gw.http.options(
            "/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://c.example"}
        )
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        plain = await gw.http.post("/v1/chat/completions", json=BODY)  # no Origin: untouched
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
