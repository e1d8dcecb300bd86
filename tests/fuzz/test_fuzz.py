"""Fuzzing: schemathesis against the gateway's OpenAPI schema, hand-made hostile bodies, and hostile
WebSocket traffic.

Whatever arrives, the gateway answers with a 4xx and an OpenAI error body (never a 5xx, never a
``server_error`` in a stream), keeps serving, and leaves no half-written request in Redis: every
request record it created is whole and its job is queued. The tests share one stack and the last one
checks Redis after all the others: run the module, not one test of it. The stack's gateway also
declares a model no worker serves (``idle``), whose requests stay queued: they make the WebSocket
tests deterministic (in flight until cancelled).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from openai import OpenAI
from redis.asyncio import Redis
from schemathesis import Case, GenerationMode
from schemathesis.core.result import Ok
from schemathesis.schemas import APIOperation
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from breakwater.keys import LANES, Keys
from breakwater.protocol.openai import ChatCompletionRequest, CompletionRequest
from breakwater.redis_server import RedisServer
from tests.fuzz.oracle import FuzzLog, aimed_at_served_model
from tests.fuzz.wire import (
    CHAT,
    COMPLETION_PATHS,
    COMPLETIONS,
    SERVED,
    assert_openai_error,
    request_body,
)
from tests.fuzz.ws_client import Ledger, complete, receive, receive_until, send
from tests.helpers import StackProcs, one_gateway_one_worker

pytestmark = pytest.mark.timeout(300)

IDLE = "idle"  # declared on the gateway, served by no worker: its requests stay queued until cancelled
PER_SOCKET_LIMIT = 64  # requests followed at once on one WebSocket
COMPLETION_EXAMPLES = 100  # per generation mode, for each of the two completion endpoints
OTHER_EXAMPLES = 10  # per generation mode, for each other operation
HTTP_TIMEOUT_S = 20
HEALTH_BOUND_S = 1.0
JSON = {"content-type": "application/json"}

Operation = APIOperation[Any, Any, Any, Any]
KNOWN_MEMBERS = {
    CHAT: frozenset(ChatCompletionRequest.model_fields),
    COMPLETIONS: frozenset(CompletionRequest.model_fields),
}


@pytest.fixture(scope="module")
def fuzz_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    gateway = {"models": IDLE}
    with one_gateway_one_worker(
        redis_server.url, "f", log_dir, gateway, sim_decode_base_ms=0, heartbeat_s=0.5
    ) as procs:
        yield procs


@pytest.fixture(scope="module")
def url(fuzz_stack: StackProcs) -> str:
    return fuzz_stack.gateways[0][1]


@pytest.fixture(scope="module")
def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/ws"


@pytest.fixture(scope="module")
def created_rids() -> set[str]:
    """Ids of the requests the tests of this module saw admitted (checked in Redis at the end)."""
    return set()


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{url}/v1", api_key="fuzz", max_retries=0, timeout=HTTP_TIMEOUT_S) as openai:
        yield openai


def assert_still_serves(client: OpenAI) -> str:
    """The gateway serves an ordinary chat completion (through the official client); its id."""
    resp = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "Still there?"}], max_tokens=4, seed=7
    )
    assert resp.choices[0].message.content and resp.choices[0].finish_reason == "length", resp
    assert resp.usage is not None and resp.usage.completion_tokens == 4
    return resp.id


# -- schemathesis ---------------------------------------------------------------------------------


def fuzz_operation(operation: Operation, mode: GenerationMode, url: str, log: FuzzLog) -> None:
    """Call ``operation`` with generated cases of ``mode``; ``log`` judges every response."""
    completion = operation.path in COMPLETION_PATHS
    known = KNOWN_MEMBERS.get(operation.path) if mode is GenerationMode.POSITIVE else None

    @given(case=operation.as_strategy(generation_mode=mode), streamed=st.booleans())
    @settings(
        max_examples=COMPLETION_EXAMPLES if completion else OTHER_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],  # failures are logged, not shrunk
    )
    def call(case: Case[Any], streamed: bool) -> None:
        if completion:
            case.body = aimed_at_served_model(case.body, known)
            if known is not None and isinstance(case.body, dict):
                # Generated bodies rarely have the optional `stream`: half of them stream.
                case.body.setdefault("stream", streamed)
        log.sent(case)
        try:
            response = case.call(base_url=url, timeout=HTTP_TIMEOUT_S)
        except OSError as exc:  # requests' errors are OSErrors: the response broke off or never came
            log.fail(case, f"no whole response: {exc!r}")
            return
        log.judge(case, response)

    try:
        call()
    except Unsatisfiable:
        # Nothing of the operation can be made invalid (no body, no constrained parameter).
        assert mode is GenerationMode.NEGATIVE, operation.label
        log.nothing_to_negate.append(operation.label)


def test_no_input_makes_a_5xx(url: str, created_rids: set[str], client: OpenAI) -> None:
    """Positive and negative cases for every operation; the completion endpoints get the served
    model, so their cases reach admission, Redis and the worker, and every event stream is read."""
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    # read every stream to its end: up to n=16 choices of at most 64 tokens each (aimed_at_served_model)
    api.config.max_stream_events = 4000
    operations: list[Operation] = []
    for result in api.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    assert {CHAT, COMPLETIONS} <= {op.path for op in operations} and len(operations) >= 8
    log = FuzzLog()
    for mode in GenerationMode:
        for operation in operations:
            fuzz_operation(operation, mode, url, log)
    created_rids.update(log.rids)
    assert not {f"POST {path}" for path in COMPLETION_PATHS} & set(log.nothing_to_negate)
    if log.failures:
        pytest.fail(f"{len(log.failures)} failures:\n" + "\n".join(log.failures[:15]))
    admitted = Counter({label: n for (label, status), n in log.statuses.items() if status == 200})
    # Not vacuous: generated requests were admitted, generated and streamed on both endpoints.
    assert all(admitted[f"POST {path}"] >= 5 for path in COMPLETION_PATHS), log.statuses
    assert log.streams >= 3, log.statuses
    assert any(400 <= status < 500 for _, status in log.statuses), log.statuses
    assert_still_serves(client)


# -- hand-made bodies -----------------------------------------------------------------------------

# (id, raw JSON of the prompt / message content or None, raw members added to a valid body, the
# field the 400 must name or None). Values no JSON library writes: non-standard JSON is a 400.
RAW_CASES: list[tuple[str, bytes | None, dict[str, bytes], str | None]] = [
    ("timeout-Infinity", None, {"timeout": b"Infinity"}, None),
    ("timeout--Infinity", None, {"timeout": b"-Infinity"}, None),
    ("timeout-NaN", None, {"timeout": b"NaN"}, None),
    ("temperature-NaN", None, {"temperature": b"NaN"}, None),
    ("timeout-1e16", None, {"timeout": b"1e16"}, "timeout"),
    ("timeout-over-a-day", None, {"timeout": b"86401"}, "timeout"),
    ("timeout-1e400", None, {"timeout": b"1e400"}, None),
    ("max_tokens-1e400", None, {"max_tokens": b"1e400"}, None),
    ("lone-high-surrogate", rb'"\ud800"', {}, None),
    ("lone-low-surrogate", rb'"\udc00"', {}, None),
    ("invalid-utf8", b'"a\xff\xfeb"', {}, None),
    ("stop-100k-chars", None, {"stop": b'["' + b"s" * 100_000 + b'"]'}, None),
]


@pytest.mark.parametrize("path", COMPLETION_PATHS)
@pytest.mark.parametrize(
    ("text", "members", "names"), [pytest.param(*case[1:], id=case[0]) for case in RAW_CASES]
)
def test_hostile_values_are_a_400(
    url: str, client: OpenAI, path: str, text: bytes | None, members: dict[str, bytes], names: str | None
) -> None:
    """A 400 with an OpenAI error body (naming the field where one is given), then business as usual."""
    body = request_body(path, text, **members) if text is not None else request_body(path, **members)
    resp = httpx.post(f"{url}{path}", content=body, headers=JSON, timeout=HTTP_TIMEOUT_S)
    assert_openai_error(resp, 400, names=names)
    assert_still_serves(client)


def test_more_than_4096_messages_is_a_400(url: str, client: OpenAI) -> None:
    """4097 one-letter messages (~130 kB, under the body limit): a 400 naming ``messages``."""
    messages = b"[" + b", ".join([b'{"role": "user", "content": "x"}'] * 4097) + b"]"
    resp = httpx.post(f"{url}{CHAT}", content=request_body(CHAT, messages=messages), headers=JSON)
    assert_openai_error(resp, 400, names="messages")
    assert_still_serves(client)


def lost_answer(exc: httpx.TransportError) -> AssertionError:
    # A server that answers before reading the body and then closes makes the client's kernel reset
    # the connection while the upload is under way, and the answer is lost with it.
    return AssertionError(f"no response reached the client while it sent the body: {exc!r}")


@pytest.mark.parametrize("path", COMPLETION_PATHS)
def test_a_50_mb_body_is_a_413(url: str, client: OpenAI, path: str) -> None:
    """Valid JSON (one giant prompt) far over ``max_body_bytes`` (4 MiB): refused before parsing."""
    body = request_body(path, b'"' + b"a" * (50 << 20) + b'"')
    try:
        resp = httpx.post(f"{url}{path}", content=body, headers=JSON, timeout=HTTP_TIMEOUT_S)
    except httpx.TransportError as exc:
        raise lost_answer(exc) from exc
    assert_openai_error(resp, 413, code="request_too_large")
    assert_still_serves(client)


@pytest.mark.parametrize("path", COMPLETION_PATHS)
async def test_200k_tiny_messages_are_refused_while_health_answers(
    url: str, client: OpenAI, path: str
) -> None:
    """~6 MB of tiny messages: a 413 (or 400), while /healthz, probed concurrently on its own
    connection, answers each probe within a second (the event loop is never blocked parsing it)."""
    messages = b"[" + b",".join([b'{"role":"user","content":"x"}'] * 200_000) + b"]"
    body = request_body(path, messages=messages)
    late_probes: list[str] = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT_S) as poster,
        httpx.AsyncClient(base_url=url, timeout=HEALTH_BOUND_S) as prober,
    ):

        async def probe() -> None:
            try:
                assert (await prober.get("/healthz")).status_code == 200
            except httpx.TimeoutException:
                late_probes.append(f"/healthz took over {HEALTH_BOUND_S}s")

        await probe()  # the prober's connection is open before the big body goes out
        post = asyncio.create_task(poster.post(path, content=body, headers=JSON))
        while not post.done():
            await probe()
        await probe()  # and right after
        try:
            resp = await post
        except httpx.TransportError as exc:
            raise lost_answer(exc) from exc
    assert resp.status_code in (413, 400), (resp.status_code, resp.text[:300])
    assert_openai_error(resp, resp.status_code)
    assert not late_probes, late_probes
    assert_still_serves(client)


def test_a_huge_last_event_id_is_a_400(url: str, client: OpenAI) -> None:
    """A Last-Event-ID past any sequence number is refused up front, not a failure mid-stream."""
    rid = assert_still_serves(client)
    resp = httpx.get(
        f"{url}/v1/requests/{rid}/events",
        headers={"Last-Event-ID": "99999999999999999999999"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert_openai_error(resp, 400)
    assert_still_serves(client)


# -- WebSocket ------------------------------------------------------------------------------------

MALFORMED = [
    "not json",
    "[1, 2, 3]",
    '"a string"',
    "{}",
    '{"model": 5}',
    '{"model": "sim", "messages": "hi"}',
    '{"model": "sim", "messages": [{"role": "wizard", "content": "x"}]}',
    '{"model": "sim", "prompt": "x", "max_tokens": -1}',
    '{"model": "sim", "prompt": "x", "n": 17}',
    '{"model": "sim", "prompt": "x", "max_tokens": NaN}',
    '{"model": "sim", "prompt": "x", "timeout": Infinity}',
    '{"model": "sim", "prompt": "x", "timeout": 1e16}',
    '{"model": "sim", "prompt": "x", "max_tokens": 1e400}',
    '{"model": "sim", "prompt": "\\ud800"}',  # the JSON escape of a lone surrogate
    '{"model": "sim", "messages": [{"role": "user", "content": "\\udc00"}]}',
    '{"resume": "\\ud800"}',
    '{"resume": "nope", "after": "x"}',
    '{"resume": "cmpl-missing", "after": 0}',
    '{"resume": "cmpl-missing", "after": 99999999999999999999999}',
    '{"cancel": "cmpl-missing"}',
    "{" * 10_000,
]


async def test_malformed_websocket_frames_get_errors_and_the_socket_stays_open(ws_url: str) -> None:
    """Each frame gets an error message with a 4xx status, and the socket then serves a request."""
    async with connect(ws_url, max_size=None) as ws:
        for frame in MALFORMED:
            await ws.send(frame)
            reply = await receive(ws)
            assert reply["type"] == "error", (frame[:60], reply)
            assert 400 <= reply["status"] < 500, (frame[:60], reply)
        await ws.send(b"\x00\x01binary")
        assert (await receive(ws))["type"] == "error"
        await complete(ws, "still here")  # still serving on the same socket


@pytest.mark.parametrize(
    ("frame", "close_code"),
    [
        pytest.param("x" * (2 << 20), 1009, id="2-MiB-text-frame"),
        pytest.param(b'{"model": "sim", "prompt": "\xff\xfe"}', 1007, id="invalid-utf8-text-frame"),
    ],
)
async def test_a_frame_the_server_cannot_take_closes_only_that_socket(
    ws_url: str, frame: str | bytes, close_code: int
) -> None:
    """The socket is closed with ``close_code`` (or answered with an error); the gateway keeps
    serving a socket opened before and one opened after."""
    async with connect(ws_url, max_size=None) as bystander:
        async with connect(ws_url, max_size=None) as ws:
            try:
                await ws.send(frame, text=True)
                reply = await receive(ws)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == close_code, closed
            else:
                assert reply["type"] == "error" and 400 <= reply["status"] < 500, reply
        await complete(bystander, "bystander")
    async with connect(ws_url) as fresh:
        await complete(fresh, "fresh socket")


async def test_a_hundred_requests_on_one_socket_are_served_or_refused(
    ws_url: str, created_rids: set[str]
) -> None:
    """Fired without waiting: each is created and ends with exactly one ``done``, or is refused with
    429 ``too_many_requests``; the client never sees more than the per-socket limit in flight."""
    async with connect(ws_url) as ws:
        for i in range(100):
            await send(ws, {"model": SERVED, "prompt": f"burst {i}", "max_tokens": 4, "seed": i})
        ledger = Ledger()
        await receive_until(ws, ledger, lambda led: led.answered == 100 and led.in_flight == 0, 90)
    created_rids.update(ledger.created)
    assert_refused_for_the_limit(ledger)
    assert set(ledger.terminals) == set(ledger.created)
    for rid, ends in ledger.terminals.items():
        assert [m["type"] for m in ends] == ["done"], (rid, ends)
    assert ledger.max_in_flight <= PER_SOCKET_LIMIT


def assert_refused_for_the_limit(ledger: Ledger) -> None:
    for refusal in ledger.refusals:
        assert refusal["status"] == 429 and refusal["error"]["code"] == "too_many_requests", refusal


async def until_admitted(ws: ClientConnection, body: dict[str, Any], timeout_s: float = 10) -> str:
    """Send ``body`` until it is created (a socket's count may lag its last terminal event a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        await send(ws, body)
        reply = await receive(ws)
        if reply["type"] == "created":
            return str(reply["request_id"])
        assert reply["type"] == "error" and reply["error"]["code"] == "too_many_requests", reply
        assert time.monotonic() < deadline, "the socket never admitted again"
        await asyncio.sleep(0.05)


async def test_the_per_socket_limit_refuses_the_rest_until_requests_end(
    ws_url: str, created_rids: set[str]
) -> None:
    """100 requests that stay queued (no worker serves ``idle``): exactly the first 64 are created
    and the other 36 refused with 429; cancelling them ends each with exactly one terminal event
    (``cancelled``), and then the socket admits again."""
    async with connect(ws_url) as ws:
        for i in range(100):
            await send(ws, {"model": IDLE, "prompt": f"queued {i}", "max_tokens": 4})
        ledger = Ledger()
        await receive_until(ws, ledger, lambda led: led.answered == 100)
        created_rids.update(ledger.created)
        assert (len(ledger.created), len(ledger.refusals)) == (PER_SOCKET_LIMIT, 100 - PER_SOCKET_LIMIT)
        assert_refused_for_the_limit(ledger)
        for rid in ledger.created:
            await send(ws, {"cancel": rid})
        await receive_until(ws, ledger, lambda led: led.in_flight == 0)
        for rid, ends in ledger.terminals.items():
            assert [m["error"]["code"] for m in ends] == ["cancelled"], (rid, ends)
        rid = await until_admitted(ws, {"model": SERVED, "prompt": "after the limit", "max_tokens": 3})
        await receive_until(ws, ledger, lambda led: led.ended(rid))
        assert [m["type"] for m in ledger.terminals[rid]] == ["done"]


async def test_a_second_resume_of_the_same_request_does_not_orphan_the_first(
    ws_url: str, created_rids: set[str]
) -> None:
    """A request that stays queued, followed by its submission and resumed twice on the same
    socket, then cancelled: the socket gets exactly one terminal event for it (the followers do not
    pile up), and nothing more for it by the time a later request has been served start to end."""
    async with connect(ws_url) as ws:
        await send(ws, {"model": IDLE, "prompt": "resumed twice", "max_tokens": 4})
        created = await receive(ws)
        assert created["type"] == "created", created
        rid = created["request_id"]
        created_rids.add(rid)
        await send(ws, {"resume": rid})
        await send(ws, {"resume": rid, "after": 0})
        await send(ws, {"cancel": rid})
        ledger = Ledger(created=[rid])
        seen = await receive_until(ws, ledger, lambda led: led.ended(rid), 10)
        _, later = await complete(ws, "after the resumes")
    for message in seen + later:
        assert message.get("request_id") != rid or message["type"] == "error", message
    ends = [m for m in seen + later if m.get("request_id") == rid]
    assert [m["error"]["code"] for m in ends] == ["cancelled"], ends


# -- Redis ----------------------------------------------------------------------------------------


async def test_nothing_half_written(fuzz_stack: StackProcs, redis: Redis, created_rids: set[str]) -> None:
    """After the tests above, every request record is whole, every queued request (waiting on its
    tenant's list, or bound to a worker's entry) has its record, and the lane's stream holds exactly
    one entry per queued request, and one per request that ended while it waited (cancelled, or
    past its deadline: the lane's ``dead``, until a worker reads them); the requests the tests saw
    admitted are among them (so the check is not vacuous; for an ``n > 1`` request, its first
    choice)."""
    keys = Keys(fuzz_stack.prefix)
    records = {k async for k in redis.scan_iter(match=keys.request("*"), count=1000)}
    assert created_rids, "no test saw a request admitted"
    # An n > 1 request has no record of its own: its choices are requests <rid>-0 .. <rid>-<n-1>.
    seen = {keys.request(rid if keys.request(rid) in records else f"{rid}-0") for rid in created_rids}
    assert seen <= records
    for key in records:
        record = await redis.hgetall(key)
        assert {"model", "lane", "status", "created", "created_ms"} <= set(record), (key, record)
    for model in (SERVED, IDLE):
        for lane in LANES:
            queued: list[str] = []
            async for waiting in redis.scan_iter(match=keys.waiting_prefix(model, lane) + "*", count=1000):
                items: Any = await redis.lrange(waiting, 0, -1)
                queued += [str(item).split("\t")[0] for item in items]
            bound: Any = await redis.hvals(keys.bound(model, lane))
            queued += [str(item).split("\t")[0] for item in bound]
            assert {keys.request(rid) for rid in queued} <= records, queued
            dead = int(await redis.hget(keys.fair(model, lane), "dead") or 0)
            assert await redis.xlen(keys.jobs(model, lane)) == len(queued) + dead, (model, lane, dead)
    assert httpx.get(f"{fuzz_stack.gateways[0][1]}/readyz").status_code == 200
    assert all(p.alive() for p, _ in fuzz_stack.gateways)
    assert orjson.loads(httpx.get(f"{fuzz_stack.gateways[0][1]}/healthz").content) == {"status": "ok"}
