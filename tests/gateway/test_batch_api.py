"""The Files and Batch APIs with the official ``openai`` client, in-process with the sim engine: a
batch's lines are answered as the same requests sent one by one would be, into an output file and an
error file; an input with bad lines fails whole, naming them; a batch can be cancelled; another
gateway takes over a batch whose gateway stopped, answering every line once."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import openai
import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.broker import batches as batch_store
from breakwater.broker.ledger import day_of
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import EMBEDDING_DIM, SimEngine
from breakwater.gateway.batch_runner import BatchRunner, _retry_after_s
from breakwater.gateway.errors import APIError
from breakwater.gateway.following import RedisAway
from breakwater.protocol.batches import BatchRecord, parse_input
from breakwater.redis_server import RedisServer
from breakwater.tenancy.apikeys import ApiKey
from tests.helpers import async_wait_for, expected_sim
from tests.inproc import InProc, busy_gateway, inproc_gateway

PEPPER = "test-pepper-for-batches"


@pytest.fixture
async def client(gw: InProc) -> AsyncIterator[openai.AsyncOpenAI]:
    async with gw.sdk() as c:
        yield c


def _chat(
    custom_id: str, content: str, seed: int, max_tokens: int, model: str = "sim", **extra: Any
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "seed": seed,
        "max_tokens": max_tokens,
    }
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {**body, **extra},
    }


def _jsonl(rows: list[Any]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


async def _upload(client: openai.AsyncOpenAI, rows: list[Any]) -> str:
    file = await client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    assert (file.purpose, file.bytes, file.filename) == ("batch", len(_jsonl(rows)), "in.jsonl")
    return file.id


async def _create(client: openai.AsyncOpenAI, rows: list[Any], endpoint: Any = "/v1/chat/completions") -> Any:
    """A batch of ``rows``, uploaded as its input file."""
    return await client.batches.create(
        input_file_id=await _upload(client, rows), endpoint=endpoint, completion_window="24h"
    )


async def _settled(client: openai.AsyncOpenAI, batch_id: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        await asyncio.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not finish in {timeout_s}s: {batch.status}")


async def _answered(store: Any, batch_id: str, n: int) -> bool:
    return len(await store.answered(batch_id)) >= n


async def _lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return [orjson.loads(line) for line in content.content.splitlines()]


async def test_a_batch_answers_each_line_as_the_request_alone_would(
    gw: InProc, client: openai.AsyncOpenAI
) -> None:
    rows = [_chat(f"q{i}", f"batch question {i}", seed=i, max_tokens=4 + i) for i in range(6)]
    rows.append(_chat("lost", "nobody serves this", seed=1, max_tokens=3, model="no-such-model"))
    batch = await client.batches.create(
        input_file_id=await _upload(client, rows),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "nightly"},
    )
    assert batch.request_counts is not None
    file_ttl_s = await gw.app.state.service.broker.redis.ttl(gw.keys.file(batch.input_file_id))
    assert file_ttl_s > 86_400  # the input outlives the batch's window: a runner taking over reads it
    assert (batch.status, batch.request_counts.total, batch.metadata) == (
        "in_progress",
        7,
        {"run": "nightly"},
    )
    assert (batch.model, batch.usage) == (None, None)  # its lines name two models; not ended yet
    done = await _settled(client, batch.id)
    assert done.status == "completed" and done.completed_at is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 1)
    output = await _lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == [f"q{i}" for i in range(6)]
    for i, line in enumerate(output):
        text, reason, usage = expected_sim(
            messages=[{"role": "user", "content": f"batch question {i}"}], seed=i, max_tokens=4 + i
        )
        response = line["response"]
        assert response["status_code"] == 200 and line["error"] is None
        assert response["body"]["choices"][0]["message"]["content"] == text
        assert response["body"]["choices"][0]["finish_reason"] == reason
        assert response["body"]["usage"] == {**response["body"]["usage"], **usage}
        assert response["request_id"] == response["body"]["id"]
    assert done.usage is not None  # the answered lines' tokens (the failed one has none)
    used = [line["response"]["body"]["usage"] for line in output]
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens) == (
        sum(u["prompt_tokens"] for u in used),
        sum(u["completion_tokens"] for u in used),
        sum(u["total_tokens"] for u in used),
    )
    lines = gw.app.state.service.metrics.batch_lines
    assert (lines.labels("ok")._value.get(), lines.labels("failed")._value.get()) == (6, 1)
    [error] = await _lines(client, done.error_file_id)
    assert error["custom_id"] == "lost" and error["response"]["status_code"] == 404
    assert error["response"]["body"]["error"]["code"] == "model_not_found"
    out_file = await client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and done.id in out_file.filename
    listed = await client.batches.list()
    assert done.id in [b.id for b in listed.data]
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(done.id)


async def test_lines_with_n_choices_and_embeddings_are_answered_whole(client: openai.AsyncOpenAI) -> None:
    two = _chat("two", "two answers", seed=5, max_tokens=4, n=2)
    batch = await _create(client, [two])
    [line] = await _lines(client, (await _settled(client, batch.id)).output_file_id)
    assert [c["index"] for c in line["response"]["body"]["choices"]] == [0, 1]
    rows = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "sim", "input": text},
        }
        for i, text in enumerate(["first text", "second text"])
    ]
    batch = await _create(client, rows, "/v1/embeddings")
    output = await _lines(client, (await _settled(client, batch.id)).output_file_id)
    direct = await client.embeddings.create(model="sim", input="second text")
    assert [line["custom_id"] for line in output] == ["e0", "e1"]
    assert output[1]["response"]["body"]["data"][0]["embedding"] == direct.data[0].embedding
    assert len(output[0]["response"]["body"]["data"][0]["embedding"]) == EMBEDDING_DIM


async def test_a_batch_of_responses_answers_each_as_responses_create_would(
    client: openai.AsyncOpenAI,
) -> None:
    """Endpoint ``/v1/responses``: each line's body is a Responses API create request; its answer is
    the response object (retrievable by its id afterwards)."""
    rows: list[dict[str, Any]] = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"model": "sim", "input": f"respond {i}", "instructions": "Be brief.", "seed": i},
        }
        for i in range(3)
    ]
    batch = await _create(client, rows, "/v1/responses")
    done = await _settled(client, batch.id)
    output = await _lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == ["r0", "r1", "r2"]
    used = [line["response"]["body"]["usage"] for line in output]
    assert done.model == "sim" and done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens) == (
        sum(u["input_tokens"] for u in used),
        sum(u["output_tokens"] for u in used),
    )
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    for i, line in enumerate(output):
        body = line["response"]["body"]
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"respond {i}"}]
        text, _, _ = expected_sim(messages=messages, seed=i)
        assert (body["object"], body["status"], body["id"]) == (
            "response",
            "completed",
            line["response"]["request_id"],
        )
        assert body["output"][0]["content"][0]["text"] == text
        assert (await client.responses.retrieve(body["id"])).output_text == text
    background = {**rows[0], "body": {**rows[0]["body"], "background": True}}
    failed = await _create(client, [background], "/v1/responses")
    assert failed.status == "failed" and failed.errors is not None
    assert [(e.line, e.param) for e in failed.errors.data or []] == [(1, "body.background")]


async def test_an_input_with_bad_lines_fails_whole_and_names_each(
    gw: InProc, client: openai.AsyncOpenAI
) -> None:
    good = _chat("ok", "fine", seed=1, max_tokens=3)
    rows: list[Any] = [
        good,
        {**_chat("url", "x", 1, 3), "url": "/v1/completions"},
        _chat("ok", "the same id again", 1, 3),
        _chat("param", "x", 1, 3, reasoning_effort="high"),
        _chat("streamed", "x", 1, 3, stream=True),
        {**_chat("bad", "x", 1, 3), "body": {"model": "sim", "messages": "not a list"}},
        {  # a tool result that answers no call
            **_chat("turns", "x", 1, 3),
            "body": {"model": "sim", "messages": [{"role": "tool", "tool_call_id": "c1", "content": "r"}]},
        },
        {
            **_chat("empty", "x", 1, 3),
            "body": {"model": "sim", "messages": [{"role": "user", "content": []}]},
        },
        _chat(  # a schema keyword the grammar cannot keep: refused at create, not line by line later
            "bounded",
            "x",
            1,
            3,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "integer", "maximum": 9}},
            },
        ),
    ]
    data = _jsonl(rows[:2]) + b"\n" + _jsonl(rows[2:]) + b"{not json\n"  # line 3 is blank
    file = await client.files.create(file=("bad.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.failed_at is not None and batch.errors is not None
    found = [(e.line, e.code, e.param) for e in batch.errors.data or []]
    assert found == [  # numbered as the file's lines, the blank one counted
        (2, "mismatched_endpoint", "url"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "unsupported_parameter", "body.reasoning_effort"),
        (6, "invalid_body", "body.stream"),
        (7, "invalid_body", "body.messages"),
        (8, "invalid_body", "body.messages.0.role"),
        (9, "invalid_body", "body.messages.0.content"),
        (10, "invalid_response_format", "body.response_format.json_schema.schema"),
        (11, "invalid_json_line", None),
    ]
    assert batch.request_counts is not None and batch.request_counts.total == 10
    assert (await client.batches.retrieve(batch.id)).status == "failed"  # and nothing runs it
    redis = gw.app.state.service.broker.redis
    assert await redis.ttl(gw.keys.batch(batch.id)) > 0  # kept files_ttl_s, as a finished batch
    assert batch.id not in await redis.smembers(gw.keys.batches_active())


async def test_what_a_batch_cannot_be_is_a_400_naming_it(client: openai.AsyncOpenAI) -> None:
    file_id = await _upload(client, [_chat("a", "x", 1, 3)])
    for kwargs, param in (
        ({"endpoint": "/v1/moderations", "completion_window": "24h"}, "endpoint"),
        ({"endpoint": "/v1/chat/completions", "completion_window": "1h"}, "completion_window"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            await client.batches.create(input_file_id=file_id, **kwargs)  # type: ignore[arg-type]
        assert isinstance(info.value.body, dict) and info.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError) as info:  # not served: refused by name, not ignored
        await client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 3600},
        )
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "output_expires_after"
    with pytest.raises(openai.BadRequestError) as info:
        await client.files.create(
            file=("x.jsonl", io.BytesIO(b"{}\n")),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "expires_after"
    with pytest.raises(openai.BadRequestError) as info:
        await client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("x.bin", io.BytesIO(b"\xff\xfe\n")), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")


async def test_files_are_listed_read_and_deleted(client: openai.AsyncOpenAI) -> None:
    rows = [_chat("a", "x", 1, 3)]
    file_id = await _upload(client, rows)
    assert file_id in [f.id for f in (await client.files.list()).data]
    assert (await client.files.content(file_id)).content == _jsonl(rows)
    deleted = await client.files.delete(file_id)
    assert deleted.deleted and deleted.id == file_id
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(file_id)
    assert file_id not in [f.id for f in (await client.files.list()).data]


@pytest.fixture
async def slow(redis_server: RedisServer, prefix: str) -> AsyncIterator[InProc]:
    """A gateway without a batch runner of its own, and a sim worker at 20 ms a token."""
    async with inproc_gateway(redis_server.url, prefix, batch_runner=False, batch_concurrency=2) as gw:
        await gw.add_worker(SimEngine(SimOptions(decode_base_ms=20, decode_per_seq_ms=0)))
        yield gw


async def test_a_cancelled_batch_keeps_what_it_answered_and_lets_the_rest_go(slow: InProc) -> None:
    runner = BatchRunner(slow.app.state.service, slow.app.state.batches, owner="a")
    rows = [_chat(f"c{i}", f"cancel me {i}", seed=i, max_tokens=30, ignore_eos=True) for i in range(8)]
    async with slow.sdk() as client:
        batch = await _create(client, rows)
        await runner.tick()
        store = slow.app.state.batches
        await async_wait_for(lambda: _answered(store, batch.id, 2), 30, what="two lines answered")
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
        done = await _settled(client, batch.id)
        assert done.status == "cancelled" and done.cancelled_at is not None
        answered = done.request_counts.completed
        assert 2 <= answered < 8 and done.request_counts.failed == 0
        output = await _lines(client, done.output_file_id)
        assert len(output) == answered and all(line["response"]["status_code"] == 200 for line in output)
        again = await client.batches.cancel(batch.id)  # cancelled already: the batch as it is
        assert again.status == "cancelled" and again.request_counts is not None
        assert again.request_counts.completed == answered
    await runner.stop()


async def test_a_line_cut_short_by_redis_away_is_taken_up_again_under_its_key(
    slow: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that Redis left mid-answer (gateway.following.RedisAway, a 503) was a refusal to the
    runner: the line was sent again under a new Idempotency-Key while its first request ran on (two
    generations, both metered). As after any Redis outage, it is taken up again under the same key."""
    runner = BatchRunner(slow.app.state.service, slow.app.state.batches, owner="a")
    keys: list[str] = []
    send = runner._send

    async def away_once(record: Any, line: Any, body: Any, key: str) -> Any:
        keys.append(key)
        if len(keys) == 1:
            raise RedisAway(RedisConnectionError("failing over"))
        return await send(record, line, body, key)

    monkeypatch.setattr(runner, "_send", away_once)
    async with slow.sdk() as client:
        batch = await _create(client, [_chat("c0", "once only", seed=1, max_tokens=4)])

        async def done() -> bool:
            await runner.tick()
            return (await client.batches.retrieve(batch.id)).status == "completed"

        await async_wait_for(done, 60, 0.2, what="the batch completed")
    await runner.stop()
    assert len(keys) == 2 and keys[0] == keys[1]


