"""CORS and the WebSocket's Origin check (gateway.cors): off by default, the listed origins only
when set; a request without an Origin (any non-browser client) is never touched."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from breakwater.config import GatewaySettings
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
        ("https://app.example.com:443", [APP], True),  # the scheme's own port: the same origin
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
    own = await gw.http.post("/v1/chat/completions", json=BODY, headers={"Origin": "http://gw"})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers  # /docs' page


async def test_a_page_of_an_unlisted_origin_changes_nothing(gw: InProc) -> None:
    """POST and DELETE from a web page of another origin are a 403, the ones a page may send
    without a CORS preflight (a form's file upload, a body-less cancel) as much as any; the same
    requests without an Origin (any non-browser client) are served."""
    foreign = {"Origin": "https://evil.example"}
    refused = [
        await gw.http.post("/v1/chat/completions", json=BODY, headers=foreign),
        await gw.http.post(
            "/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"}, headers=foreign
        ),
        await gw.http.post("/v1/batches/batch_x/cancel", headers=foreign),
        await gw.http.delete("/v1/requests/chatcmpl-x", headers=foreign),
    ]
    for resp in refused:
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "cross_site_request", resp.text
    assert (await gw.http.get("/v1/files")).json()["data"] == []
    assert [k async for k in gw.app.state.service.broker.redis.scan_iter(match=f"{gw.prefix}:req:*")] == []
    assert (await gw.http.get("/v1/models", headers=foreign)).status_code == 200  # reading: CORS's
    assert (await gw.http.post("/v1/chat/completions", json=BODY)).status_code == 200


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


@pytest.mark.parametrize("listed", ["null", "app.example.com", "https://a.example, NULL"])
def test_an_origin_list_with_null_or_no_scheme_is_refused(listed: str) -> None:
    """``null`` is the origin of any sandboxed page or local file: listing it would allow every site."""
    with pytest.raises(ValidationError):
        GatewaySettings(cors_allow_origins=listed)


def test_listed_origins_are_compared_as_browsers_send_them() -> None:
    settings = GatewaySettings(cors_allow_origins="HTTPS://App.Example.com:443/, http://h:8080, *")
    assert settings.cors_origins == ["https://app.example.com", "http://h:8080", "*"]
