"""Fuzzing: schemathesis against the gateway's OpenAPI schema, and malformed WebSocket frames.

Whatever arrives, the gateway answers with a 4xx (never a 5xx), keeps serving, and leaves no
half-written request in Redis: every request record it created is whole and its job is queued.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
import websockets
from hypothesis import HealthCheck, given, settings
from redis.asyncio import Redis

from breakwater.keys import Keys
from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def fuzz_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    procs = StackProcs(redis_server.url, f"f{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        procs.add_worker(sim_decode_base_ms=0, heartbeat_s=0.5)
        procs.wait_workers(url)
        yield procs
    finally:
        procs.stop()


def test_no_input_makes_a_5xx(fuzz_stack: StackProcs) -> None:
    url = fuzz_stack.gateways[0][1]
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    results: Any = api.get_all_operations()
    operations = [result.ok() for result in results]
    assert len(operations) >= 8
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case: Any) -> None:
            response = case.call(base_url=url, timeout=30)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

        call()
    assert len(statuses) >= 100 and any(400 <= s < 500 for s in statuses)


MALFORMED = [
    "not json",
    "[1, 2, 3]",
    '"a string"',
    "{}",
    '{"model": 5}',
    '{"model": "sim", "messages": "hi"}',
    '{"model": "sim", "messages": [{"role": "wizard", "content": "x"}]}',
    '{"model": "sim", "prompt": "x", "max_tokens": -1}',
    '{"model": "sim", "prompt": "x", "n": 3}',
    '{"resume": "nope", "after": "x"}',
    '{"resume": "cmpl-missing", "after": 0}',
    '{"cancel": "cmpl-missing"}',
    "{" * 10_000,
    "x" * (2 << 20),
]


async def test_malformed_websocket_frames_get_errors_and_the_socket_stays_open(
    fuzz_stack: StackProcs,
) -> None:
    url = fuzz_stack.gateways[0][1].replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, max_size=None) as ws:
        for frame in MALFORMED:
            await ws.send(frame)
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["type"] == "error", (frame[:50], reply)
            assert 400 <= reply["status"] < 500
        await ws.send(b"\x00\x01binary")
        assert orjson.loads(await ws.recv())["type"] == "error"
        # Still serving on the same socket.
        await ws.send(orjson.dumps({"model": "sim", "prompt": "still here", "max_tokens": 3}).decode())
        kinds: list[str] = []
        while not kinds or kinds[-1] not in ("done", "error"):
            kinds.append(orjson.loads(await ws.recv())["type"])
        assert kinds[0] == "created" and kinds[-1] == "done"


async def test_nothing_half_written(fuzz_stack: StackProcs, redis: Redis) -> None:
    """After the fuzzing above, every request record is whole and each job entry has its record."""
    keys = Keys(fuzz_stack.prefix)
    records = [k async for k in redis.scan_iter(match=keys.request("*"))]
    for key in records:
        record = await redis.hgetall(key)
        assert {"model", "lane", "status", "job_id", "created_ms"} <= set(record), (key, record)
    for lane in ("interactive", "batch"):
        stream = keys.jobs("sim", lane)
        if await redis.exists(stream):
            entries: Any = await redis.xrange(stream)
            for _, fields in entries:
                assert await redis.exists(keys.request(fields["rid"]))
    assert httpx.get(f"{fuzz_stack.gateways[0][1]}/readyz").status_code == 200
    assert all(p.alive() for p, _ in fuzz_stack.gateways)
