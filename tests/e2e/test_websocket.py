"""Several requests and a cancel on one WebSocket; a second resume of one id replaces the first."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import websockets

from tests.helpers import StackProcs, expected_sim


async def _until_terminal(
    ws: Any, rids: set[str], timeout_s: float = 30, got: dict[str, list[dict[str, Any]]] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Every message per request id until each of ``rids`` has its done/error event."""
    got = got if got is not None else {}
    for rid in rids:
        got.setdefault(rid, [])
    open_ = {rid for rid in rids if not any(m["type"] in ("done", "error") for m in got[rid])}
    async with asyncio.timeout(timeout_s):
        while open_:
            message = orjson.loads(await ws.recv())
            rid = message.get("request_id")
            if rid in got:
                got[rid].append(message)
                if message["type"] in ("done", "error"):
                    open_.discard(rid)
    return got


async def test_several_requests_and_a_cancel_on_one_socket(stack: StackProcs) -> None:
    url = stack.gateways[0][1].replace("http://", "ws://") + "/v1/ws"
    short = [{"model": "sim", "prompt": f"socket {i}", "max_tokens": 8, "seed": 100 + i} for i in range(3)]
    long = {"model": "sim", "prompt": "cancel me", "max_tokens": 3000, "ignore_eos": True, "seed": 7}
    async with websockets.connect(url) as ws:
        for body in [*short, long]:
            await ws.send(orjson.dumps(body).decode())
        created: list[str] = []
        early: dict[str, list[dict[str, Any]]] = {}  # events of requests created before the last one
        async with asyncio.timeout(30):
            while len(created) < 4:  # "created" arrives per request, in order of submission
                message = orjson.loads(await ws.recv())
                assert message["type"] != "error" or message["request_id"], message
                if message["type"] == "created":
                    created.append(message["request_id"])
                else:
                    early.setdefault(message["request_id"], []).append(message)
        await ws.send(orjson.dumps({"cancel": created[3]}).decode())
        got = await _until_terminal(ws, set(created), got=early)
    for i, rid in enumerate(created[:3]):
        events = got[rid]
        expected, reason, _ = expected_sim(prompt=f"socket {i}", seed=100 + i, max_tokens=8)
        assert "".join(e["text"] for e in events if e["type"] == "token") == expected
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == reason
    cancelled = got[created[3]][-1]
    assert cancelled["type"] == "error" and cancelled["error"]["code"] == "cancelled"
    # As the socket's own errors: the HTTP status and OpenAI's whole error object.
    error = cancelled["error"]
    assert (cancelled["status"], error["type"], error["param"]) == (409, "cancelled", None)


async def test_a_second_resume_of_one_id_replaces_the_first(stack: StackProcs) -> None:
    url = stack.gateways[0][1].replace("http://", "ws://") + "/v1/ws"
    body = {"model": "sim", "prompt": "resume twice", "max_tokens": 40, "seed": 5, "ignore_eos": True}
    async with websockets.connect(url) as ws:
        await ws.send(orjson.dumps(body).decode())
        rid = orjson.loads(await ws.recv())["request_id"]
        await ws.send(orjson.dumps({"resume": rid, "after": 0}).decode())  # same socket, from the top
        got = await _until_terminal(ws, {rid})
    events = got[rid]
    seqs = [e["seq"] for e in events]
    # The first follower was replaced: after the restart from 0 each seq arrives exactly once more.
    restart = max(i for i, s in enumerate(seqs) if s == 1)
    assert seqs[restart:] == list(range(1, len(seqs) - restart + 1))
    expected, _, _ = expected_sim(prompt="resume twice", seed=5, max_tokens=40, ignore_eos=True)
    assert "".join(e["text"] for e in events[restart:] if e["type"] == "token") == expected
    assert sum(e["type"] == "done" for e in events) == 1


