"""Per-key limits end to end: two gateway processes with ``auth=keys`` sharing one limiter in Redis.

Shows that requests-per-minute and tokens-per-minute hold to within 5% across both gateways under an
open-loop load at three times the rate, that every refusal is a well-formed 429 whose retry-after-ms
is exactly long enough, that the x-ratelimit-* headers agree with the limiter's state in Redis, that
a key's concurrency limit is freed by a cancel, and that the official openai client's retries wait out
a 429 and then succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from redis.asyncio import Redis

from breakwater.keys import Keys
from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs

pytestmark = pytest.mark.timeout(240)

PEPPER = "limits-e2e-pepper-0123456789abcdef"  # 32+ characters, shared by the gateways and the CLI
BURST_MS = 1200  # limits.lua: a request is admitted while its limit's TAT is at most this far ahead


@dataclass
class LimitStack:
    procs: StackProcs
    urls: list[str]  # gateways A and B

    def create(self, tenant: str, *options: str) -> dict[str, Any]:
        """``breakwater keys create --tenant TENANT OPTIONS`` against the stack's Redis: its JSON."""
        env = {
            **os.environ,
            "BREAKWATER_REDIS_URL": self.procs.redis_url,
            "BREAKWATER_KEY_PREFIX": self.procs.prefix,
            "BREAKWATER_AUTH_PEPPER": PEPPER,
        }
        done = subprocess.run(
            [sys.executable, "-m", "breakwater", "keys", "create", "--tenant", tenant, *options],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"keys create {tenant} {options}: {done.stderr}"
        result: dict[str, Any] = orjson.loads(done.stdout)
        return result

    @property
    def a(self) -> str:
        return self.urls[0]


@pytest.fixture(scope="module")
def limit_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[LimitStack]:
    procs = StackProcs(redis_server.url, f"l{uuid.uuid4().hex[:10]}", log_dir)
    try:
        urls = [procs.add_gateway(auth="keys", auth_pepper=PEPPER) for _ in range(2)]
        procs.add_worker(sim_decode_base_ms=1, heartbeat_s=0.5, capacity=64)
        stack = LimitStack(procs, urls)
        probe = stack.create("lim-probe")["key"]
        for url in urls:
            procs.wait_workers(url, headers=bearer(probe))
        yield stack
    finally:
        procs.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def small_body(prompt: str) -> dict[str, Any]:
    return {"model": "sim", "prompt": prompt, "max_tokens": 2, "ignore_eos": True}


def assert_rate_limited(resp: httpx.Response, reason: str | None = None) -> int:
    """A well-formed limiter 429; its retry-after-ms."""
    assert resp.status_code == 429, (resp.status_code, resp.text)
    error = resp.json()["error"]
    assert error["code"] == "rate_limit_exceeded", error
    assert error["type"] == "rate_limit_error", error
    retry_after = resp.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) > 0, retry_after
    retry_after_ms = resp.headers["retry-after-ms"]
    assert retry_after_ms.isdigit() and int(retry_after_ms) > 0, retry_after_ms
    assert int(retry_after) == math.ceil(int(retry_after_ms) / 1000)
    if reason is not None:
        assert resp.headers["x-breakwater-reason"] == reason, resp.headers
    return int(retry_after_ms)


async def redis_now_ms(redis: Redis) -> int:
    """Redis's clock in whole milliseconds, as limits.lua reads it."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def parse_duration_ms(text: str) -> float:
    """OpenAI's reset format: ``123ms``, ``1.5s``, ``6m0s``."""
    if text.endswith("ms"):
        return float(text[:-2])
    match = re.fullmatch(r"(?:(\d+)m)?(\d+(?:\.\d+)?)s", text)
    assert match is not None, f"not a duration: {text!r}"
    return (int(match.group(1) or 0) * 60 + float(match.group(2))) * 1000


# 1. RPM and TPM hold across two gateways under three times the allowed rate.


