"""Resume: a client that drops mid-stream reattaches (same or another gateway) and gets exactly the rest."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, expected_sim


@pytest.fixture(scope="module")
def slow_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    """Two gateways, one worker at ~20 ms per step so a stream can be cut mid-way (said to write
    Hermes-format tool calls, so `tool_choice: auto` is served: the sim answers in text)."""
    procs = StackProcs(redis_server.url, f"r{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        procs.add_gateway()
        procs.add_worker(sim_decode_base_ms=20, heartbeat_s=0.5, tool_format="hermes")
        procs.wait_workers(url)
        yield procs
    finally:
        procs.stop()


def _read_sse(
    resp: httpx.Response, stop_after: int | None = None
) -> tuple[list[tuple[int, dict[str, Any]]], bool]:
    """(seq, data) pairs and whether [DONE] arrived; stops reading after ``stop_after`` token events."""
    events: list[tuple[int, dict[str, Any]]] = []
    seq = None
    for line in resp.iter_lines():
        if line.startswith("id: "):
            seq = int(line[4:])
        elif line.startswith("data: "):
            if line == "data: [DONE]":
                return events, True
            assert seq is not None
            events.append((seq, orjson.loads(line[6:])))
            if stop_after is not None and len(events) >= stop_after:
                return events, False
    return events, False


def _chunk_text(data: dict[str, Any]) -> str:
    choice = data["choices"][0] if data.get("choices") else {}
    if "delta" in choice:
        return str(choice["delta"].get("content") or "")
    return str(choice.get("text") or "")


@pytest.mark.parametrize("second_gateway", [False, True], ids=["same-gateway", "other-gateway"])
def test_sse_resume_with_last_event_id(slow_stack: StackProcs, second_gateway: bool) -> None:
    first_url = slow_stack.gateways[0][1]
    resume_url = slow_stack.gateways[1 if second_gateway else 0][1]
    messages = [{"role": "user", "content": f"resume test {second_gateway}"}]
    body = {"model": "sim", "messages": messages, "seed": 1234, "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{first_url}/v1/chat/completions", json=body, timeout=30) as resp:
        rid = resp.headers["x-breakwater-request-id"]
        head, done = _read_sse(resp, stop_after=7)
    assert not done
    seqs = [s for s, _ in head]
    assert seqs == list(range(1, 8))
    last = seqs[-1]
    with httpx.stream(
        "GET", f"{resume_url}/v1/requests/{rid}/events", headers={"Last-Event-ID": str(last)}, timeout=30
    ) as resp:
        assert resp.status_code == 200
        tail, done = _read_sse(resp)
    assert done
    tail_seqs = [s for s, _ in tail]
    assert tail_seqs[0] == last + 1
    assert tail_seqs == sorted(set(tail_seqs)), "duplicate or out-of-order seq"
    text = "".join(_chunk_text(d) for _, d in head + tail)
    expected, reason, _ = expected_sim(messages=messages, seed=1234, max_tokens=40)
    assert text == expected
    assert tail[-1][1]["choices"][0]["finish_reason"] == reason


@pytest.mark.parametrize("n", [1, 2])
def test_a_model_choosing_its_tools_resumes_exactly(slow_stack: StackProcs, n: int) -> None:
    """With `tool_choice: auto` the answer is parsed for calls from its start, so a resume replays
    the events through the parser and sends only what follows Last-Event-ID: the two halves make
    the whole answer, once (here all text: the sim writes no calls)."""
    url = slow_stack.gateways[0][1]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": f"auto tools resume {n}"}]
    body = {"model": "sim", "messages": messages, "tools": [tool], "seed": 31, "max_tokens": 30, "n": n}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30
    ) as resp:
        assert resp.status_code == 200
        rid = resp.headers["x-breakwater-request-id"]
        lines = resp.iter_lines()
        head: list[tuple[str, dict[str, Any]]] = []
        eid = ""
        for line in lines:
            if line.startswith("id: "):
                eid = line[4:]
            elif line.startswith("data: {"):
                head.append((eid, orjson.loads(line[6:])))
                if len(head) == 6:
                    break
    with httpx.stream(
        "GET", f"{url}/v1/requests/{rid}/events", headers={"Last-Event-ID": head[-1][0]}, timeout=30
    ) as resp:
        tail = [orjson.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    texts = [""] * n
    for data in [d for _, d in head] + tail:
        for choice in data["choices"]:
            assert "tool_calls" not in choice["delta"]
            texts[choice["index"]] += choice["delta"].get("content") or ""
    # The sim's prompt is what the engine sees: the tools' system message, then the user's.
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    ends = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in tail if c["choices"]}
    assert [ends[i] for i in range(n)] == [c["finish_reason"] for c in whole["choices"]]


def test_resume_with_after_query_and_status(slow_stack: StackProcs) -> None:
    url = slow_stack.gateways[0][1]
    body = {"model": "sim", "prompt": "query resume", "seed": 77, "max_tokens": 10}
    done = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
    rid = done["id"]
    status = httpx.get(f"{url}/v1/requests/{rid}").json()
    assert status["status"] == "done"
    assert status["completion_tokens"] == 10
    assert status["last_seq"] == 11
    with httpx.stream("GET", f"{url}/v1/requests/{rid}/events?after=8", timeout=30) as resp:
        tail, finished = _read_sse(resp)
    assert finished
    assert [s for s, _ in tail] == [9, 10, 11]
    expected, _, _ = expected_sim(prompt="query resume", seed=77, max_tokens=10)
    assert expected.endswith("".join(_chunk_text(d) for _, d in tail))


@pytest.mark.parametrize("second_gateway", [False, True], ids=["same-gateway", "other-gateway"])
async def test_websocket_resume(slow_stack: StackProcs, second_gateway: bool) -> None:
    ws_url = slow_stack.gateways[0][1].replace("http://", "ws://") + "/v1/ws"
    resume_ws = slow_stack.gateways[1 if second_gateway else 0][1].replace("http://", "ws://") + "/v1/ws"
    prompt = f"websocket resume {second_gateway}"
    got: list[dict[str, Any]] = []
    async with websockets.connect(ws_url) as ws:
        await ws.send(orjson.dumps({"model": "sim", "prompt": prompt, "seed": 5, "max_tokens": 30}).decode())
        created = orjson.loads(await ws.recv())
        assert created["type"] == "created"
        rid = created["request_id"]
        while len(got) < 5:
            msg = orjson.loads(await ws.recv())
            assert msg["request_id"] == rid
            got.append(msg)
    last = got[-1]["seq"]
    async with websockets.connect(resume_ws) as ws:
        await ws.send(orjson.dumps({"resume": rid, "after": last}).decode())
        while True:
            msg = orjson.loads(await ws.recv())
            got.append(msg)
            if msg["type"] in ("done", "error"):
                break
    assert [m["seq"] for m in got] == list(range(1, len(got) + 1))
    assert got[-1]["type"] == "done"
    expected, reason, usage = expected_sim(prompt=prompt, seed=5, max_tokens=30)
    assert "".join(m.get("text", "") for m in got) == expected
    assert got[-1]["finish_reason"] == reason
    assert got[-1]["usage"] == usage


async def test_websocket_bad_messages_keep_connection(slow_stack: StackProcs) -> None:
    ws_url = slow_stack.gateways[0][1].replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(ws_url) as ws:
        await ws.send("{not json")
        err = orjson.loads(await ws.recv())
        assert err["type"] == "error" and err["error"]["code"] == "invalid_json"
        await ws.send(orjson.dumps({"model": "sim", "prompt": "x", "n": 3}).decode())
        err = orjson.loads(await ws.recv())  # n > 1 is the HTTP API's
        assert err["type"] == "error" and err["status"] == 400
        assert err["error"]["code"] == "unsupported_parameter" and err["error"]["param"] == "n"
        tool = {"type": "function", "function": {"name": "f"}}
        chat = {"model": "sim", "messages": [{"role": "user", "content": "x"}], "tools": [tool]}
        await ws.send(orjson.dumps(chat).decode())
        err = orjson.loads(await ws.recv())  # the model's own tool calls need HTTP's rendering
        assert (err["status"], err["error"]["param"]) == (400, "tool_choice")
        await ws.send(orjson.dumps({"resume": "cmpl-missing", "after": 0}).decode())
        err = orjson.loads(await ws.recv())
        assert err["type"] == "error" and err["status"] == 404
        await ws.send(b"\x00binary")
        err = orjson.loads(await ws.recv())
        assert err["type"] == "error"
        await ws.send(
            orjson.dumps({"model": "sim", "prompt": "still works", "seed": 2, "max_tokens": 3}).decode()
        )
        msgs = [orjson.loads(await ws.recv()) for _ in range(5)]
    assert [m["type"] for m in msgs] == ["created", "token", "token", "token", "done"]


@pytest.mark.parametrize("position", ["last", "beyond"])
def test_a_resume_after_the_last_event_gets_done_at_once(slow_stack: StackProcs, position: str) -> None:
    """A client that had every event but lost [DONE] (a dropped connection, a gateway's drain)
    resumes from its last event: it waited for the request's record to expire (an hour), with
    nothing sent; now it gets [DONE] and the stream ends."""
    url = slow_stack.gateways[1][1]
    body = {"model": "sim", "prompt": "resumed at its end", "max_tokens": 4, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
        rid = resp.headers["x-breakwater-request-id"]
        events, finished = _read_sse(resp)
    assert finished and events[-1][1]["usage"]["completion_tokens"] == 4
    last = events[-1][0]
    after = last if position == "last" else last + 100
    with httpx.stream(
        "GET", f"{url}/v1/requests/{rid}/events", headers={"Last-Event-ID": str(after)}, timeout=10
    ) as resp:
        assert resp.status_code == 200
        assert resp.read() == b"data: [DONE]\n\n"


async def test_a_websocket_resume_after_the_last_event_says_the_request_ended(slow_stack: StackProcs) -> None:
    ws_url = slow_stack.gateways[0][1].replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(ws_url) as ws:
        await ws.send(orjson.dumps({"model": "sim", "prompt": "ended on a socket", "max_tokens": 3}).decode())
        messages = [orjson.loads(await ws.recv()) for _ in range(5)]  # created, 3 tokens, done
        assert [m["type"] for m in messages] == ["created", "token", "token", "token", "done"]
        rid, last = messages[-1]["request_id"], messages[-1]["seq"]
        await ws.send(orjson.dumps({"resume": rid, "after": last}).decode())
        async with asyncio.timeout(10):
            ended = orjson.loads(await ws.recv())
        assert ended["type"] == "error" and ended["request_id"] == rid
        assert ended["error"]["code"] == "request_finished"
        await ws.send(orjson.dumps({"resume": rid, "after": last - 1}).decode())  # the rest: its done
        async with asyncio.timeout(10):
            assert orjson.loads(await ws.recv()) == messages[-1]


def test_a_resume_after_a_cancelled_requests_last_event_ends_without_done(slow_stack: StackProcs) -> None:
    """It ended with an error, which the client had: the resume ends at once, with no [DONE] the
    stream never sent."""
    url = slow_stack.gateways[0][1]
    body = {"model": "sim", "prompt": "cancelled, then resumed", "max_tokens": 500, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as resp:
        rid = resp.headers["x-breakwater-request-id"]
        _read_sse(resp, stop_after=2)
    assert httpx.delete(f"{url}/v1/requests/{rid}", timeout=10).status_code == 200
    last = httpx.get(f"{url}/v1/requests/{rid}", timeout=10).json()["last_seq"]
    with httpx.stream(
        "GET", f"{url}/v1/requests/{rid}/events", headers={"Last-Event-ID": str(last - 1)}, timeout=10
    ) as resp:
        events, finished = _read_sse(resp)
    assert not finished and [s for s, _ in events] == [last] and "error" in events[0][1]
    with httpx.stream(
        "GET", f"{url}/v1/requests/{rid}/events", headers={"Last-Event-ID": str(last)}, timeout=10
    ) as resp:
        assert resp.status_code == 200 and resp.read() == b""
