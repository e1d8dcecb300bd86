"""The names a listener answers to (hosts.py): a loopback gateway refuses a DNS-rebinding page's
requests by their Host (421, before anything is read or queued), answers to loopback names, IP
addresses and the names listed in ``allowed_hosts``; the metrics listener does the same."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from breakwater.config import GatewaySettings
from breakwater.hosts import host_rule
from breakwater.plainhttp import PlainHTTP
from breakwater.redis_server import RedisServer
from tests.inproc import inproc_gateway

BODY = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.mark.parametrize(
    ("listener", "allowed", "host", "answered"),
    [
        ("127.0.0.1", "", "rebind.example:8000", False),  # a rebinding page's name
        ("127.0.0.1", "", "Rebind.Example.", False),
        ("127.0.0.1", "", "localhost:8000", True),
        ("127.0.0.1", "", "LOCALHOST.:8000", True),
        ("127.0.0.1", "", "app.localhost:8000", True),  # resolves to loopback by its name (RFC 6761)
        ("127.0.0.1", "", "localhost.rebind.example", False),
        ("127.0.0.1", "", "127.0.0.1:8000", True),  # an address: no page can be served under it
        ("127.0.0.1", "", "[::1]:8000", True),
        ("127.0.0.1", "", "10.1.2.3", True),
        ("127.0.0.1", "", "", True),  # no Host: not a browser (HTTP/1.0)
        ("::1", "", "rebind.example", False),
        ("localhost", "", "rebind.example", False),
        ("127.0.0.1", "api.example.com", "API.example.com:443", True),
        ("127.0.0.1", "api.example.com", "www.example.com", False),
        ("127.0.0.1", ".example.com", "example.com", True),  # the domain and names under it
        ("127.0.0.1", ".example.com", "a.b.example.com:8000", True),
        ("127.0.0.1", ".example.com", "badexample.com", False),
        ("0.0.0.0", "api.example.com", "rebind.example", False),  # listed names: on any listener
        ("0.0.0.0", "api.example.com", "10.1.2.3:8000", True),  # a probe by the pod's address
    ],
)
def test_a_listener_answers_to_its_names_and_addresses(
    listener: str, allowed: str, host: str, answered: bool
) -> None:
    rule = host_rule(listener, allowed)
    assert rule is not None and rule.allows(host) is answered


@pytest.mark.parametrize(
    ("listener", "allowed"), [("0.0.0.0", ""), ("10.1.2.3", ""), ("127.0.0.1", "a.example, *")]
)
def test_a_listener_on_another_address_or_with_a_star_answers_to_any_name(
    listener: str, allowed: str
) -> None:
    assert host_rule(listener, allowed) is None


@pytest.mark.parametrize("listed", ["https://api.example.com", "api.example.com:8000", "a b"])
def test_allowed_hosts_with_a_scheme_a_port_or_a_space_is_refused(listed: str) -> None:
    with pytest.raises(ValidationError, match="not a host name"):
        GatewaySettings(allowed_hosts=listed)


async def test_a_request_for_a_name_the_gateway_does_not_answer_to_is_refused_and_queues_nothing(
    redis_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with inproc_gateway(redis_server.url, prefix, allowed_hosts="") as gw:
        await gw.add_worker()
        rebound = {"Host": "rebind.example:8000"}
        with caplog.at_level("INFO", "breakwater.gateway.requests"):
            answers = (
                await gw.http.post("/v1/chat/completions", json=BODY, headers=rebound),
                await gw.http.get("/v1/models", headers=rebound),
                await gw.http.get("/v1/files", headers=rebound),
            )
        logged = [r.fields for r in caplog.records if r.getMessage() == "request refused"]  # type: ignore[attr-defined]
        assert [(f["status"], f["code"], f["path"]) for f in logged] == [
            (421, "host_not_allowed", path) for path in ("/v1/chat/completions", "/v1/models", "/v1/files")
        ]
        for resp in answers:
            assert resp.status_code == 421, resp.text
            error = resp.json()["error"]
            assert error["code"] == "host_not_allowed" and "allowed_hosts" in error["message"]
        assert [k async for k in gw.app.state.service.broker.redis.scan_iter(match=f"{prefix}:req:*")] == []
        for host in ("localhost:8000", "127.0.0.1:8000"):
            answered = await gw.http.post("/v1/chat/completions", json=BODY, headers={"Host": host})
            assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"]


async def test_a_listed_name_is_answered(redis_server: RedisServer, prefix: str) -> None:
    async with inproc_gateway(redis_server.url, prefix, allowed_hosts="api.example.com") as gw:
        assert (await gw.http.get("/v1/models", headers={"Host": "api.example.com"})).status_code == 200
        assert (await gw.http.get("/v1/models", headers={"Host": "gw"})).status_code == 421


async def _get(port: int, host: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    await writer.wait_closed()
    return head


async def test_the_metrics_listener_on_loopback_refuses_a_rebinding_page() -> None:
    def respond(method: str, path: str) -> tuple[int, bytes, str]:
        return 200, b"ok", "text/plain"

    listener = PlainHTTP("127.0.0.1", 0, respond, "test")
    await listener.start()
    try:
        assert await _get(listener.port, "rebind.example:9100") == b"HTTP/1.1 421 Misdirected Request\r\n"
        for host in (f"127.0.0.1:{listener.port}", f"localhost:{listener.port}"):
            assert await _get(listener.port, host) == b"HTTP/1.1 200 OK\r\n"
    finally:
        await listener.close()


def test_a_listener_named_by_a_name_of_loopback_addresses_is_on_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--host myhost`` where the name is 127.0.1.1 (Debian's) is loopback; a name with any other
    address is not; one that does not resolve is not."""
    import socket

    from breakwater.hosts import is_loopback

    answers = {
        "myhost": ["127.0.1.1"],
        "ip6-localhost": ["::1"],
        "both": ["127.0.0.1", "10.0.0.7"],
    }

    def resolve(name: str, *_: object) -> list[tuple[object, ...]]:
        if name not in answers:
            raise socket.gaierror("not found")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in answers[name]]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert is_loopback("myhost") and is_loopback("ip6-localhost")
    assert not is_loopback("both") and not is_loopback("nowhere") and not is_loopback("0.0.0.0")
    rule = host_rule("myhost", "")
    assert rule is not None and not rule.allows("rebind.example")


def test_a_wildcard_in_allowed_hosts_is_refused_naming_the_domain_form() -> None:
    with pytest.raises(ValidationError, match=r"as `\.example\.com`"):
        GatewaySettings(allowed_hosts="*.example.com")


async def test_the_metrics_listener_answers_to_the_gateways_listed_names() -> None:
    def respond(method: str, path: str) -> tuple[int, bytes, str]:
        return 200, b"ok", "text/plain"

    listener = PlainHTTP("127.0.0.1", 0, respond, "test", "metrics.internal")
    await listener.start()
    try:
        assert await _get(listener.port, "metrics.internal:9100") == b"HTTP/1.1 200 OK\r\n"
        assert await _get(listener.port, "rebind.example:9100") == b"HTTP/1.1 421 Misdirected Request\r\n"
    finally:
        await listener.close()
