"""Usage metering end to end: what GET /v1/usage reports equals what the clients received.

One gateway with ``auth=keys`` and two sim workers. A mixed workload of one tenant (completions with
the official openai client, streams, cancels, a stream whose worker is SIGKILLed and continued by the
other worker, and 429s from a key's requests-per-minute limit) is metered exactly once per request.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from redis.asyncio import Redis

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, kill_owner_at, sse_chunks

pytestmark = pytest.mark.timeout(240)

PEPPER = "metering-e2e-pepper-0123456789abcdef"  # 32+ characters, shared by the gateway and the CLI
TENANT = "meter-t"


@dataclass
class MeterStack:
    procs: StackProcs
    url: str
    key_k: dict[str, Any]  # no limits
    key_l: dict[str, Any]  # --rpm 30

    def create(self, *options: str) -> dict[str, Any]:
        """``breakwater keys create --tenant meter-t OPTIONS`` against the stack's Redis: its JSON."""
        env = {
            **os.environ,
            "BREAKWATER_REDIS_URL": self.procs.redis_url,
            "BREAKWATER_KEY_PREFIX": self.procs.prefix,
            "BREAKWATER_AUTH_PEPPER": PEPPER,
        }
        done = subprocess.run(
            [sys.executable, "-m", "breakwater", "keys", "create", "--tenant", TENANT, *options],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"keys create {options}: {done.stderr}"
        result: dict[str, Any] = orjson.loads(done.stdout)
        return result


@pytest.fixture(scope="module")
def meter_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[MeterStack]:
    procs = StackProcs(redis_server.url, f"u{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway(auth="keys", auth_pepper=PEPPER)
        for _ in range(2):  # two, so that a SIGKILLed worker's job is continued by the other
            procs.add_worker(sim_decode_base_ms=20, heartbeat_s=0.5)
        stack = MeterStack(procs, url, {}, {})
        stack.key_k = stack.create("--name", "k")
        stack.key_l = stack.create("--name", "l", "--rpm", "30")
        procs.wait_workers(url, headers=bearer(stack.key_k["key"]), count=2)
        yield stack
    finally:
        procs.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Received:
    """What the clients saw, by outcome."""

    completed: list[dict[str, int]] = field(default_factory=list)  # usage of each completed request
    cancelled: list[dict[str, int]] = field(default_factory=list)  # tokens received before the cancel
    rejected: int = 0  # all with key L
    l_completed: int = 0  # key L's 200s (also in ``completed``)

    def tokens(self, name: str) -> int:
        return sum(u[name] for u in (*self.completed, *self.cancelled))


def text_of(chunk: dict[str, Any]) -> str:
    choice = chunk["choices"][0]
    return str((choice["delta"].get("content") if "delta" in choice else choice["text"]) or "")


async def cancel_mid_stream(http: httpx.AsyncClient, url: str, prompt: str) -> dict[str, int]:
    """Stream 500 tokens, cancel after a few; the tokens the client received before the stream ended."""
    body = {"model": "sim", "prompt": prompt, "max_tokens": 500, "ignore_eos": True, "stream": True}
    tokens = 0
    ended_with: dict[str, Any] = {}
    async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        rid = resp.headers["x-breakwater-request-id"]
        async with asyncio.timeout(60):
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = orjson.loads(line[6:])
                if "error" in data:
                    ended_with = data["error"]
                    continue
                if data["choices"] and text_of(data):
                    tokens += 1
                    if tokens == 5:
                        cancelled = await http.delete(f"{url}/v1/requests/{rid}")
                        assert cancelled.status_code == 200, cancelled.text
    assert ended_with.get("code") == "cancelled", ended_with
    assert 5 <= tokens < 500, tokens
    # Every token the worker emitted before the cancel precedes the cancellation in the request's
    # stream, so the client has read exactly what the request's record counts (what is metered).
    status = (await http.get(f"{url}/v1/requests/{rid}")).json()
    assert status["status"] == "cancelled", status
    assert status["completion_tokens"] == tokens, (status, tokens)
    # No usage for a cancelled request: the meter counts its emitted tokens and no prompt tokens.
    assert status["usage"] is None, status
    return {"prompt_tokens": 0, "completion_tokens": tokens}


async def stream_killing_owner(
    stack: MeterStack, http: httpx.AsyncClient, redis: Redis, *, kill_after: int
) -> dict[str, int]:
    """Stream 150 tokens; SIGKILL the worker running it after ``kill_after``; the other continues it."""
    body = {
        "model": "sim",
        "prompt": "continued after a crash",
        "max_tokens": 150,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    seqs: list[int] = []
    usage: dict[str, int] = {}
    async with http.stream("POST", f"{stack.url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        rid = resp.headers["x-breakwater-request-id"]
        # Killed by the record's count, not by what the client has read: a client lagging behind
        # on a busy machine would see the job end before its kill.
        killer = asyncio.create_task(kill_owner_at(stack.procs, redis, rid, kill_after))
        try:
            async with asyncio.timeout(90):
                async for seq, data in sse_chunks(resp):
                    usage = data.get("usage") or usage
                    if data["choices"] and text_of(data):
                        seqs.append(seq)
            killed = await asyncio.wait_for(killer, 1)
        finally:
            killer.cancel()
    assert not killed.alive()
    # Each token once, in order, across the two attempts.
    assert len(seqs) == 150 and seqs == sorted(set(seqs)), seqs
    assert usage["completion_tokens"] == 150, usage
    record = await redis.hgetall(stack.procs.keys_request(rid))
    assert record["status"] == "done" and record["worker"] != killed.args[-1], record
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens")}


async def run_workload(stack: MeterStack, redis: Redis) -> Received:
    got = Received()
    async with openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1", api_key=stack.key_k["key"], max_retries=0
    ) as sdk:
        for i in range(5):
            chat = await sdk.chat.completions.create(
                model="sim",
                messages=[{"role": "user", "content": f"metered chat number {i}"}],
                max_tokens=6 + i,
                seed=i,
            )
            assert chat.usage is not None
            got.completed.append(
                {"prompt_tokens": chat.usage.prompt_tokens, "completion_tokens": chat.usage.completion_tokens}
            )
        for i in range(5):
            stream = await sdk.completions.create(
                model="sim",
                prompt=f"metered stream {i}",
                max_tokens=5 + i,
                seed=10 + i,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            usage = chunks[-1].usage
            assert usage is not None, chunks[-1]
            received = sum(1 for c in chunks if c.choices and c.choices[0].text)
            assert received == usage.completion_tokens, (received, usage)
            got.completed.append(
                {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
            )

    async with httpx.AsyncClient(timeout=60, headers=bearer(stack.key_k["key"])) as http:
        for i in range(2):
            got.cancelled.append(await cancel_mid_stream(http, stack.url, f"cancelled number {i}"))
        got.completed.append(await stream_killing_owner(stack, http, redis, kill_after=20))

    async with httpx.AsyncClient(timeout=60, headers=bearer(stack.key_l["key"])) as http:
        for i in range(5):  # rpm 30 with a 1.2 s burst: the first is admitted, the rest refused
            resp = await http.post(
                f"{stack.url}/v1/completions",
                json={"model": "sim", "prompt": f"limited {i}", "max_tokens": 3, "ignore_eos": True},
            )
            if resp.status_code == 200:
                usage = resp.json()["usage"]
                got.completed.append({k: usage[k] for k in ("prompt_tokens", "completion_tokens")})
                got.l_completed += 1
            else:
                assert resp.status_code == 429, resp.text
                assert resp.json()["error"]["code"] == "rate_limit_exceeded"
                got.rejected += 1
    assert got.rejected >= 3, got.rejected
    return got


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    out = dict.fromkeys(
        ("completed", "error", "cancelled", "rejected", "prompt_tokens", "completion_tokens"), 0
    )
    for row in rows:
        for name, count in row["requests"].items():
            out[name] += count
        out["prompt_tokens"] += row["prompt_tokens"]
        out["completion_tokens"] += row["completion_tokens"]
    return out


async def test_usage_equals_what_clients_received(meter_stack: MeterStack, redis: Redis) -> None:
    first_day = time.strftime("%Y-%m-%d", time.gmtime())
    got = await run_workload(meter_stack, redis)
    expected = {
        "completed": len(got.completed),  # 5 chats, 5 streams, the continued stream, L's 200s
        "error": 0,
        "cancelled": 2,
        "rejected": got.rejected,
        "prompt_tokens": got.tokens("prompt_tokens"),
        "completion_tokens": got.tokens("completion_tokens"),
    }
    assert expected["completed"] >= 12

    async with httpx.AsyncClient(base_url=meter_stack.url, headers=bearer(meter_stack.key_l["key"])) as http:

        async def read() -> list[dict[str, Any]]:
            last_day = time.strftime("%Y-%m-%d", time.gmtime())
            resp = await http.get("/v1/usage", params={"start_date": first_day, "end_date": last_day})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["object"] == "list" and body["tenant"] == TENANT, body
            data: list[dict[str, Any]] = body["data"]
            return data

        # Settled: every request counted (a request is metered when its job is acked), and still the
        # same a second later (nothing is counted twice, e.g. by the reclaimed job's second worker).
        deadline = time.monotonic() + 20
        rows = await read()
        while totals(rows) != expected and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            rows = await read()
        await asyncio.sleep(1.0)
        again = await read()
    assert totals(rows) == expected, (totals(rows), expected, rows)
    assert again == rows
    by_key = {row["key_id"]: row for row in rows}
    assert len(by_key) == len(rows) and set(by_key) == {meter_stack.key_k["id"], meter_stack.key_l["id"]}, (
        rows
    )
    for row in rows:
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"], row
    k_row, l_row = by_key[meter_stack.key_k["id"]], by_key[meter_stack.key_l["id"]]
    assert k_row["requests"] == {"completed": 11, "error": 0, "cancelled": 2, "rejected": 0}, k_row
    assert l_row["requests"] == {
        "completed": got.l_completed,
        "error": 0,
        "cancelled": 0,
        "rejected": got.rejected,
    }, l_row
