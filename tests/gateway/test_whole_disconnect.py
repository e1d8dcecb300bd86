"""A client that disconnects before its whole (non-streamed) answer lets its request go, as a
stream's client does: detached, then cancelled after the detach grace. It ran to its end, was
metered in full and held its key's concurrency slot all the while; each of the SDK's retries after
its own timeout made one more."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from starlette.types import Message

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.redis_server import RedisServer
from tests.inproc import InProc, inproc_gateway, post_scope

LONG = {"max_tokens": 3000, "ignore_eos": True}
CASES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **LONG}, 1),
    ("/v1/completions", {"prompt": ["one", "two"], **LONG}, 2),  # two choices, one request each
    ("/v1/responses", {"input": "hi"}, 1),  # 8 tokens at least: 4 s
]


async def _statuses(gw: InProc, rids: list[str]) -> list[str]:
    return [(await gw.http.get(f"/v1/requests/{rid}")).json()["status"] for rid in rids]


@pytest.mark.parametrize(("path", "body", "requests"), CASES)
async def test_a_client_that_leaves_before_its_whole_answer_lets_the_request_go(
    redis_server: RedisServer,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict[str, Any],
    requests: int,
) -> None:
    async with inproc_gateway(redis_server.url, prefix) as gw:
        sim = SimEngine(SimOptions(decode_base_ms=500, decode_per_seq_ms=0))
        await gw.add_worker(sim, detach_grace_s=0.2)
        rids = gw.queued_ids(monkeypatch)
        raw = orjson.dumps({"model": "sim", **body})
        pending = [{"type": "http.request", "body": raw, "more_body": False}]
        leave = asyncio.Event()
        sent: list[Message] = []

        async def receive() -> Message:
            if pending:
                return pending.pop()
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        app = asyncio.create_task(gw.app(post_scope(path), receive, send))
        deadline = time.monotonic() + 10
        while len(rids) < requests or "running" not in await _statuses(gw, rids):
            assert time.monotonic() < deadline and not app.done(), (rids, sent)
            await asyncio.sleep(0.02)
        leave.set()  # the client disconnects
        await asyncio.wait_for(app, 5)  # the handler no longer waits for the answer
        while await _statuses(gw, rids) != ["cancelled"] * requests:  # after the detach grace
            assert time.monotonic() < deadline + 10, await _statuses(gw, rids)
            await asyncio.sleep(0.05)
    assert sent[0]["status"] == 400 and b"client_disconnected" in sent[1]["body"]  # nobody reads it


async def test_a_request_its_client_left_while_queued_is_cancelled_not_run(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody followed it for longer than the detach grace before a worker took it: the worker ran it
    anyway (for one heartbeat, or to its end if shorter: answered in full, for nobody) until its
    heartbeat's check cancelled it. Now its start cancels it."""
    async with inproc_gateway(redis_server.url, prefix) as gw:
        sim = SimEngine(SimOptions(capacity=1, decode_base_ms=20, decode_per_seq_ms=0))
        await gw.add_worker(sim, detach_grace_s=0.2)
        rids = gw.queued_ids(monkeypatch)
        busy = {"model": "sim", "prompt": "the only slot", "max_tokens": 50, "ignore_eos": True}  # 1 s
        occupied = asyncio.create_task(gw.http.post("/v1/completions", json=busy))
        deadline = time.monotonic() + 10
        while not rids or await _statuses(gw, rids) != ["running"]:
            assert time.monotonic() < deadline and not occupied.done()
            await asyncio.sleep(0.01)
        raw = orjson.dumps({"model": "sim", "prompt": "left in the queue", "max_tokens": 5})
        pending = [{"type": "http.request", "body": raw, "more_body": False}]

        async def receive() -> Message:
            if pending:
                return pending.pop()
            while len(rids) < 2:  # queued: then the client leaves
                await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            pass

        await asyncio.wait_for(gw.app(post_scope("/v1/completions"), receive, send), 5)
        assert (await _statuses(gw, rids))[1] == "queued"
        assert (await occupied).status_code == 200  # the slot frees long after the grace
        while (await _statuses(gw, rids))[1] != "cancelled":
            assert time.monotonic() < deadline, await _statuses(gw, rids)
            await asyncio.sleep(0.02)
        record = await gw.app.state.service.broker.get_record(rids[1])
        assert record is not None and (record.attempt, record.tokens) == (0, 0)  # never run
