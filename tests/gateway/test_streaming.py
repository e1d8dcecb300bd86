"""The SSE response's own mechanics, driven as an ASGI server would drive it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest

from breakwater.gateway.choices import choice_rid
from breakwater.gateway.streaming import LastChunk, SSEResponse
from tests.helpers import async_wait_for
from tests.inproc import InProc


async def _forever() -> AsyncIterator[bytes]:
    yield b"data: first\n\n"
    await asyncio.Event().wait()
    yield b"never"


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _leaves_after(body: bytes) -> tuple[list[MutableMapping[str, Any]], Receive, Send]:
    """A client that disconnects once it has been sent ``body``: what it was sent, and its ASGI pair."""
    sent: list[MutableMapping[str, Any]] = []
    left = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        if message.get("body") == body:
            left.set()

    return sent, receive, send


async def test_a_client_that_leaves_ends_the_stream_quietly() -> None:
    sent, receive, send = _leaves_after(b"data: first\n\n")
    events = _forever()
    await asyncio.wait_for(SSEResponse(events, {})({"type": "http"}, receive, send), 5)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_a_shutdown_during_a_disconnect_is_not_swallowed() -> None:
    """The server cancels the response (shutdown) just as the client leaves: the cancellation must
    still reach the server, not be taken for the disconnect's own."""
    left = asyncio.Event()
    first = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message.get("body") == b"data: first\n\n":
            first.set()

    response = asyncio.create_task(SSEResponse(_forever(), {})({"type": "http"}, receive, send))
    await first.wait()
    left.set()
    await asyncio.sleep(0)  # the disconnect listener runs and cancels the response...
    response.cancel()  # ...and the server cancels it too, before it runs again
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(response, 5)


async def test_a_client_that_leaves_ends_the_stream_even_if_its_cancellation_is_lost() -> None:
    """Python 3.11's ``asyncio.wait_for`` inside a Redis call can drop the disconnect's cancellation
    (see ``breakwater.stopping``): the stream still ends at its next event, its events closed (the
    request is detached then), instead of following the generation to its end for nobody."""
    sent, receive, send = _leaves_after(b"data: 0\n\n")
    yielded, closed = [0], asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            for i in range(500):
                # A cancellation here is dropped, as wait_for drops one whose result is there too.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.002)
                yielded[0] += 1
                yield f"data: {i}\n\n".encode()
        finally:
            closed.set()

    await asyncio.wait_for(SSEResponse(events(), {})({"type": "http"}, receive, send), 5)
    assert closed.is_set()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert yielded[0] <= 3  # the first, and the one it was waiting for (or one more) when it left


async def test_a_failing_receive_does_not_break_the_stream() -> None:
    """``receive`` raising (a middleware refusing the request body) leaves the stream to finish and
    its events closed, instead of raising at its end."""
    closed = asyncio.Event()
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        raise RuntimeError("body too large")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def events() -> AsyncIterator[bytes]:
        try:
            await asyncio.sleep(0.01)  # the listener has failed by now
            yield b"data: only\n\n"
        finally:
            closed.set()

    await asyncio.wait_for(SSEResponse(events(), {})({"type": "http"}, receive, send), 5)
    assert [m.get("body") for m in sent[1:]] == [b"data: only\n\n", b""] and closed.is_set()


@contextlib.contextmanager
def _finalized_by_the_loop() -> Any:
    """The breakwater async generators the event loop's finalizer hook is left to close (each costs
    a thread-safe wake-up of the loop and a task of its own), for generators first run inside."""
    hooks = sys.get_asyncgen_hooks()
    left: list[str] = []

    def finalizer(agen: Any) -> None:
        code = agen.ag_code
        if "breakwater" in code.co_filename:
            left.append(code.co_qualname)
        if hooks.finalizer is not None:
            hooks.finalizer(agen)

    sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=finalizer)
    try:
        yield left
    finally:
        sys.set_asyncgen_hooks(*hooks)


async def test_a_finished_request_closes_its_event_generators_itself(gw: InProc) -> None:
    """Streamed, non-streamed and n > 1: the chain of event generators under a response (the
    request's events, their follower, its live and stored readers, the SSE chunks) is closed by the
    response, none left suspended for the loop's finalizer hook (three per streamed request before)."""
    body = {"model": "sim", "prompt": "close me", "max_tokens": 3, "ignore_eos": True}
    with _finalized_by_the_loop() as left:
        async with gw.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) == 5  # three tokens, the finish, [DONE]
        whole = await gw.http.post("/v1/completions", json=body)
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 3
        two = await gw.http.post("/v1/completions", json={**body, "n": 2})
        assert two.status_code == 200 and [c["index"] for c in two.json()["choices"]] == [0, 1]
        gc.collect()
    assert left == []


