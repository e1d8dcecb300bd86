"""The gateway's log lines say who a request was for and why it was refused: the tenant and the key's
id on a request's lines once its key is accepted, one ``request refused`` line per 4xx (status, code,
param, method, path), and never the key itself."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from breakwater.logs import JsonFormatter
from breakwater.redis_server import RedisServer
from breakwater.tenancy.apikeys import ApiKey
from breakwater.tenancy.limits import Limits
from tests.inproc import inproc_gateway

PEPPER = "request-logs-pepper-0123456789abc"
BODY = {"model": "sim", "prompt": "hi", "max_tokens": 2}


class _Lines(logging.Handler):
    """The JSON lines as the gateway writes them (formatted when logged, as a stream handler does)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter("gateway"))
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))

    def named(self, msg: str) -> list[dict[str, Any]]:
        return [line for line in map(orjson.loads, self.text) if line["msg"] == msg]


@pytest.fixture
def lines() -> Iterator[_Lines]:
    handler, root = _Lines(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


async def test_lines_name_the_tenant_and_key_and_every_refusal(
    redis_server: RedisServer, prefix: str, lines: _Lines
) -> None:
    async with inproc_gateway(
        redis_server.url, prefix, auth="keys", auth_pepper=PEPPER, auth_cache_s=0
    ) as gw:
        await gw.add_worker()
        broker = gw.app.state.service.broker
        await broker.ledger.set_tenant_limits("acme", Limits(rpm=1))
        secret, key = await broker.api_keys(PEPPER.encode()).create(ApiKey(id="", tenant="acme"))
        auth = {"Authorization": f"Bearer {secret}"}

        served = await gw.http.post("/v1/completions", json=BODY, headers=auth)
        assert served.status_code == 200, served.text
        (queued,) = lines.named("request queued")
        assert (queued["tenant"], queued["key"]) == ("acme", key.id)
        assert queued["request_id"] == served.headers["x-request-id"]
        assert not lines.named("request refused")  # a served request is not logged as one

        limited = await gw.http.post("/v1/completions", json=BODY, headers=auth)  # the tenant's 1 rpm
        wrong = await gw.http.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer bw-nope"})
        invalid = await gw.http.post("/v1/chat/completions", json={"model": "sim"}, headers=auth)
        assert (limited.status_code, wrong.status_code, invalid.status_code) == (429, 401, 400)
        got = [
            {k: line.get(k) for k in ("status", "code", "param", "path", "method", "tenant", "key")}
            for line in lines.named("request refused")
        ]
        assert got == [
            {
                "status": 429,
                "code": "rate_limit_exceeded",
                "param": None,
                "path": "/v1/completions",
                "method": "POST",
                "tenant": "acme",
                "key": key.id,
            },
            {
                "status": 401,
                "code": "invalid_api_key",
                "param": None,
                "path": "/v1/completions",
                "method": "POST",
                "tenant": None,  # no key accepted: nobody named
                "key": None,
            },
            {
                "status": 400,
                "code": "missing_required_parameter",
                "param": "messages",
                "path": "/v1/chat/completions",
                "method": "POST",
                "tenant": "acme",
                "key": key.id,
            },
        ]
        assert [line["request_id"] for line in lines.named("request refused")] == [
            r.headers["x-request-id"] for r in (limited, wrong, invalid)
        ]
        assert all(secret not in text and "bw-nope" not in text for text in lines.text)