async def test_several_choices_are_refused_by_name_and_the_socket_serves_on(stack: StackProcs) -> None:
    """A socket's request is one choice: ``n`` > 1 or a list of prompts is a 400 naming it (the HTTP
    API serves those); a list of one prompt is that prompt. An invalid body is refused as HTTP refuses
    it, naming the field with OpenAI's code."""
    url = stack.gateways[0][1].replace("http://", "ws://") + "/v1/ws"
    refused = [
        ({"model": "sim", "prompt": ["a", "b"], "max_tokens": 4}, "prompt", "unsupported_parameter"),
        ({"model": "sim", "prompt": "a", "n": 2, "max_tokens": 4}, "n", "unsupported_parameter"),
        ({"model": "sim", "prompt": "a", "max_tokens": "4"}, "max_tokens", "invalid_value"),
        (
            {"model": "sim", "messages": [{"role": "tool", "content": "sunny"}]},
            "messages.0.tool_call_id",
            "missing_required_parameter",
        ),
    ]
    async with websockets.connect(url) as ws:
        for body, param, code in refused:
            await ws.send(orjson.dumps(body).decode())
            async with asyncio.timeout(10):
                message = orjson.loads(await ws.recv())
            assert message["type"] == "error", message
            assert (message["error"]["code"], message["error"]["param"]) == (code, param), message
        await ws.send(orjson.dumps({"model": "sim", "prompt": ["one"], "max_tokens": 5, "seed": 2}).decode())
        async with asyncio.timeout(10):
            created = orjson.loads(await ws.recv())
        assert created["type"] == "created", created
        events = (await _until_terminal(ws, {created["request_id"]}))[created["request_id"]]
    text = "".join(e["text"] for e in events if e["type"] == "token")
    assert text == expected_sim(prompt="one", seed=2, max_tokens=5)[0]


async def test_a_cancel_of_an_unknown_id_names_it_cut_short(stack: StackProcs) -> None:
    """The error message echoed the id whole (a 200 KB id, 200 KB back); the socket serves on."""
    url = stack.gateways[0][1].replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url) as ws:
        await ws.send(orjson.dumps({"cancel": "x" * 200_000}).decode())
        async with asyncio.timeout(10):
            message = orjson.loads(await ws.recv())
        assert (message["type"], message["status"], message["error"]["code"]) == (
            "error",
            404,
            "request_not_found",
        )
        assert len(message["error"]["message"]) < 200 and "x" * 128 + "…" in message["error"]["message"]
        await ws.send(orjson.dumps({"model": "sim", "prompt": "on", "max_tokens": 2}).decode())
        async with asyncio.timeout(10):
            assert orjson.loads(await ws.recv())["type"] == "created"


async def test_a_cancel_of_a_request_the_socket_does_not_follow_is_answered(stack: StackProcs) -> None:
    """Another socket's request cancelled here: this socket is told its status after the cancel
    (it heard nothing, so a cancel that worked and one of a request that had ended were alike); the
    socket that follows it gets its last event, ``cancelled``, as before."""
    url = stack.gateways[0][1].replace("http://", "ws://") + "/v1/ws"
    long = {"model": "sim", "prompt": "cancel me elsewhere", "max_tokens": 3000, "ignore_eos": True}
    short = {"model": "sim", "prompt": "ends first", "max_tokens": 2}
    async with websockets.connect(url) as follower, websockets.connect(url) as other:
        await follower.send(orjson.dumps(long).decode())
        await follower.send(orjson.dumps(short).decode())
        async with asyncio.timeout(10):
            running = orjson.loads(await follower.recv())["request_id"]
            ended = ""
            while not ended:
                message = orjson.loads(await follower.recv())
                if message["type"] == "created":
                    ended = message["request_id"]
        await _until_terminal(follower, {ended})
        for rid, status in ((running, "cancelled"), (ended, "done")):
            await other.send(orjson.dumps({"cancel": rid}).decode())
            async with asyncio.timeout(10):
                answer = orjson.loads(await other.recv())
            assert answer == {"type": "cancel", "request_id": rid, "status": status}
        last = (await _until_terminal(follower, {running}))[running][-1]
        assert (last["type"], last["error"]["code"]) == ("error", "cancelled")
