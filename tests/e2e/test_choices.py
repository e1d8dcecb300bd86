"""``n > 1`` through gateway + Redis + sim workers: each choice is its own request (seed + index),
interleaved by index in the stream, summed in usage; resume with a composite Last-Event-ID, cancel
and status of the whole group; a refused choice takes back the ones queued."""

from __future__ import annotations

import concurrent.futures
import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from breakwater.broker import Broker, RequestSpec
from breakwater.broker.ledger import day_of
from breakwater.broker.record import Status
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.redis_server import RedisServer
from breakwater.tenancy.apikeys import ApiKey
from tests.helpers import StackProcs, async_wait_for, expected_sim, sync_redis, wait_for
from tests.inproc import inproc_gateway

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "three ways to say ahoy"}]


@pytest.fixture(scope="module")
def slow_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    """Two gateways, two workers at ~20 ms per step, a lane bound of 4 queued requests."""
    procs = StackProcs(redis_server.url, f"n{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway(lane_max_queued=4)
        procs.add_gateway(lane_max_queued=4)
        procs.add_worker(sim_decode_base_ms=20, heartbeat_s=0.5, max_batch=4)
        procs.add_worker(sim_decode_base_ms=20, heartbeat_s=0.5, max_batch=4)
        procs.wait_workers(url)
        yield procs
    finally:
        procs.stop()


def _client(procs: StackProcs, gateway: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{procs.gateways[gateway][1]}/v1", api_key="unused", max_retries=0)


def test_three_choices_each_its_own_seed(stack: StackProcs) -> None:
    with _client(stack) as client:
        resp = client.chat.completions.create(model="sim", messages=MESSAGES, n=3, seed=7)
    expected = [expected_sim(messages=MESSAGES, seed=7 + i) for i in range(3)]
    assert resp.id.startswith("chatcmpl-")
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.message.content for c in resp.choices] == [text for text, _, _ in expected]
    assert [c.finish_reason for c in resp.choices] == [reason for _, reason, _ in expected]
    assert len({c.message.content for c in resp.choices}) == 3
    assert resp.usage is not None  # OpenAI's sum: the prompt once, every choice's completion
    assert resp.usage.prompt_tokens == expected[0][2]["prompt_tokens"]
    assert resp.usage.completion_tokens == sum(u["completion_tokens"] for _, _, u in expected)


def test_streamed_choices_interleave_by_index_and_sum_usage(stack: StackProcs) -> None:
    with _client(stack) as client:
        chunks = list(
            client.chat.completions.create(
                model="sim",
                messages=MESSAGES,
                n=3,
                seed=11,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    expected = [expected_sim(messages=MESSAGES, seed=11 + i) for i in range(3)]
    texts = ["", "", ""]
    reasons: list[str | None] = [None, None, None]
    roles = [0, 0, 0]
    for chunk in chunks[:-1]:
        assert len(chunk.choices) == 1 and chunk.id == chunks[0].id
        choice = chunk.choices[0]
        assert reasons[choice.index] is None, "a chunk after its choice finished"
        texts[choice.index] += choice.delta.content or ""
        roles[choice.index] += choice.delta.role == "assistant"
        reasons[choice.index] = choice.finish_reason
    assert texts == [text for text, _, _ in expected]
    assert reasons == [reason for _, reason, _ in expected]
    assert roles == [1, 1, 1]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == expected[0][2]["prompt_tokens"]
    assert usage.completion_tokens == sum(u["completion_tokens"] for _, _, u in expected)


def test_completions_with_two_choices(stack: StackProcs) -> None:
    with _client(stack) as client:
        resp = client.completions.create(model="sim", prompt="n choices", n=2, seed=3, max_tokens=5)
        streamed = ["", ""]
        for chunk in client.completions.create(
            model="sim", prompt="n choices", n=2, seed=3, max_tokens=5, stream=True
        ):
            streamed[chunk.choices[0].index] += chunk.choices[0].text
    expected = [expected_sim(prompt="n choices", seed=3 + i, max_tokens=5)[0] for i in range(2)]
    assert [c.text for c in resp.choices] == expected == streamed
    assert [c.index for c in resp.choices] == [0, 1]


PROMPTS = ["the first prompt", "a second, longer prompt than the first", "third"]


def test_a_list_of_prompts_answers_n_choices_for_each_in_openais_order(stack: StackProcs) -> None:
    """Choice ``i * n + j`` is prompt i's j-th (seed + j), as OpenAI orders them; the usage counts
    each prompt once and every completion; streamed, the same texts by index."""
    with _client(stack) as client:
        resp = client.completions.create(model="sim", prompt=PROMPTS, n=2, seed=4, max_tokens=6)
        streamed = [""] * 6
        usage = None
        for chunk in client.completions.create(
            model="sim",
            prompt=PROMPTS,
            n=2,
            seed=4,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        ):
            for choice in chunk.choices:
                streamed[choice.index] += choice.text
            usage = chunk.usage or usage
        alone = client.completions.create(model="sim", prompt=PROMPTS[1], seed=5, max_tokens=6)
    expected = [expected_sim(prompt=p, seed=4 + j, max_tokens=6) for p in PROMPTS for j in range(2)]
    assert [c.index for c in resp.choices] == list(range(6))
    assert [c.text for c in resp.choices] == [text for text, _, _ in expected] == streamed
    assert resp.choices[3].text == alone.choices[0].text  # prompt 1, choice 1: that prompt sent alone
    assert len({expected_sim(prompt=p, seed=0)[2]["prompt_tokens"] for p in PROMPTS}) == 3
    prompt_tokens = sum(expected[2 * i][2]["prompt_tokens"] for i in range(3))
    completion_tokens = sum(u["completion_tokens"] for _, _, u in expected)
    for got in (resp.usage, usage):
        assert got is not None
        assert (got.prompt_tokens, got.completion_tokens) == (prompt_tokens, completion_tokens)


def test_a_list_of_prompts_resumes_on_another_gateway(slow_stack: StackProcs) -> None:
    body = {"model": "sim", "prompt": PROMPTS[:2], "seed": 8, "max_tokens": 12, "ignore_eos": True}
    first_url, second_url = slow_stack.gateways[0][1], slow_stack.gateways[1][1]
    with httpx.stream("POST", f"{first_url}/v1/completions", json={**body, "stream": True}) as resp:
        rid = resp.headers["x-breakwater-request-id"]
        before, done = _events(resp.iter_lines(), stop_after=5)
    assert not done and len(before[-1][0].split(".")) == 2
    after = _resumed(second_url, rid, before[-1][0])

    expected = [expected_sim(prompt=p, seed=8, max_tokens=12, ignore_eos=True)[0] for p in PROMPTS[:2]]
    assert [a + b for a, b in zip(_texts(before, 2), _texts(after, 2), strict=True)] == expected


def test_a_group_of_more_than_sixteen_choices_has_a_status_a_replay_and_a_resume(stack: StackProcs) -> None:
    """Three prompts, n = 6: 18 choices (more than n alone may ask for). Its status lists them all,
    an Idempotency-Key replays it whole, and it resumes from every choice's position."""
    url = stack.gateways[0][1]
    body = {"model": "sim", "prompt": PROMPTS, "n": 6, "seed": 1, "max_tokens": 3}
    headers = {"Idempotency-Key": f"group-{uuid.uuid4().hex}"}
    first = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    rid = first.json()["id"]
    assert [c["index"] for c in first.json()["choices"]] == list(range(18))
    again = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert again.json()["id"] == rid and again.json()["choices"] == first.json()["choices"]
    status = httpx.get(f"{url}/v1/requests/{rid}").json()
    assert [c["id"] for c in status["choices"]] == [f"{rid}-{i}" for i in range(18)]
    assert {c["status"] for c in status["choices"]} == {"done"}
    positions = ".".join(["1"] * 18)  # each choice's first token delivered: the rest of each
    after = _resumed(url, rid, positions)
    texts = _texts(after, 18)
    for index, choice in enumerate(first.json()["choices"]):
        assert choice["text"].endswith(texts[index]) and len(texts[index]) < len(choice["text"])


def _events(lines: Iterator[str], stop_after: int | None = None) -> tuple[list[tuple[str, Any]], bool]:
    """(SSE id, data) pairs and whether [DONE] arrived; stops after ``stop_after`` events."""
    events: list[tuple[str, Any]] = []
    eid = ""
    for line in lines:
        if line.startswith("id: "):
            eid = line[4:]
        elif line == "data: [DONE]":
            return events, True
        elif line.startswith("data: "):
            events.append((eid, orjson.loads(line[6:])))
            if stop_after is not None and len(events) >= stop_after:
                break
    return events, False


def _texts(events: list[tuple[str, Any]], n: int) -> list[str]:
    """Each choice's text in ``events`` (a chat's deltas, or a text completion's pieces)."""
    texts = [""] * n
    for _, data in events:
        for choice in data.get("choices", ()):
            piece = choice["text"] if "text" in choice else choice["delta"].get("content")
            texts[choice["index"]] += piece or ""
    return texts


def _resumed(url: str, rid: str, last_event_id: str) -> list[tuple[str, Any]]:
    """Request ``rid``'s events after ``last_event_id``, read on ``url`` to its ``[DONE]``."""
    with httpx.stream(
        "GET", f"{url}/v1/requests/{rid}/events", headers={"Last-Event-ID": last_event_id}, timeout=60
    ) as resp:
        assert resp.status_code == 200
        after, done = _events(resp.iter_lines())
    assert done
    return after


def test_resume_on_another_gateway_with_every_choices_position(slow_stack: StackProcs) -> None:
    body = {"model": "sim", "messages": MESSAGES, "n": 2, "seed": 5, "max_tokens": 24, "ignore_eos": True}
    first_url, second_url = slow_stack.gateways[0][1], slow_stack.gateways[1][1]
    with httpx.stream("POST", f"{first_url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        rid = resp.headers["x-breakwater-request-id"]
        before, done = _events(resp.iter_lines(), stop_after=9)
    assert not done
    last_id = before[-1][0]
    positions = [int(p) for p in last_id.split(".")]
    heads = [(eid, d["choices"][0]["index"], d["choices"][0]["delta"]) for eid, d in before[:2]]
    assert heads == [("0.0", i, {"role": "assistant", "content": ""}) for i in range(2)]  # in index order
    assert len(positions) == 2 and sum(positions) == 7  # then each event advances one choice's seq
    after = _resumed(second_url, rid, last_id)
    ids = [tuple(int(p) for p in eid.split(".")) for eid, data in after if data.get("choices")]
    assert all(b >= a for prev, cur in itertools.pairwise(ids) for a, b in zip(prev, cur, strict=True))
    expected = [
        expected_sim(messages=MESSAGES, seed=5 + i, max_tokens=24, ignore_eos=True)[0] for i in range(2)
    ]
    assert [a + b for a, b in zip(_texts(before, 2), _texts(after, 2), strict=True)] == expected


def test_cancel_and_status_of_the_whole_group(slow_stack: StackProcs) -> None:
    url = slow_stack.gateways[0][1]
    body = {"model": "sim", "prompt": "cancel us", "n": 2, "max_tokens": 200, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as resp:
        rid = resp.headers["x-breakwater-request-id"]
        lines = resp.iter_lines()
        _events(lines, stop_after=2)
        status = httpx.get(f"{url}/v1/requests/{rid}").json()
        assert status["status"] == "running"
        assert [c["index"] for c in status["choices"]] == [0, 1]
        assert [c["id"] for c in status["choices"]] == [f"{rid}-0", f"{rid}-1"]
        cancelled = httpx.delete(f"{url}/v1/requests/{rid}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        rest, done = _events(lines)
    assert not done
    assert rest[-1][1]["error"]["code"] == "cancelled"
    status = httpx.get(f"{url}/v1/requests/{rid}").json()
    assert [c["status"] for c in status["choices"]] == ["cancelled", "cancelled"]
    assert httpx.get(f"{url}/v1/requests/{rid}-7").status_code == 404
    bad = httpx.get(f"{url}/v1/requests/{rid}/events", headers={"Last-Event-ID": "3"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"


def test_an_idempotency_key_replays_the_whole_group(stack: StackProcs) -> None:
    url = stack.gateways[0][1]
    body = {"model": "sim", "prompt": "replay the group", "n": 2, "seed": 21, "max_tokens": 6}
    key = {"Idempotency-Key": f"group-{uuid.uuid4().hex}"}
    first = httpx.post(f"{url}/v1/completions", json=body, headers=key, timeout=30).json()
    again = httpx.post(f"{url}/v1/completions", json=body, headers=key, timeout=30).json()
    assert again == first
    status = httpx.get(f"{url}/v1/requests/{first['id']}").json()
    assert status["status"] == "done" and len(status["choices"]) == 2


def test_a_replay_with_another_n_is_refused_and_the_original_runs_on(stack: StackProcs) -> None:
    """The key is bound to the whole body: n=3 after n=2 under one key is 422, not a third choice."""
    url = stack.gateways[0][1]
    body = {"model": "sim", "prompt": "keyed group", "n": 2, "seed": 41, "max_tokens": 5}
    key = {"Idempotency-Key": f"group-{uuid.uuid4().hex}"}
    first = httpx.post(f"{url}/v1/completions", json=body, headers=key, timeout=30)
    other = httpx.post(f"{url}/v1/completions", json={**body, "n": 3}, headers=key, timeout=30)
    assert first.status_code == 200 and other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reuse"
    status = httpx.get(f"{url}/v1/requests/{first.json()['id']}").json()
    assert [c["status"] for c in status["choices"]] == ["done", "done"]
    assert httpx.get(f"{url}/v1/requests/{first.json()['id']}-2").status_code == 404


def test_a_failed_choice_stops_the_others_of_a_whole_answer(slow_stack: StackProcs) -> None:
    """Non-streaming n=2: cancelling choice 1 fails the response at once, and choice 0 (2,000 tokens
    at 20 ms a step) is cancelled then, not run to its end."""
    url = slow_stack.gateways[0][1]
    xrid = f"fail-one-{uuid.uuid4().hex[:8]}"
    body = {"model": "sim", "prompt": "two long ones", "n": 2, "max_tokens": 2000, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            httpx.post, f"{url}/v1/completions", json=body, headers={"X-Request-ID": xrid}, timeout=60
        )

        def both_running() -> bool:
            return [r["status"] for r in _records_of(slow_stack, xrid)] == ["running", "running"]

        wait_for(both_running, 20, 0.05, "both choices running")
        rids = sorted(r["id"] for r in _records_of(slow_stack, xrid))
        assert httpx.delete(f"{url}/v1/requests/{rids[1]}").status_code == 200
        resp = answer.result(timeout=30)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "cancelled"

    def first_ended() -> bool:
        return bool(httpx.get(f"{url}/v1/requests/{rids[0]}").json()["status"] == "cancelled")

    wait_for(first_ended, 10, 0.05, "the other choice cancelled")
    assert httpx.get(f"{url}/v1/requests/{rids[0]}").json()["completion_tokens"] < 2000


def _records_of(procs: StackProcs, xrid: str) -> list[dict[str, Any]]:
    """The status of every request whose X-Request-ID is ``xrid`` (read from Redis)."""
    client = sync_redis(procs.redis_url)
    try:
        out = []
        for key in client.scan_iter(match=procs.keys_request("*"), count=1000):
            record = client.hgetall(key)
            if record.get("request_id") == xrid:
                out.append({"id": str(key).split("{")[1][:-1], "status": record.get("status")})
        return out
    finally:
        client.close()


async def test_a_refused_choice_takes_back_the_queued_ones(redis_server: RedisServer, prefix: str) -> None:
    """The lane holds 2 waiting requests and 1 waits already: of n=3 the first choice is queued, the
    second refused, so the request gets 429 and its first choice is cancelled: none of it runs."""
    async with inproc_gateway(redis_server.url, prefix, lane_max_queued=2) as gw:
        await gw.add_worker(SimEngine(SimOptions(capacity=1, decode_base_ms=20, decode_per_seq_ms=0)))
        broker = gw.broker()
        try:
            await _one_waits(broker)
            body = {"model": "sim", "prompt": "three of us", "n": 3, "max_tokens": 4}
            refused = await gw.http.post("/v1/completions", json=body)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            keys = [k async for k in broker.redis.scan_iter(match=f"{prefix}:req:*")]
            choices = [r for r in [await broker.get_record(k.split("{")[1][:-1]) for k in keys] if r]
            choices = [r for r in choices if r.spec.choices == 3]
            assert len(choices) == 1  # the first was queued; the second was refused; the third never sent
            assert choices[0].status is Status.CANCELLED and choices[0].tokens == 0
            # Withdrawn from the lane at once: only the job that waited before waits now.
            assert (await broker.queue_depth("sim", "interactive"))[0] == 1
        finally:
            await broker.aclose()


async def test_a_prompt_too_long_for_the_context_queues_none_of_the_group(
    redis_server: RedisServer, prefix: str
) -> None:
    """Every prompt of a list is checked against the model's context before any choice is queued:
    a too-long last prompt is a 400 and nothing of the request was queued."""
    async with inproc_gateway(redis_server.url, prefix) as gw:
        await gw.add_worker(SimEngine(SimOptions(context_length=64, decode_base_ms=1, decode_per_seq_ms=0)))
        body = {"model": "sim", "prompt": ["short", "short too", "word " * 300], "n": 2, "max_tokens": 4}
        refused = await gw.http.post("/v1/completions", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        assert [k async for k in gw.app.state.service.broker.redis.scan_iter(match=f"{prefix}:req:*")] == []
        body["prompt"] = ["short", "short too"]
        assert (await gw.http.post("/v1/completions", json=body)).status_code == 200


async def test_a_groups_choices_take_the_limits_as_one_arrival(
    redis_server: RedisServer, prefix: str
) -> None:
    """A group's choices take their key's limits in one call, as one arrival of all their requests
    and tokens: a group fits whenever a minute's allowance does (one call per choice let only GCRA's
    burst, 1.2 s of the minute, in: n=3 at 3 per minute, or 4,800 tokens at 5,000 per minute, were
    refused), and what follows it waits for all of them. More than the key's concurrency, a minute's
    requests or a minute's tokens, or as much held before the last choice as the daily budget, is a
    400 naming why, not a 429 to retry forever."""
    pepper = "choices-limits-pepper-0123456789"
    async with inproc_gateway(redis_server.url, prefix, auth="keys", auth_pepper=pepper) as gw:
        await gw.add_worker()
        store = gw.app.state.service.broker.api_keys(pepper.encode())
        per_minute, _ = await store.create(ApiKey(id="", tenant="t", rpm=3))
        concurrent, _ = await store.create(ApiKey(id="", tenant="t", max_concurrent=3))
        tokens, _ = await store.create(ApiKey(id="", tenant="t", tpm=5000))
        budget, _ = await store.create(ApiKey(id="", tenant="t", budget_day=200))
        # (key, max_tokens): 4 choices are too many (4 > 3 requests, 4 x 1,601 > 5,000 tokens,
        # 3 x 67 >= 200 held before the last); 3 fit.
        for key, max_tokens in ((per_minute, 2), (concurrent, 2), (tokens, 1600), (budget, 66)):
            headers = {"Authorization": f"Bearer {key}"}
            for body in (
                {"model": "sim", "prompt": "four", "n": 4, "max_tokens": max_tokens},
                {"model": "sim", "prompt": ["a", "b", "c", "d"], "max_tokens": max_tokens},
            ):
                refused = await gw.http.post("/v1/completions", json=body, headers=headers)
                assert refused.status_code == 400, refused.text
                error = refused.json()["error"]
                assert error["code"] == "too_many_choices" and error["param"] == (
                    "n" if "n" in body else "prompt"
                )
            fits = {"model": "sim", "prompt": ["a", "b", "c"], "max_tokens": min(max_tokens, 8)}
            if key in (tokens, budget):  # at the bound: 3 x 1,601 <= 5,000; 2 x 67 < 200 before the last
                fits = {"model": "sim", "prompt": "a", "n": 3, "max_tokens": max_tokens}
            served = await gw.http.post("/v1/completions", json=fits, headers=headers)
            assert served.status_code == 200, (key, served.text)
            assert len(served.json()["choices"]) == 3
            if key is per_minute:
                # The three took three requests of the minute: the next one waits for them (GCRA's
                # TAT a minute ahead, less the burst), and the group's response said none remain.
                assert served.headers["x-ratelimit-remaining-requests"] == "0"
                one = {"model": "sim", "prompt": "one", "max_tokens": 2}
                later = await gw.http.post("/v1/completions", json=one, headers=headers)
                assert later.status_code == 429, later.text
                assert later.headers["X-Breakwater-Reason"] == "rate_limit_requests"
                assert int(later.headers["retry-after-ms"]) > 30_000  # three of the minute's, not one


async def test_a_budget_admits_a_group_only_as_it_would_choice_by_choice(
    redis_server: RedisServer, prefix: str
) -> None:
    """A budget is passed by one choice's hold at most: with 150 of 200 tokens used, one request
    holding 67 is admitted, but two choices holding 67 each are not (the second would not be), and
    nothing of the refused group stays held."""
    pepper = "choices-limits-pepper-0123456789"
    async with inproc_gateway(redis_server.url, prefix, auth="keys", auth_pepper=pepper) as gw:
        await gw.add_worker()
        broker = gw.app.state.service.broker
        secret, key = await broker.api_keys(pepper.encode()).create(ApiKey(id="", tenant="t", budget_day=200))
        usage = broker.keys.usage("t", day_of(time.time()))
        await broker.redis.hset(usage, f"{key.id}:prompt_tokens", 150)  # metered earlier today
        headers = {"Authorization": f"Bearer {secret}"}
        two = {"model": "sim", "prompt": "a", "n": 2, "max_tokens": 66}  # 1 + 66 tokens held a choice
        refused = await gw.http.post("/v1/completions", json=two, headers=headers)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        assert await broker.redis.hmget(usage, f"{key.id}:held", "*:held") in ([None, None], ["0", "0"])
        alone = await gw.http.post("/v1/completions", json={**two, "n": 1}, headers=headers)
        assert alone.status_code == 200, alone.text


async def test_a_group_refused_for_a_parameter_takes_nothing_of_the_limits(
    redis_server: RedisServer, prefix: str
) -> None:
    """A group whose body the engine cannot serve (the sim has no logprobs) is a 400 naming the
    parameter before its limits are taken: retried as often as the client likes, it leaves the
    key's minute whole for the group that follows."""
    pepper = "choices-limits-pepper-0123456789"
    async with inproc_gateway(redis_server.url, prefix, auth="keys", auth_pepper=pepper) as gw:
        await gw.add_worker()
        store = gw.app.state.service.broker.api_keys(pepper.encode())
        secret, _ = await store.create(ApiKey(id="", tenant="t", rpm=3))
        headers = {"Authorization": f"Bearer {secret}"}
        body = {"model": "sim", "prompt": "a", "n": 3, "max_tokens": 2}
        for _ in range(2):
            refused = await gw.http.post("/v1/completions", json={**body, "logprobs": 1}, headers=headers)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
        served = await gw.http.post("/v1/completions", json=body, headers=headers)
        assert served.status_code == 200, served.text


async def test_a_refused_group_gives_back_the_limits_its_choices_took(
    redis_server: RedisServer, prefix: str
) -> None:
    """The group takes its key's limits for all its choices before the first is queued; when one is
    refused (its lane full), the places and budget holds of the ones not queued are given back at
    once, and the queued one is withdrawn from its lane and metered as cancelled: its place and its
    hold come back too, without waiting for a worker to read its job."""
    pepper = "choices-limits-pepper-0123456789"
    async with inproc_gateway(
        redis_server.url, prefix, lane_max_queued=2, auth="keys", auth_pepper=pepper
    ) as gw:
        await gw.add_worker(SimEngine(SimOptions(capacity=1, decode_base_ms=20, decode_per_seq_ms=0)))
        broker = gw.broker()
        store = gw.app.state.service.broker.api_keys(pepper.encode())
        secret, key = await store.create(ApiKey(id="", tenant="t", max_concurrent=5, budget_day=10_000))
        try:
            await _one_waits(broker)
            body = {"model": "sim", "prompt": "three of us", "n": 3, "max_tokens": 4}
            refused = await gw.http.post(
                "/v1/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
            )
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            assert await broker.redis.zrange(broker.keys.running("t", key.id), 0, -1) == []
            usage = broker.keys.usage("t", day_of(time.time()))
            assert await broker.redis.hmget(usage, f"{key.id}:held", "*:held") == ["0"] * 2
            assert await broker.redis.hget(usage, f"{key.id}:cancelled") == "1"  # the withdrawn choice
            assert (await broker.queue_depth("sim", "interactive"))[0] == 1
        finally:
            await broker.aclose()


async def _one_waits(broker: Broker) -> None:
    """Two long jobs on a worker that runs one at a time: one running, the other waiting."""
    busy = [await _enqueue(broker, f"busy-{i}") for i in range(2)]

    async def one_running() -> bool:
        records = [await broker.get_record(rid) for rid in busy]
        return any(r is not None and r.status is Status.RUNNING for r in records)

    await async_wait_for(one_running, 10, 0.01, what="one of the two running, one waiting")


async def _enqueue(broker: Broker, rid: str) -> str:
    spec = RequestSpec(
        model="sim",
        lane="interactive",
        kind="completion",
        request_id=rid,
        timeout_s=60,
        prompt=rid,
        max_tokens=2000,
        ignore_eos=True,
    )
    result = await broker.enqueue(rid=rid, spec=spec, max_queued=10, result_ttl_s=60, cost=10)
    assert result.accepted
    return rid