async def open_loop(
    http: httpx.AsyncClient, urls: list[str], key: str, body: dict[str, Any], rate: float, duration_s: float
) -> tuple[list[httpx.Response], float]:
    """Send ``body`` ``rate`` times a second for ``duration_s``, alternating gateways, without waiting
    for replies; every response, and when the last request was sent (seconds after the first)."""
    start = time.monotonic()
    tasks: list[asyncio.Task[httpx.Response]] = []
    for i in range(round(rate * duration_s)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        url = f"{urls[i % len(urls)]}/v1/completions"
        tasks.append(asyncio.create_task(http.post(url, json=body, headers=bearer(key))))
    last_sent = time.monotonic() - start
    return list(await asyncio.gather(*tasks)), last_sent


async def test_limits_hold_across_two_gateways_at_three_times_the_rate(limit_stack: LimitStack) -> None:
    r_key = limit_stack.create("lim-rpm", "--rpm", "120")["key"]
    t_key = limit_stack.create("lim-tpm", "--tpm", "6000")["key"]
    # 20 ASCII bytes and 5 words: the gateway reserves ceil(20/4) + 95 = 100 tokens, and the sim counts
    # 5 prompt + 95 completion tokens, so the reservation is exactly what each request costs.
    prompt = "aaa bbb ccc ddd eeee"
    assert len(prompt.encode()) == 20 and len(prompt.split()) == 5
    t_body = {"model": "sim", "prompt": prompt, "max_tokens": 95, "ignore_eos": True}
    r_body = small_body("rpm load")
    duration_s = 30.0  # GCRA spaces requests and tokens evenly: half a minute holds the limits as a whole one
    pool = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=60, limits=pool) as http:
        (r_resps, r_last), (t_resps, t_last) = await asyncio.gather(
            open_loop(http, limit_stack.urls, r_key, r_body, 6.0, duration_s),  # 3x 120/min
            open_loop(http, limit_stack.urls, t_key, t_body, 3.0, duration_s),  # 3 x 100 tokens/s: 3x
        )
    # The senders kept their schedule (else the offered load was not 3x).
    assert r_last < duration_s + 1 and t_last < duration_s + 1, (r_last, t_last)

    for resps, reason in ((r_resps, "rate_limit_requests"), (t_resps, "rate_limit_tokens")):
        assert not [r.status_code for r in resps if r.status_code >= 500], "5xx under load"
        for resp in resps:
            if resp.status_code != 200:
                assert_rate_limited(resp, reason)

    r_ok = [r for r in r_resps if r.status_code == 200]
    for resp in r_ok:
        assert resp.headers["x-ratelimit-limit-requests"] == "120"
    # GCRA with a 1.2 s burst admits 1 + (30 s + 1.2 s) / 0.5 s ~ 63 in these 30 s.
    assert 56 <= len(r_ok) <= 66, f"RPM 120: admitted {len(r_ok)} of {len(r_resps)} in {duration_s}s"

    t_ok = [r for r in t_resps if r.status_code == 200]
    tokens = 0
    for resp in t_ok:
        assert resp.headers["x-ratelimit-limit-tokens"] == "6000"
        usage = resp.json()["usage"]
        assert usage["prompt_tokens"] == 5 and usage["completion_tokens"] == 95, usage
        tokens += usage["total_tokens"]
    # ~ 3000 (half a minute of 6000 a minute) + the burst (120) + one request (100).
    assert 2850 <= tokens <= 3350, f"TPM 6000: {tokens} tokens in {len(t_ok)} of {len(t_resps)} requests"


# 2. Waiting exactly retry-after-ms is enough.


async def test_retry_after_is_honoured(limit_stack: LimitStack) -> None:
    key = limit_stack.create("lim-retry", "--rpm", "60")["key"]
    async with httpx.AsyncClient(timeout=30, headers=bearer(key)) as http:
        url = f"{limit_stack.a}/v1/completions"
        for i in range(10):
            resp = await http.post(url, json=small_body(f"retry {i}"))
            if resp.status_code != 200:
                break
        else:
            raise AssertionError("no 429 in 10 requests at rpm 60")
        assert i >= 1, "the burst admits at least one request"
        wait_ms = assert_rate_limited(resp, "rate_limit_requests")
        assert wait_ms <= 1000, wait_ms  # at most one request's share of the minute
        await asyncio.sleep(wait_ms / 1000)
        again = await http.post(url, json=small_body("retry after waiting"))
        assert again.status_code == 200, (again.status_code, again.text, wait_ms)


# 3. x-ratelimit-* headers agree with the limiter's hash in Redis.


