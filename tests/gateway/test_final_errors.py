"""An error that sending the same request again cannot cure says so (``x-should-retry: false``):
the openai SDK retries every 409 and 5xx twice by default, and a retried POST is a new request."""

from __future__ import annotations

import asyncio
import time

import httpx2
import openai
import pytest

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.gateway.sse import event_error
from breakwater.protocol.events import TokenEvent
from breakwater.redis_server import RedisServer
from tests.inproc import inproc_gateway


async def test_a_cancelled_answer_is_not_asked_for_again_by_the_sdk(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-streaming request cancelled (``DELETE /v1/requests/{id}``) was answered 409 and the
    SDK sent it again: a new request, run and metered to its end, answered 200 as if never cancelled."""
    async with inproc_gateway(redis_server.url, prefix) as gw:
        await gw.add_worker(SimEngine(SimOptions(decode_base_ms=20, decode_per_seq_ms=0)))
        rids = gw.queued_ids(monkeypatch)
        posts: list[str] = []

        async def note(request: httpx2.Request) -> None:
            posts.append(request.method)

        http = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=gw.app), base_url="http://gw", event_hooks={"request": [note]}
        )
        async with openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http) as client:
            assert client.max_retries == 2  # the SDK's default, as applications run it
            answer = asyncio.create_task(
                client.chat.completions.create(
                    model="sim",
                    messages=[{"role": "user", "content": "a long one"}],
                    max_tokens=2000,
                    extra_body={"ignore_eos": True},
                )
            )
            deadline = time.monotonic() + 10
            while not rids:
                assert time.monotonic() < deadline and not answer.done(), "the request was never queued"
                await asyncio.sleep(0.01)
            cancelled = await gw.http.delete(f"/v1/requests/{rids[0]}")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
            with pytest.raises(openai.ConflictError) as refused:
                await asyncio.wait_for(answer, 30)
    assert refused.value.code == "cancelled"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert posts == ["POST"] and len(rids) == 1  # sent once, queued once


@pytest.mark.parametrize(
    ("code", "status", "final"),
    [
        ("cancelled", 409, True),
        ("max_attempts_exceeded", 500, True),  # a job that failed every worker it ran on
        ("timeout", 504, False),  # its deadline passed in the queue: a later try may be served
        ("worker_error", 500, False),
    ],
)
def test_only_errors_a_retry_cannot_cure_are_final(code: str, status: int, final: bool) -> None:
    error = event_error(TokenEvent(seq=1, kind="error", error={"code": code, "message": "m"}))
    assert error.status == status
    assert error.headers.get("x-should-retry") == ("false" if final else None)