def _responses_line(custom_id: str, text: str) -> dict[str, Any]:
    body = {"model": "sim", "input": text, "max_output_tokens": 4}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses", "body": body}


@pytest.mark.parametrize(
    ("endpoint", "extra", "per_line"),
    [("/v1/chat/completions", {}, 1), ("/v1/chat/completions", {"n": 2}, 2), ("/v1/responses", {}, 1)],
    ids=["chat", "n2", "responses"],
)
async def test_a_cancelled_batch_cancels_its_queued_lines_they_never_run(
    redis_server: RedisServer,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    endpoint: Any,
    extra: dict[str, Any],
    per_line: int,
) -> None:
    """Let go, a queued line that a worker took within the detach grace ran to its end and was
    billed to its owner for an answer the batch never gave (each choice of an ``n > 1`` line, and a
    Responses line, found by its own form of the line's Idempotency-Key)."""
    settings = {"batch_runner": False, "batch_concurrency": 2}
    async with busy_gateway(redis_server.url, prefix, 3.0, **settings) as gw, gw.sdk() as client:
        runner = BatchRunner(gw.app.state.service, gw.app.state.batches, owner="a")
        rids = gw.queued_ids(monkeypatch)
        if endpoint == "/v1/responses":
            rows = [_responses_line(f"q{i}", f"queued {i}") for i in range(3)]
        else:
            rows = [_chat(f"q{i}", f"queued {i}", seed=i, max_tokens=4, **extra) for i in range(3)]
        batch = await _create(client, rows, endpoint)
        await runner.tick()
        await async_wait_for(lambda: len(rids) == 2 * per_line, 10, what="two lines queued")
        lines = list(rids)
        await client.batches.cancel(batch.id)

        async def statuses() -> list[str]:
            return [(await gw.http.get(f"/v1/requests/{rid}")).json()["status"] for rid in lines]

        async def ended() -> bool:
            return "queued" not in await statuses()

        await async_wait_for(ended, 10, what="the open lines ended")
        assert await statuses() == ["cancelled"] * len(lines)
        assert (await gw.http.get(f"/v1/requests/{gw.busy_rid}")).json()["status"] == "running"
        done = await _settled(client, batch.id)
        assert done.status == "cancelled" and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (0, 0)
        assert len(rids) == 2 * per_line  # the third line was never sent
        await runner.stop()