async def test_ratelimit_headers_agree_with_redis(limit_stack: LimitStack, redis: Redis) -> None:
    made = limit_stack.create("lim-headers", "--rpm", "600", "--tpm", "60000")
    limiter = Keys(limit_stack.procs.prefix).limiter(made["tenant"], made["id"])
    prompt = "header check prompt"  # 19 bytes: 5 tokens reserved for it
    max_tokens = 1000
    reserved = math.ceil(len(prompt.encode()) / 4) + max_tokens
    req_ms, tok_ms = 60000 / 600, 60000 / 60000
    body = {"model": "sim", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}

    def remaining(now_ms: float, tat: float, ms: float) -> int:
        return max(0, math.floor((now_ms + BURST_MS - tat) / ms) + 1)

    async with httpx.AsyncClient(timeout=30, headers=bearer(made["key"])) as http:
        before = await redis_now_ms(redis)
        # A stream, so that the limiter is read before the request ends and its metering reconciles
        # the token reservation (which moves tok_tat).
        async with http.stream("POST", f"{limit_stack.a}/v1/completions", json=body) as resp:
            assert resp.status_code == 200, await resp.aread()
            after = await redis_now_ms(redis)
            state = await redis.hgetall(limiter)
            rid = resp.headers["x-breakwater-request-id"]
            status = (await http.get(f"{limit_stack.a}/v1/requests/{rid}")).json()["status"]
            assert status in ("queued", "running"), "the request ended before the limiter was read"
            headers = resp.headers
            await http.delete(f"{limit_stack.a}/v1/requests/{rid}")
            async for _ in resp.aiter_lines():
                pass

    req_tat, tok_tat = float(state["req_tat"]), float(state["tok_tat"])
    assert float(state["tok_ms"]) == tok_ms
    # The gateway's limiter call ran at some Redis time in [before, after].
    assert before <= req_tat - req_ms <= after
    assert before <= tok_tat - reserved * tok_ms <= after

    assert headers["x-ratelimit-limit-requests"] == "600"
    got = int(headers["x-ratelimit-remaining-requests"])
    assert remaining(before, req_tat, req_ms) - 1 <= got <= remaining(after, req_tat, req_ms) + 1, (
        got,
        after - before,
    )
    assert got == (BURST_MS - 100) // 100 + 1  # a fresh key: one request's 100 ms taken of the burst

    assert headers["x-ratelimit-limit-tokens"] == "60000"
    got = int(headers["x-ratelimit-remaining-tokens"])
    assert remaining(before, tok_tat, tok_ms) - 2 <= got <= remaining(after, tok_tat, tok_ms) + 2, (
        got,
        after - before,
    )
    assert got == BURST_MS - reserved + 1  # a fresh key: the reservation taken of the burst

    reset_requests = parse_duration_ms(headers["x-ratelimit-reset-requests"])
    assert req_tat - after - 250 <= reset_requests <= req_tat - before + 250, (reset_requests, req_tat)
    reset_tokens = parse_duration_ms(headers["x-ratelimit-reset-tokens"])
    assert tok_tat - after - 250 <= reset_tokens <= tok_tat - before + 250, (reset_tokens, tok_tat)


# 4. max-concurrent: the third request waits for a slot; a cancel frees one.


async def first_token(lines: Any) -> None:
    async with asyncio.timeout(30):
        async for line in lines:
            if line.startswith("data: {"):
                assert "error" not in orjson.loads(line[6:]), line
                return
    raise AssertionError("the stream ended before its first token")


