"""The gateway's log lines say who a request was for and why it was refused: the tenant and the key's
id on a request's lines once its key is accepted, one ``request refused`` line per 4xx (status, code,
param, method, path), and never the key itself."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import orjson
import pytest

from breakwater.logs import JsonFormatter, caller_var, setup_logging
from breakwater.redis_server import RedisServer
from breakwater.tenancy.apikeys import ApiKey
from breakwater.tenancy.limits import Limits
from tests.gateway.test_openai_responses import FinishingSim
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
        deadline = time.monotonic() + 10
        while not lines.named("job finished"):  # the worker logs it after the answer's last event
            assert time.monotonic() < deadline, "the worker never logged the job's end"
            await asyncio.sleep(0.01)
        for msg in ("job started", "job finished"):  # the worker's lines name whose job it ran
            (ran,) = lines.named(msg)
            assert (ran["tenant"], ran["key"], ran["request_id"]) == ("acme", key.id, queued["request_id"])

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


async def test_a_batchs_lines_are_logged_as_its_own_and_its_owners(
    redis_server: RedisServer, prefix: str, lines: _Lines
) -> None:
    """A batch's requests carry its line's request id (``<batch>-<line>``, as the worker's lines do)
    and its owner; they took the id of the request that created it (or of any request that happened
    to wake the runner: another tenant's)."""
    async with inproc_gateway(
        redis_server.url, prefix, auth="keys", auth_pepper=PEPPER, auth_cache_s=0
    ) as gw:
        await gw.add_worker()
        broker = gw.app.state.service.broker
        secret, key = await broker.api_keys(PEPPER.encode()).create(ApiKey(id="", tenant="acme"))
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app), base_url="http://gw")
        async with openai.AsyncOpenAI(
            base_url="http://gw/v1",
            api_key=secret,
            http_client=http,
            max_retries=0,
            default_headers={"X-Request-ID": "the-creating-post"},
        ) as client:
            rows = [
                {
                    "custom_id": f"q{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": "sim", "prompt": f"line {i}", "max_tokens": 2},
                }
                for i in range(2)
            ]
            data = b"".join(orjson.dumps(row) + b"\n" for row in rows)
            file = await client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
            batch = await client.batches.create(
                input_file_id=file.id, endpoint="/v1/completions", completion_window="24h"
            )
            deadline = time.monotonic() + 30
            while (await client.batches.retrieve(batch.id)).status != "completed":
                assert time.monotonic() < deadline, "the batch did not complete"
                await asyncio.sleep(0.05)
    queued = [line for line in lines.named("request queued") if line.get("lane") == "batch"]
    assert sorted(line["request_id"] for line in queued) == [f"{batch.id}-0", f"{batch.id}-1"]
    assert {(line["tenant"], line["key"]) for line in queued} == {("acme", key.id)}


def test_plain_lines_carry_the_same_fields_and_no_query_string() -> None:
    """``log_json: false`` keeps the JSON line's fields (as key=value); uvicorn's WebSocket line never
    shows the query string a client may have put its key in."""
    stream, root = io.StringIO(), logging.getLogger()
    saved, level = root.handlers[:], root.level
    setup_logging("gateway", json_logs=False)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    token = caller_var.set(("acme", "key_1"))
    try:
        logging.getLogger("breakwater.gateway.requests").info(
            "request refused", extra={"fields": {"status": 429, "code": "rate_limit_exceeded"}}
        )
        logging.getLogger("uvicorn.error").info(
            '%s - "WebSocket %s" [accepted]', "127.0.0.1:5000", "/v1/ws?api_key=bw-secret"
        )
    finally:
        caller_var.reset(token)
        root.handlers[:] = saved
        root.setLevel(level)
    refused, socket = stream.getvalue().splitlines()
    assert refused.endswith(
        "gateway INFO request refused tenant=acme key=key_1 status=429 code=rate_limit_exceeded"
    )
    assert socket.endswith(
        'gateway INFO 127.0.0.1:5000 - "WebSocket /v1/ws?..." [accepted] tenant=acme key=key_1'
    )
    assert "bw-secret" not in stream.getvalue()


async def test_an_unexpected_error_has_its_refused_line_with_the_caller(
    redis_server: RedisServer, prefix: str, lines: _Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug's 500 had its ``unexpected error`` traceback but no ``request refused`` line (the
    server-error handler runs outside the middleware that writes it), so a count of refusals by
    status missed every 500, and the line never said whose request it was."""
    async with inproc_gateway(
        redis_server.url, prefix, auth="keys", auth_pepper=PEPPER, auth_cache_s=0
    ) as gw:
        broker = gw.app.state.service.broker
        secret, key = await broker.api_keys(PEPPER.encode()).create(ApiKey(id="", tenant="acme"))

        async def broken(*_: Any, **__: Any) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(gw.app.state.service, "submit", broken)
        http = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=gw.app, raise_app_exceptions=False), base_url="http://gw"
        )
        async with http:
            auth = {"Authorization": f"Bearer {secret}"}
            resp = await http.post("/v1/completions", json=BODY, headers=auth)
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"
    (line,) = lines.named("request refused")
    assert {k: line.get(k) for k in ("status", "code", "path", "method", "tenant", "key", "level")} == {
        "status": 500,
        "code": "internal_error",
        "path": "/v1/completions",
        "method": "POST",
        "tenant": "acme",
        "key": key.id,
        "level": "warning",
    }
    assert line["request_id"] == resp.headers["x-request-id"]
    assert len(lines.named("unexpected error")) == 1


async def test_a_failed_job_is_logged_with_its_error(
    redis_server: RedisServer, prefix: str, lines: _Lines
) -> None:
    """An operator learns why a job failed from the worker's log: it said only `finish_reason: null`."""
    async with inproc_gateway(redis_server.url, prefix) as gw:
        await gw.add_worker(FinishingSim("error"))
        chat = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        failed = await gw.http.post("/v1/chat/completions", json=chat)
        assert failed.status_code == 500
        deadline = time.monotonic() + 10
        while not lines.named("job finished"):
            assert time.monotonic() < deadline, "the worker never logged the job's end"
            await asyncio.sleep(0.01)
    (line,) = lines.named("job finished")
    assert line["level"] == "warning" and "finish reason `error`" in line["error"], line