async def test_a_cancelled_batch_leaves_alone_the_request_its_line_joined_through_the_cache(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its line's Idempotency-Key is bound to another line's request (the response cache joined
    them): cancelling this batch cancelled that one, which its own batch still waited for."""
    settings = {"batch_runner": False, "batch_concurrency": 1, "cache": True}
    async with busy_gateway(redis_server.url, prefix, 3.0, **settings) as gw, gw.sdk() as client:
        runner = BatchRunner(gw.app.state.service, gw.app.state.batches, owner="a")
        rids = gw.queued_ids(monkeypatch)
        rows = [_chat("same", "the same question", seed=7, max_tokens=4)]
        first = await _create(client, rows)
        await runner.tick()
        await async_wait_for(lambda: len(rids) == 1, 10, what="the first batch's line queued")
        second = await _create(client, rows)
        await runner.tick()
        service = gw.app.state.service
        await async_wait_for(
            lambda: service.metrics.registry.get_sample_value(
                "breakwater_cache_single_flight_total", {"model": "sim"}
            ),
            10,
            what="the second batch's line joined the first's request",
        )
        assert set(rids) == {rids[0]}  # (it follows the same request)
        await client.batches.cancel(second.id)
        assert (await _settled(client, second.id)).status == "cancelled"
        assert (await gw.http.get(f"/v1/requests/{rids[0]}")).json()["status"] == "queued"
        done = await _settled(client, first.id)
        assert done.status == "completed" and done.request_counts is not None
        assert done.request_counts.completed == 1
        await runner.stop()


async def test_a_request_on_the_batch_lane_outside_a_batch_keeps_the_gateways_timeout(gw: InProc) -> None:
    """A Batch API line may wait its batch's day; a client's own `lane: batch` request does not (a
    client gone, it would hold its key's concurrency that long)."""
    got = await gw.http.post(
        "/v1/completions", json={"model": "sim", "prompt": "hi", "max_tokens": 2, "lane": "batch"}
    )
    assert got.status_code == 200, got.text
    record = await gw.app.state.service.broker.get_record(got.headers["x-breakwater-request-id"])
    assert record is not None and record.spec.timeout_s == 600.0


async def test_a_line_without_a_timeout_may_wait_the_batch_window(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its request took the gateway's `request_timeout_s` (600 s): a batch sent while interactive
    traffic filled the workers failed its lines long before its day was out."""
    settings = {"batch_runner": False, "request_timeout_s": 5}
    async with busy_gateway(redis_server.url, prefix, 3.0, **settings) as gw, gw.sdk() as client:
        runner = BatchRunner(gw.app.state.service, gw.app.state.batches, owner="a")
        rids = gw.queued_ids(monkeypatch)
        rows = [
            _chat("own", "mine", seed=1, max_tokens=4, timeout=50),
            _chat("none", "none", seed=2, max_tokens=4),
        ]
        batch = await _create(client, rows)
        await runner.tick()
        await async_wait_for(lambda: len(rids) == 2, 10, what="both lines queued")
        broker = gw.app.state.service.broker
        timeouts = {}
        for rid in rids:
            record = await broker.get_record(rid)
            assert record is not None
            timeouts[record.spec.messages[0]["content"]] = record.spec.timeout_s
        assert timeouts["mine"] == 50.0
        assert 86_000 < timeouts["none"] <= 86_400  # what is left of the batch's day
        done = await _settled(client, batch.id)
        assert done.status == "completed" and done.request_counts is not None
        assert done.request_counts.completed == 2
        await runner.stop()


async def test_another_gateway_takes_a_batch_over_and_answers_each_line_once(slow: InProc) -> None:
    """Runner a stops (its gateway drains) with lines open; runner b goes on: it follows the open
    lines' requests again (the same requests, not new ones) and answers every line once."""
    service, store = slow.app.state.service, slow.app.state.batches
    a, b = BatchRunner(service, store, owner="a"), BatchRunner(service, store, owner="b")
    rows = [_chat(f"t{i}", f"take me over {i}", seed=i, max_tokens=20, ignore_eos=True) for i in range(6)]
    async with slow.sdk() as client:
        batch = await _create(client, rows)
        await a.tick()
        await b.tick()  # a holds the lease: b waits
        assert list(b._running) == []
        await async_wait_for(lambda: _answered(store, batch.id, 2), 30, what="two lines answered")
        await a.stop()  # its lines' requests go on in the worker; the lease is given back
        assert len(await store.answered(batch.id)) < 6
        await b.tick()
        assert list(b._running) == [batch.id]
        done = await _settled(client, batch.id)
        await b.stop()
        output = await _lines(client, done.output_file_id)
    assert done.status == "completed" and done.request_counts.completed == 6
    assert sorted(line["custom_id"] for line in output) == [f"t{i}" for i in range(6)]
    for line in output:
        i = int(line["custom_id"][1:])
        text, _, _ = expected_sim(
            messages=[{"role": "user", "content": f"take me over {i}"}],
            seed=i,
            max_tokens=20,
            ignore_eos=True,
        )
        assert line["response"]["body"]["choices"][0]["message"]["content"] == text
    broker = slow.app.state.service.broker
    requests = [k async for k in broker.redis.scan_iter(match=f"{slow.prefix}:req:*")]
    assert len(requests) == 6  # one request per line: the open ones were followed, not sent again
    # A finish done again (its runner stopped before recording its files) writes the same file over.
    files = await store.files("anonymous")
    record = await store.get(batch.id)
    data = await store.file_data(record.input_file_id)
    await b._write_files(record, parse_input(data, record.endpoint).lines, expired=False)
    assert record.output_file_id == done.output_file_id and await store.files("anonymous") == files
    assert b"".join([part async for part in store.file_parts(record.output_file_id)]).count(b"\n") == 6


async def test_a_gateway_runs_no_more_batches_at_once_than_its_bound(
    redis_server: RedisServer, prefix: str
) -> None:
    """``batch_max_running`` 1: runner a takes one of two batches and leaves the other, which runner b
    takes; once a's batch is done, a takes the next one created."""
    async with inproc_gateway(redis_server.url, prefix, batch_runner=False, batch_max_running=1) as gw:
        await gw.add_worker(SimEngine(SimOptions(decode_base_ms=20, decode_per_seq_ms=0)))
        service, store = gw.app.state.service, gw.app.state.batches
        a, b = BatchRunner(service, store, owner="a"), BatchRunner(service, store, owner="b")
        async with gw.sdk() as client:
            rows = [
                [_chat(f"{k}{i}", f"bound {k} {i}", seed=i, max_tokens=10) for i in range(3)] for k in "xy"
            ]
            first, second = [await _create(client, r) for r in rows]
            await a.tick()
            await a.tick()  # the second tick renews a's lease and still leaves the other batch
            assert len(a._running) == 1
            await b.tick()
            assert len(b._running) == 1 and set(a._running) | set(b._running) == {first.id, second.id}
            done = [await _settled(client, batch.id) for batch in (first, second)]
            assert [d.request_counts.completed for d in done] == [3, 3]
            await async_wait_for(lambda: _idle(a), 10, what="runner a's batch ended")
            third = await _create(client, rows[0])
            await a.tick()
            assert list(a._running) == [third.id]
            assert (await _settled(client, third.id)).request_counts.completed == 3
        await a.stop()
        await b.stop()


async def test_a_cancelled_batch_is_finished_by_a_gateway_at_its_bound(
    redis_server: RedisServer, prefix: str
) -> None:
    """A batch cancelled before any gateway took it has nothing left to send: a runner at its bound
    still takes it and finishes it (``cancelled``) while its own batch runs on."""
    async with inproc_gateway(redis_server.url, prefix, batch_runner=False, batch_max_running=1) as gw:
        await gw.add_worker(SimEngine(SimOptions(decode_base_ms=20, decode_per_seq_ms=0)))
        runner = BatchRunner(gw.app.state.service, gw.app.state.batches, owner="a")
        async with gw.sdk() as client:
            rows = [_chat(f"r{i}", f"run on {i}", seed=i, max_tokens=400, ignore_eos=True) for i in range(4)]
            running = await _create(client, rows)
            await runner.tick()
            assert list(runner._running) == [running.id]
            cancelled = await _create(client, rows[:2])
            assert (await client.batches.cancel(cancelled.id)).status == "cancelling"
            await runner.tick()
            done = await _settled(client, cancelled.id, timeout_s=10)
            assert done.status == "cancelled" and done.request_counts.completed == 0
            assert (await client.batches.retrieve(running.id)).status == "in_progress"
            await client.batches.cancel(running.id)
        await runner.stop()


async def _idle(runner: BatchRunner) -> bool:
    return not runner._running


def test_a_batch_finished_by_a_version_that_did_not_count_tokens_has_no_usage() -> None:
    """A record without the token counts (written before them, or finished by an older runner in a
    rolling upgrade) reads usage null, not zero tokens."""
    new = BatchRecord("batch_1", "t", "k", "/v1/chat/completions", "file-1", "in_progress", 1, 2)
    old = {k: v for k, v in new.to_hash().items() if k not in ("model", "input_tokens", "output_tokens")}
    finished = BatchRecord.from_hash({**old, "status": "completed"})
    assert finished.to_object()["usage"] is None and finished.to_object()["model"] is None
    counted = BatchRecord.from_hash(
        {**new.to_hash(), "status": "completed", "input_tokens": "5", "output_tokens": "0"}
    )
    assert counted.to_object()["usage"]["total_tokens"] == 5


def test_a_line_is_sent_again_only_while_it_can_still_be_answered() -> None:
    timeout = APIError(504, "timed out", code="timeout")
    assert _retry_after_s(timeout, 1, 3600) == 2.0
    assert _retry_after_s(timeout, 4, 3600) == 16.0
    assert _retry_after_s(timeout, 5, 3600) is None  # cut short too often
    full = APIError(429, "queue full", code="queue_full", headers={"Retry-After": "3"})
    assert _retry_after_s(full, 2000, 3600) == 3.0  # refused for now: as long as the window lasts
    assert _retry_after_s(APIError(503, "no worker"), 2000, 3600) == 30.0  # no overflow, capped
    spent = APIError(429, "budget spent", code="budget_exceeded", headers={"Retry-After": "90000"})
    assert _retry_after_s(spent, 1, 3600) is None  # told to wait past the window
    assert _retry_after_s(APIError(400, "bad", code="invalid_value"), 1, 3600) is None


async def test_another_tenants_files_and_batches_are_not_found(
    redis_server: RedisServer, prefix: str
) -> None:
    async with inproc_gateway(redis_server.url, prefix, auth="keys", auth_pepper=PEPPER) as gw:
        await gw.add_worker()
        store = gw.app.state.service.broker.api_keys(PEPPER.encode())
        mine, _ = await store.create(ApiKey(id="", tenant="mine"))
        theirs, _ = await store.create(ApiKey(id="", tenant="theirs"))
        async with gw.sdk() as base:
            owner, other = base.with_options(api_key=mine), base.with_options(api_key=theirs)
            with pytest.raises(openai.AuthenticationError):  # refused before its body is read
                await base.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
            file_id = await _upload(owner, [_chat("a", "mine alone", 1, 3)])
            batch = await owner.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            for call in (
                other.files.retrieve(file_id),
                other.files.content(file_id),
                other.files.delete(file_id),
                other.batches.retrieve(batch.id),
                other.batches.cancel(batch.id),
                other.batches.create(
                    input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
                ),
            ):
                with pytest.raises(openai.NotFoundError):
                    await call
            assert (await other.files.list()).data == [] and (await other.batches.list()).data == []
            done = await _settled(owner, batch.id)
            assert done.status == "completed" and done.request_counts.completed == 1
            with pytest.raises(openai.NotFoundError):
                await other.files.content(done.output_file_id or "")


async def test_a_batch_goes_on_as_the_key_its_key_was_rotated_to_and_stops_when_that_is_revoked(
    redis_server: RedisServer, prefix: str
) -> None:
    """A key rotated past its grace (here none) leaves its batch to the new key: the lines are
    answered as the new key and metered under the id of the first key of its rotations (its
    lineage), as the new key's own requests are. A batch whose newest key of its rotations is revoked, or
    whose key is revoked (`keys revoke`) during its rotation's grace, fails the lines still to run
    with 401."""
    async with inproc_gateway(
        redis_server.url, prefix, auth="keys", auth_pepper=PEPPER, batch_runner=False
    ) as gw:
        await gw.add_worker()
        service = gw.app.state.service
        store = service.broker.api_keys(PEPPER.encode())
        old, old_key = await store.create(ApiKey(id="", tenant="acme"))
        second, second_key = await store.create(ApiKey(id="", tenant="acme"))
        leaked, leaked_key = await store.create(ApiKey(id="", tenant="acme"))
        async with gw.sdk() as base:
            rows = [_chat(f"r{i}", f"rotated {i}", seed=i, max_tokens=3) for i in range(2)]
            goes_on = await _create(base.with_options(api_key=old), rows)
            stops = await _create(base.with_options(api_key=second), [_chat("x", "stopped", 9, 3)])
            revoked = await _create(base.with_options(api_key=leaked), [_chat("x", "revoked", 9, 3)])
            assert await store.rotate(leaked_key.id, grace_s=3600) is not None
            ended = await store.revoke(leaked_key.id)  # in its grace: it ends now, its work with it
            assert ended is not None and ended.revoked and ended.successor == ""
            rotated = await store.rotate(old_key.id, grace_s=0)
            assert rotated is not None
            new, new_key = rotated
            ended = await store.get(old_key.id)
            assert ended is not None and ended.revoked and ended.successor == new_key.id
            rotated_again = await store.rotate(second_key.id, grace_s=0)
            assert rotated_again is not None
            await store.revoke(rotated_again[1].id)
            runner = BatchRunner(service, gw.app.state.batches, owner="a")
            await runner.tick()
            holder = base.with_options(api_key=new)
            done = await _settled(holder, goes_on.id)
            assert done.status == "completed" and done.request_counts is not None
            assert (done.request_counts.completed, done.request_counts.failed) == (2, 0)
            output = await _lines(holder, done.output_file_id)
            assert sorted(line["custom_id"] for line in output) == ["r0", "r1"]
            assert all(line["response"]["status_code"] == 200 for line in output)
            usage = await service.broker.redis.hgetall(gw.keys.usage("acme", day_of(time.time())))
            assert new_key.lineage == old_key.id
            assert usage.get(f"{old_key.id}:completed") == "2"
            assert f"{new_key.id}:completed" not in usage

            for batch in (stops, revoked):
                failed = await _settled(holder, batch.id)
                assert failed.status == "completed" and failed.request_counts is not None
                assert (failed.request_counts.completed, failed.request_counts.failed) == (0, 1)
                (line,) = await _lines(holder, failed.error_file_id)
                assert line["custom_id"] == "x" and line["response"]["status_code"] == 401
                assert line["response"]["body"]["error"]["code"] == "invalid_api_key"
            await runner.stop()


async def test_files_larger_than_a_part_are_stored_and_read_whole(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file is kept in parts (no Redis value past CHUNK; each part cut between characters, read
    back as text): an input over several parts runs whole, an output over several is read whole."""
    monkeypatch.setattr(batch_store, "CHUNK", 300)
    rows = [_chat(f"p{i}", f"part \u00e9\u20ac\U0001f600 {i}", seed=i, max_tokens=6) for i in range(12)]
    file_id = await _upload(client, rows)
    assert (await client.files.content(file_id)).content == _jsonl(rows)
    batch = await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await _settled(client, batch.id)
    output = await _lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == [f"p{i}" for i in range(12)]
    assert (await client.files.retrieve(done.output_file_id)).bytes > 3 * 300


async def test_a_file_deleted_while_it_is_downloaded_is_sent_whole_and_gone_for_the_rest(
    gw: InProc, client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download's first part is out when the file is deleted: the rest of its parts still come
    (its Content-Length holds); lookups, lists and a new download see it gone. Its bytes count
    against the tenant's quota until they are gone (Redis never holds more than the quota), without
    shortening the hold of an upload being written. Deleted with no download under way, a file's
    bytes go at once and make room at once."""
    monkeypatch.setattr(batch_store, "CHUNK", 300)
    rows = [_chat(f"d{i}", f"deleted while read {i}", seed=i, max_tokens=6) for i in range(12)]
    unread = await _upload(client, rows[:2])
    file_id = await _upload(client, rows)
    store, redis = gw.app.state.batches, gw.app.state.service.broker.redis
    assert (await client.files.delete(unread)).deleted
    assert await redis.exists(gw.keys.file(unread)) == 0
    assert await store.hold_quota("anonymous", "writing", 10, 1 << 40) == (True, len(_jsonl(rows)))
    await store.begin_read(file_id)  # as the download route does before it looks the file up
    parts = store.file_parts(file_id, reading=True)
    got = [await anext(parts)]
    assert (await client.files.delete(file_id)).deleted
    got += [part async for part in parts]
    assert b"".join(got) == _jsonl(rows) and len(got) > 3
    for call in (client.files.retrieve(file_id), client.files.content(file_id), client.files.delete(file_id)):
        with pytest.raises(openai.NotFoundError):
            await call
    assert file_id not in [f.id for f in (await client.files.list()).data]
    assert await store.stored_bytes("anonymous") == 0
    assert 0 < await redis.ttl(gw.keys.file(file_id)) <= batch_store.DELETED_KEEP_S  # the bytes go soon
    fits, taken = await store.hold_quota("anonymous", "probe", 1, 1 << 40)
    assert fits and taken == len(_jsonl(rows)) + 10  # the deleted bytes and the upload being written
    assert await redis.ttl(gw.keys.files_held("anonymous")) > batch_store.DELETED_KEEP_S
    assert await redis.exists(gw.keys.file_readers(file_id)) == 0  # the download ended: no count left
    assert not await store.keep_file(file_id, 86_400)  # a batch created meanwhile cannot keep it
    assert 0 < await redis.ttl(gw.keys.file(file_id)) <= batch_store.DELETED_KEEP_S
    await store.begin_read(unread)  # a count that lapses during a slow download ...
    await redis.delete(gw.keys.file_readers(unread))
    await store.end_read(unread)  # ... is not made negative (it would hide the next download)
    assert await redis.exists(gw.keys.file_readers(unread)) == 0


async def test_a_batch_bigger_than_its_lane_waits_its_turn(redis_server: RedisServer, prefix: str) -> None:
    """Its lines meet a full queue (429 queue_full: one queued job per lane here): they are sent
    again after the Retry-After, none fails for it."""
    async with inproc_gateway(redis_server.url, prefix, lane_max_queued=1, batch_concurrency=4) as gw:
        await gw.add_worker(SimEngine(SimOptions(decode_base_ms=5, decode_per_seq_ms=0, capacity=1)))
        rows = [_chat(f"w{i}", f"wait {i}", seed=i, max_tokens=5) for i in range(4)]
        async with gw.sdk() as client:
            batch = await _create(client, rows)
            done = await _settled(client, batch.id, timeout_s=90)
            rejected = gw.app.state.service.metrics.rejections.labels("sim", "queue_full")._value.get()
    assert rejected > 0  # the queue was full for some of them
    assert (
        done.status == "completed" and done.request_counts.completed == 4 and done.request_counts.failed == 0
    )


async def test_a_tenants_files_have_a_quota(redis_server: RedisServer, prefix: str) -> None:
    """Uploads past ``files_quota_bytes`` in all are a 413 naming the quota; deleting makes room."""
    async with inproc_gateway(redis_server.url, prefix, files_quota_bytes=2048) as gw, gw.sdk() as client:
        first = await client.files.create(file=("a.jsonl", io.BytesIO(b"x" * 1500)), purpose="batch")
        with pytest.raises(openai.APIStatusError) as info:
            await client.files.create(file=("b.jsonl", io.BytesIO(b"y" * 1000)), purpose="batch")
        assert info.value.status_code == 413
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "storage_limit_exceeded"
        await client.files.delete(first.id)
        second = await client.files.create(file=("b.jsonl", io.BytesIO(b"y" * 1000)), purpose="batch")
        assert second.bytes == 1000


async def test_two_uploads_at_once_cannot_both_pass_the_quota(redis_server: RedisServer, prefix: str) -> None:
    """Each would fit alone; together they would not: one is stored, the other is a 413, and the
    quota held for the upload is given back (a later upload that fits is stored)."""
    async with inproc_gateway(redis_server.url, prefix, files_quota_bytes=2048) as gw, gw.sdk() as client:

        async def upload(name: str) -> Any:
            return await client.files.create(file=(name, io.BytesIO(b"z" * 1500)), purpose="batch")

        results = await asyncio.gather(upload("a.jsonl"), upload("b.jsonl"), return_exceptions=True)
        refused = [r for r in results if isinstance(r, openai.APIStatusError)]
        assert len(refused) == 1 and refused[0].status_code == 413, results
        stored = await client.files.list()
        assert [f.bytes for f in stored.data] == [1500]
        later = await client.files.create(file=("c.jsonl", io.BytesIO(b"c" * 500)), purpose="batch")
        assert later.bytes == 500
        held = await gw.app.state.batches.redis.zcard(f"{prefix}:files-held:{{anonymous}}")
        assert held == 0  # every hold given back


async def test_a_hold_never_given_back_lapses_while_other_uploads_come_and_go(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload whose gateway died mid-write never gives its hold back: it lapses on its own (here
    after 2 s), however many uploads take and give theirs meanwhile."""
    monkeypatch.setattr(batch_store, "PENDING_TTL_S", 2)
    async with inproc_gateway(redis_server.url, prefix, files_quota_bytes=2048) as gw, gw.sdk() as client:
        store = gw.app.state.batches
        assert (await store.hold_quota("anonymous", "file-dead", 1500, 2048))[0]
        refused, deadline = 0, time.monotonic() + 15
        while True:
            try:
                stored = await client.files.create(file=("b.jsonl", io.BytesIO(b"y" * 1000)), purpose="batch")
                break
            except openai.APIStatusError as exc:
                assert exc.status_code == 413
                refused += 1
            assert time.monotonic() < deadline, "the dead upload's hold never lapsed"
            await asyncio.sleep(0.2)
        assert refused >= 3 and stored.bytes == 1000  # refused while the dead hold lasted


async def test_an_upload_cut_short_by_its_client_is_a_400_and_keeps_nothing(
    gw: InProc, caplog: pytest.LogCaptureFixture
) -> None:
    """The client sends half of a multipart body and disconnects: a 400 (not a logged 500), no file."""
    boundary = "bwtestboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode() + b'{"custom_id": "a"}\n' * 100
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": head, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"", "root_path": "",
        "headers": [
            (b"host", b"gw"), (b"authorization", b"Bearer x"),
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"content-length", str(len(head) * 2).encode()),
        ],
        "client": ("127.0.0.1", 5000), "server": ("gw", 80),
    }  # fmt: skip
    with caplog.at_level("ERROR"):
        await gw.app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 400 and orjson.loads(body)["error"]["code"] == "client_disconnected"
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    async with gw.sdk() as client:
        assert (await client.files.list()).data == []


def test_a_run_never_drops_a_line_its_create_accepted() -> None:
    """The schema check is the create's alone: a run (on a gateway of another version, which may
    judge a schema otherwise) kept only the lines it accepted and the batch completed without the
    others in either file."""
    row = _chat(
        "bounded",
        "x",
        1,
        3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": {"type": "integer", "maximum": 9}},
        },
    )
    data = _jsonl([row])
    assert [line.custom_id for line in parse_input(data, "/v1/chat/completions").lines] == ["bounded"]
    checked = parse_input(data, "/v1/chat/completions", formats=True)
    assert checked.lines == [] and [e.code for e in checked.errors] == ["invalid_response_format"]


def test_an_input_file_saved_with_a_byte_order_mark_reads_as_without_one() -> None:
    """Windows editors save UTF-8 with a BOM: the first line was refused as invalid JSON."""
    data = _jsonl([_chat("first", "x", 1, 3), _chat("second", "y", 2, 3)])
    parsed = parse_input(b"\xef\xbb\xbf" + data, "/v1/chat/completions")
    assert parsed.errors == [] and [line.custom_id for line in parsed.lines] == ["first", "second"]
    assert parse_input(b"\xef\xbb\xbf", "/v1/chat/completions").errors[0].code == "empty_file"