async def test_concurrency_limit(limit_stack: LimitStack) -> None:
    key = limit_stack.create("lim-conc", "--max-concurrent", "2")["key"]
    url = f"{limit_stack.a}/v1/completions"
    # ~3000 decode steps: several seconds on this worker, longer than the checks below need.
    long = {"model": "sim", "prompt": "long one", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    async with (
        httpx.AsyncClient(timeout=60, headers=bearer(key)) as http,
        contextlib.AsyncExitStack() as streams,
    ):
        rids: list[str] = []
        lines = []
        for _ in range(2):
            resp = await streams.enter_async_context(http.stream("POST", url, json=long))
            assert resp.status_code == 200, await resp.aread()
            rids.append(resp.headers["x-breakwater-request-id"])
            lines.append(resp.aiter_lines())
            await first_token(lines[-1])

        third = await http.post(url, json=small_body("third at once"))
        assert_rate_limited(third, "rate_limit_concurrency")

        cancelled = await http.delete(f"{limit_stack.a}/v1/requests/{rids[0]}")
        assert cancelled.status_code == 200, cancelled.text
        async with asyncio.timeout(30):
            async for _ in lines[0]:  # the stream ends with the cancellation
                pass

        # The worker drops the cancelled sequence at its next step and acks it; the ack frees the slot.
        deadline = time.monotonic() + 10
        while True:
            resp = await http.post(url, json=small_body("after the cancel"))
            if resp.status_code == 200:
                break
            assert_rate_limited(resp, "rate_limit_concurrency")
            assert time.monotonic() < deadline, "the cancelled request's slot was not freed in 10 s"
            await asyncio.sleep(0.05)
        # The slot was the cancelled request's: the other long one still runs.
        status = (await http.get(f"{limit_stack.a}/v1/requests/{rids[1]}")).json()["status"]
        assert status == "running", status
        await http.delete(f"{limit_stack.a}/v1/requests/{rids[1]}")


# 5. The official client waits retry-after-ms and retries.


def test_openai_sdk_retries_a_429_after_retry_after(limit_stack: LimitStack) -> None:
    made = limit_stack.create("lim-sdk", "--rpm", "60")
    with httpx.Client(base_url=limit_stack.a, headers=bearer(made["key"]), timeout=30) as http:
        for i in range(10):  # use up the burst: the next request would be refused
            resp = http.post("/v1/completions", json=small_body(f"burst {i}"))
            if resp.status_code != 200:
                assert_rate_limited(resp, "rate_limit_requests")
                break
        else:
            raise AssertionError("no 429 in 10 requests at rpm 60")

        with openai.OpenAI(base_url=f"{limit_stack.a}/v1", api_key=made["key"], max_retries=2) as client:
            took = []
            for i in range(2):
                started = time.monotonic()
                done = client.completions.create(model="sim", prompt=f"sdk {i}", max_tokens=2)
                took.append(time.monotonic() - started)
                assert done.usage is not None and done.usage.completion_tokens > 0
        # Each call met a 429 first (the limiter counts refusals): the SDK retried rather than failed.
        usage = http.get("/v1/usage").json()
        row = next(r for r in usage["data"] if r["key_id"] == made["id"])
        assert row["requests"]["rejected"] >= 3, (row, took)  # the burst's one, then >= 1 per call
        # The second call came right after an admission: a whole second's share was owed, and waited.
        assert took[1] >= 0.5, took


@pytest.mark.parametrize(("option", "period"), [("--budget-day", "daily"), ("--budget-month", "monthly")])
async def test_a_used_up_token_budget_is_a_429_until_it_renews(
    limit_stack: LimitStack, option: str, period: str
) -> None:
    """Requests are admitted until the tokens metered reach the budget; then 429 insufficient_quota
    with a Retry-After that points at the next UTC day (month), and /v1/usage shows the tokens."""
    key = limit_stack.create(f"lim-budget-{period}", option, "40")["key"]
    body = {"model": "sim", "prompt": "budget", "max_tokens": 10, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=30, headers=bearer(key)) as http:
        used = 0
        for _ in range(10):
            resp = await http.post(f"{limit_stack.urls[0]}/v1/completions", json=body)
            if resp.status_code != 200:
                break
            used += resp.json()["usage"]["total_tokens"]
            await _until_metered(http, limit_stack.urls[0], used)  # metered when its job is acked
        else:
            raise AssertionError("a 40-token budget admitted 10 requests of 11+ tokens")
        assert resp.status_code == 429, resp.text
        assert used >= 40 and used - 40 < 20, used  # refused once used up, not before
        error = resp.json()["error"]
        assert error["code"] == error["type"] == "insufficient_quota"
        assert f"{period} budget of 40 tokens" in error["message"]
        assert resp.headers["x-breakwater-reason"] == ("budget_day" if period == "daily" else "budget_month")
        now = datetime.now(UTC)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        renews = (
            midnight
            if period == "daily"
            else (now.replace(day=28) + timedelta(days=4)).replace(
                day=1, hour=0, minute=0, second=0, microsecond=0
            )
        )
        assert abs(int(resp.headers["retry-after"]) - (renews - now).total_seconds()) < 10
        again = await http.post(f"{limit_stack.urls[1]}/v1/completions", json=body)
        assert again.status_code == 429  # the other gateway agrees: the budget lives in Redis


async def test_a_request_without_max_tokens_holds_the_models_context_against_the_budget(
    limit_stack: LimitStack,
) -> None:
    """Without a bound (``max_tokens`` null) an answer may run to the model's context (the sim
    model's: 4,096), so that much is held against the budget while it runs: a second such request
    waits for the budget instead of running past it too (with 256 tokens held each, eight would have
    started at once)."""
    key = limit_stack.create("lim-budget-open", "--budget-day", "2000")["key"]
    url = limit_stack.urls[0]
    body = {"model": "sim", "prompt": "open ended", "max_tokens": None, "ignore_eos": True, "stream": True}
    async with (
        httpx.AsyncClient(timeout=30, headers=bearer(key)) as http,
        http.stream("POST", f"{url}/v1/completions", json=body) as first,
    ):
        assert first.status_code == 200
        async for line in first.aiter_lines():
            if line.startswith("data: {"):
                break  # running: its hold is taken
        second = await http.post(f"{url}/v1/completions", json={**body, "stream": False})
        assert second.status_code == 429, second.text[:200]
        assert second.headers["x-breakwater-reason"] == "budget_day"
        bounded = {**body, "stream": False, "max_tokens": 2}
        refused = await http.post(f"{limit_stack.urls[1]}/v1/completions", json=bounded)
        assert refused.status_code == 429  # the hold is in Redis: every gateway sees it


async def test_a_request_a_full_lane_refuses_gives_its_budget_hold_back(
    redis_server: RedisServer, redis: Redis, log_dir: Path
) -> None:
    """Admitted by the key's budget, then refused because its lane is full (429 queue_full): nothing
    was queued, so nothing will be metered; its hold is given back at once, or a few refusals would
    use up the budget for the day."""
    procs = StackProcs(redis_server.url, f"q{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway(auth="keys", auth_pepper=PEPPER, lane_max_queued=1)
        procs.add_worker(sim_decode_base_ms=20, heartbeat_s=0.5, capacity=1)
        made = LimitStack(procs, [url]).create("lim-full", "--budget-day", "1000000")
        usage = Keys(procs.prefix).usage("lim-full", datetime.now(UTC).strftime("%Y-%m-%d"))
        body = {"model": "sim", "prompt": "fill", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=bearer(made["key"])) as http:
            await _until_served(http)
            running = await http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
            record = procs.keys_request(running.headers["x-breakwater-request-id"])
            deadline = time.monotonic() + 10
            while await redis.hget(record, "status") != "running":  # the worker's one slot taken
                assert time.monotonic() < deadline, "the first request never started"
                await asyncio.sleep(0.02)
            waiting = await http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
            assert (running.status_code, waiting.status_code) == (200, 200)
            held = int(await redis.hget(usage, f"{made['id']}:held") or 0)
            assert held > 0
            refused = await http.post("/v1/completions", json={**body, "stream": False})
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            assert int(await redis.hget(usage, f"{made['id']}:held") or 0) == held  # its own given back
            assert int(await redis.hget(usage, "*:held") or 0) == held
            await running.aclose()
            await waiting.aclose()
    finally:
        procs.stop()


async def _until_served(http: httpx.AsyncClient) -> None:
    """Until the gateway lists the sim model (its worker registered)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (await http.get("/v1/models")).json().get("data"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the sim worker never registered")


async def _until_metered(
    http: httpx.AsyncClient, url: str, tokens: int, headers: dict[str, str] | None = None
) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = (await http.get(f"{url}/v1/usage", headers=headers)).json()["data"]
        if sum(r["total_tokens"] for r in rows) >= tokens:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{tokens} tokens not metered within 10 s")


def _tenants_set(limit_stack: LimitStack, tenant: str, *options: str) -> None:
    env = {
        **os.environ,
        "BREAKWATER_REDIS_URL": limit_stack.procs.redis_url,
        "BREAKWATER_KEY_PREFIX": limit_stack.procs.prefix,
    }
    done = subprocess.run(
        [sys.executable, "-m", "breakwater", "tenants", "set", tenant, *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["tenant"] == tenant


async def test_a_tenants_limits_hold_across_all_its_keys(limit_stack: LimitStack) -> None:
    """Two keys without limits of their own share their tenant's 60 requests per minute: together they
    are refused as one client would be, with a message that names the tenant's limit."""
    tenant = "lim-shared"
    _tenants_set(limit_stack, tenant, "--rpm", "60")
    keys = [limit_stack.create(tenant)["key"] for _ in range(2)]
    other = limit_stack.create("lim-shared-other")["key"]  # another tenant is not affected
    async with httpx.AsyncClient(timeout=30) as http:
        statuses = []
        for i in range(6):
            url = f"{limit_stack.urls[i % 2]}/v1/completions"
            resp = await http.post(url, json=small_body(f"shared {i}"), headers=bearer(keys[i % 2]))
            statuses.append(resp.status_code)
            if resp.status_code == 429:
                assert resp.headers["x-breakwater-reason"] == "rate_limit_tenant_requests"
                assert "tenant" in resp.json()["error"]["message"]
                assert resp.headers["x-ratelimit-limit-requests"] == "60"  # the tenant's, the keys have none
        assert statuses.count(200) <= 3 and 429 in statuses, statuses  # 1 s of 60 rpm + the burst
        for i in range(6):
            resp = await http.post(
                f"{limit_stack.urls[0]}/v1/completions", json=small_body(f"other {i}"), headers=bearer(other)
            )
            assert resp.status_code == 200, resp.text


async def test_a_tenants_budget_is_shared_by_its_keys(limit_stack: LimitStack) -> None:
    tenant = "lim-shared-budget"
    _tenants_set(limit_stack, tenant, "--budget-day", "30")
    first, second = (limit_stack.create(tenant)["key"] for _ in range(2))
    body = {"model": "sim", "prompt": "budget", "max_tokens": 10, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=30) as http:
        used = 0
        for _ in range(3):  # 3 x 11 tokens with the first key: the tenant's 30 are used up
            resp = await http.post(f"{limit_stack.urls[0]}/v1/completions", json=body, headers=bearer(first))
            assert resp.status_code == 200, resp.text
            used += resp.json()["usage"]["total_tokens"]
            await _until_metered(http, limit_stack.urls[0], used, bearer(first))
        refused = await http.post(f"{limit_stack.urls[1]}/v1/completions", json=body, headers=bearer(second))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "insufficient_quota"
        assert refused.headers["x-breakwater-reason"] == "tenant_budget_day"
        assert "30 tokens of this API key's tenant" in refused.json()["error"]["message"]


async def test_a_short_timeout_does_not_free_a_concurrency_slot(limit_stack: LimitStack) -> None:
    """A started request keeps its place among the key's running requests past its queue deadline
    (``timeout``): it leaves when it is metered, so a short timeout cannot get around the limit."""
    key = limit_stack.create("lim-short-timeout", "--max-concurrent", "1")["key"]
    long_body = {"model": "sim", "prompt": "long", "max_tokens": 3000, "ignore_eos": True, "stream": True,
                 "timeout": 1}  # fmt: skip
    async with httpx.AsyncClient(timeout=60, headers=bearer(key)) as http:
        url = f"{limit_stack.urls[0]}/v1/completions"
        async with http.stream("POST", url, json=long_body) as running:
            assert running.status_code == 200
            lines = running.aiter_lines()
            await first_token(lines)
            await asyncio.sleep(1.5)  # past the first request's timeout; it is still generating
            second = await http.post(url, json=small_body("second"))
            assert second.status_code == 429, second.text
            assert second.headers["x-breakwater-reason"] == "rate_limit_concurrency"


async def test_requests_in_flight_count_against_a_budget(limit_stack: LimitStack) -> None:
    """Many requests at once cannot all start on a budget that is not yet metered: what each reserves
    is held until it is metered, so the budget is passed by one request's reservation at most."""
    key = limit_stack.create("lim-budget-burst", "--budget-day", "100")["key"]
    body = {"model": "sim", "prompt": "burst", "max_tokens": 30, "ignore_eos": True}  # holds 5 + 4 + 30
    async with httpx.AsyncClient(timeout=30, headers=bearer(key)) as http:
        replies = await asyncio.gather(
            *(http.post(f"{limit_stack.urls[i % 2]}/v1/completions", json=body) for i in range(12))
        )
    admitted = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code != 200]
    assert refused and all(r.status_code == 429 for r in refused), [r.status_code for r in replies]
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    assert 1 <= len(admitted) <= 4, len(admitted)  # 100 / 39 held each, plus the one that crosses it
    assert sum(r.json()["usage"]["total_tokens"] for r in admitted) <= 100 + 32