async def test_the_last_chunk_ends_the_body_in_the_same_message() -> None:
    """Events that end with a :class:`LastChunk`: it is sent as the body's end (one write with the
    chunked terminator), not followed by an empty message of its own; events that end otherwise are."""

    async def events(last: bytes) -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield last

    for last, expected in (
        (LastChunk(b"data: [DONE]\n\n"), [(b"data: 1\n\n", True), (b"data: [DONE]\n\n", False)]),
        (b"data: 2\n\n", [(b"data: 1\n\n", True), (b"data: 2\n\n", True), (b"", False)]),
    ):
        sent, receive, send = _leaves_after(b"never sent")  # a client that stays
        await asyncio.wait_for(SSEResponse(events(last), {})({"type": "http"}, receive, send), 5)
        assert [(m["body"], m["more_body"]) for m in sent[1:]] == expected


async def test_a_streamed_answer_ends_with_its_last_event(gw: InProc) -> None:
    """Through the gateway, one choice and n > 1: the message that carries ``[DONE]`` is the one
    that ends the body; nothing is sent after it."""
    messages: list[MutableMapping[str, Any]] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        async def record(message: MutableMapping[str, Any]) -> None:
            messages.append(message)
            await send(message)

        await gw.app(scope, receive, record)

    transport = httpx.ASGITransport(app=recording)
    body = {"model": "sim", "prompt": "end me", "max_tokens": 3, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as http:
        for n in (1, 2):
            messages.clear()
            async with http.stream("POST", "/v1/completions", json={**body, "n": n}) as response:
                assert response.status_code == 200
                lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and len(lines) == 4 * n + 1  # 3 tokens, a finish each
            bodies = [m for m in messages if m["type"] == "http.response.body"]
            assert [m["more_body"] for m in bodies].count(False) == 1 and not bodies[-1]["more_body"]
            assert bodies[-1]["body"].endswith(b"data: [DONE]\n\n")


async def test_events_never_begun_are_let_go_by_the_unstarted_callback() -> None:
    """A response that fails at its status line never asks for its events (a generator closed before
    it starts runs none of its cleanup): ``unstarted`` is called once, in its place; a response
    whose events began leaves their cleanup to them."""
    calls: list[str] = []

    async def refuse(message: MutableMapping[str, Any]) -> None:
        raise OSError("the client is gone")

    async def stays() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    events = _forever()
    with pytest.raises(OSError):
        await SSEResponse(events, {}, unstarted=lambda: calls.append("released"))(
            {"type": "http"}, stays, refuse
        )
    assert calls == ["released"]
    sent, receive, send = _leaves_after(b"data: first\n\n")
    await asyncio.wait_for(
        SSEResponse(_forever(), {}, unstarted=lambda: calls.append("again"))({"type": "http"}, receive, send),
        5,
    )
    assert calls == ["released"] and len(sent) == 2


async def test_a_stream_refused_at_its_status_line_stops_following_its_requests(gw: InProc) -> None:
    """Through the gateway, one choice, n > 1 and a streamed response: the server fails the
    response's first message (its client is gone). The request was admitted, subscribed to and
    attached before the response began: every subscription is let go and every choice detached,
    none left to the gateway's end."""
    fanin, broker = gw.app.state.service.fanin, gw.app.state.service.broker
    rids: list[str] = []

    async def gone_at_start(scope: Any, receive: Any, send: Any) -> None:
        async def refuse(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message["headers"])
                rids.append(headers[b"x-breakwater-request-id"].decode())
                raise OSError("the client is gone")
            await send(message)

        await gw.app(scope, receive, refuse)

    transport = httpx.ASGITransport(app=gone_at_start)
    body = {"model": "sim", "prompt": "gone", "max_tokens": 40, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as http:
        for n in (1, 2):
            with pytest.raises(OSError):
                await http.post("/v1/completions", json={**body, "n": n})
        with pytest.raises((OSError, RuntimeError)):  # through FastAPI's handlers: "already started"
            await http.post("/v1/responses", json={"model": "sim", "input": "gone", "stream": True})
    assert len(rids) == 3
    await async_wait_for(lambda: fanin.active == 0, 10, what="subscriptions let go")
    for rid in (rids[0], choice_rid(rids[1], 0), choice_rid(rids[1], 1), rids[2]):
        record = await broker.get_record(rid)
        assert record is not None, rid
        assert record.watchers == 0, (rid, record.watchers)
