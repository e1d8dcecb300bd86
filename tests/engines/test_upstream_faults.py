"""An upstream's faults the `openai` engine meets: a stream lost after its finish is a whole answer
(a retry wrote on past the end), empty ``data:`` events are skipped (they failed the attempt), a
chunk that is not a JSON object is a failed attempt retried (it raised past the retries), and the
upstream refusing Breakwater itself (401/403/404) is a server error, not the client's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from breakwater.engines.base import GenerationRequest, SequenceDelta
from breakwater.engines.upstream import OpenAIUpstreamEngine
from tests.engines.raw_upstream import RawUpstream, started_engine

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _token(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


class Scripted(RawUpstream):
    """Answers the n-th completion as ``scripts[n]`` says (the last one for any later)."""

    def __init__(self, scripts: list[str]) -> None:
        super().__init__("faults")
        self.scripts = scripts
        self.completions: list[dict[str, Any]] = []

    async def complete(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        self.completions.append(body)
        script = self.scripts[min(len(self.completions), len(self.scripts)) - 1]
        if script.startswith("status "):
            status = int(script.split()[1])
            error = orjson.dumps({"error": {"message": f"refused with {status}", "type": "x"}})
            writer.write(f"HTTP/1.1 {status} No\r\nContent-Length: {len(error)}\r\n\r\n".encode() + error)
            await writer.drain()
            return
        writer.write(HEAD)
        events: list[bytes] = []
        if script == "empty data":
            events.append(b"data:\n\n")
        if script == "not an object":
            events.append(b"data: null\n\n")
        if script.startswith("error event"):  # (the client's 400, or vLLM's older shape of a 500)
            shape: dict[str, Any] = {"object": "error", "message": "boom", "type": "Internal", "code": 500}
            if script.endswith("400"):
                shape = {"error": {"message": "bad", "code": 400}}
            event = b"data: " + orjson.dumps(shape) + b"\n\n"
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n0\r\n\r\n")
            await writer.drain()
            return
        events += [b"data: " + orjson.dumps(_token(f" t{i}")) + b"\n\n" for i in range(3)]
        events.append(b"data: " + orjson.dumps(_token(" t3", "length")) + b"\n\n")
        if script == "finish and a bad line in one read":
            for event in events[:-1]:
                writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)  # a read each
            last = events[-1] + b"data: null\n\n"
            writer.write(f"{len(last):x}\r\n".encode() + last + b"\r\n")
            await writer.drain()
            writer.transport.abort()
            return
        if script == "finish, then lost":
            for event in events:
                writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
            writer.transport.abort()  # before the usage chunk, [DONE] and the chunked body's end
            return
        events.append(b"data: [DONE]\n\n")
        for event in events:
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.fixture
async def engine_for(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Scripted, OpenAIUpstreamEngine]]:
    server = Scripted(request.param)
    async with started_engine(server) as engine:
        yield server, engine


async def _down(server: Scripted) -> int:
    """The server stops listening (connections refused); its port, to listen on again."""
    assert server.server is not None
    port: int = server.server.sockets[0].getsockname()[1]
    server.server.close()
    await server.server.wait_closed()
    return port


async def _run(engine: OpenAIUpstreamEngine) -> list[SequenceDelta]:
    engine.add(GenerationRequest("r1", messages=[{"role": "user", "content": "hi"}], max_tokens=4))
    deltas: list[SequenceDelta] = []
    async with asyncio.timeout(15):
        while not any(d.finished for d in deltas):
            deltas += await engine.step()
    return deltas


@pytest.mark.parametrize("engine_for", [["finish, then lost"]], indirect=True)
async def test_a_stream_lost_after_its_finish_is_whole(
    engine_for: tuple[Scripted, OpenAIUpstreamEngine],
) -> None:
    server, engine = engine_for
    deltas = await _run(engine)
    assert "".join(d.text for d in deltas) == " t0 t1 t2 t3"
    final = deltas[-1]
    assert (final.finish_reason, final.error) == ("length", None)
    assert final.usage == {"prompt_tokens": 0, "completion_tokens": 4}
    assert len(server.completions) == 1  # not retried to write on past the finish


@pytest.mark.parametrize("engine_for", [["empty data"]], indirect=True)
async def test_an_empty_data_event_is_skipped(engine_for: tuple[Scripted, OpenAIUpstreamEngine]) -> None:
    server, engine = engine_for
    deltas = await _run(engine)
    assert "".join(d.text for d in deltas) == " t0 t1 t2 t3" and deltas[-1].error is None
    assert len(server.completions) == 1


@pytest.mark.parametrize("engine_for", [["not an object", "fine"]], indirect=True)
async def test_a_chunk_that_is_not_an_object_is_a_failed_attempt(
    engine_for: tuple[Scripted, OpenAIUpstreamEngine],
) -> None:
    server, engine = engine_for
    deltas = await _run(engine)
    assert "".join(d.text for d in deltas) == " t0 t1 t2 t3" and deltas[-1].error is None
    assert len(server.completions) == 2  # retried, as a malformed line is


@pytest.mark.parametrize("engine_for", [["status 401"], ["status 403"], ["status 404"]], indirect=True)
async def test_the_upstream_refusing_breakwater_is_a_server_error(
    engine_for: tuple[Scripted, OpenAIUpstreamEngine],
) -> None:
    server, engine = engine_for
    final = (await _run(engine))[-1]
    assert final.error is not None and "refused with" in final.error
    assert final.error_code is None  # a server error (500), not `upstream_rejected` (the client's 400)
    assert len(server.completions) == 1


@pytest.mark.parametrize("engine_for", [["status 400"]], indirect=True)
async def test_the_upstream_refusing_the_request_is_the_clients_error(
    engine_for: tuple[Scripted, OpenAIUpstreamEngine],
) -> None:
    server, engine = engine_for
    final = (await _run(engine))[-1]
    assert final.error_code == "upstream_rejected" and len(server.completions) == 1


async def test_a_request_waits_for_an_upstream_that_is_down_and_is_served_when_it_is_back() -> None:
    """A restarting sidecar refuses connections: the request is tried again until it is back (it
    failed after three quick tries, so a restart was every queued request's 500), and the worker
    takes no more jobs meanwhile (they wait in the queue, for other workers)."""
    server = Scripted(["fine"])
    async with started_engine(server, wait_s=30) as engine:
        port = await _down(server)
        run = asyncio.create_task(_run(engine))
        await asyncio.sleep(2.5)  # tried (and refused) about three times
        assert not run.done() and server.completions == []
        assert engine.free_slots() == 0  # no more jobs taken while it is down: they wait in the queue
        server.server = await asyncio.start_server(server.handle, "127.0.0.1", port)  # back
        deltas = await asyncio.wait_for(run, 10)
        async with asyncio.timeout(10):
            while engine.free_slots() == 0:  # its probe found it up
                await asyncio.sleep(0.05)
    assert "".join(d.text for d in deltas) == " t0 t1 t2 t3" and deltas[-1].error is None
    assert len(server.completions) == 1


async def test_an_upstream_down_longer_than_the_wait_fails_the_request() -> None:
    server = Scripted(["fine"])
    async with started_engine(server, wait_s=1.5) as engine:
        await _down(server)
        final = (await asyncio.wait_for(_run(engine), 15))[-1]
    assert final.error is not None and "cannot connect" in final.error and final.error_code is None


@pytest.mark.parametrize("engine_for", [["error event 400"]], indirect=True)
async def test_an_error_event_with_a_client_status_is_the_clients_error(
    engine_for: tuple[Scripted, OpenAIUpstreamEngine],
) -> None:
    """It was taken for a 500 and retried (the client's own fault, sent again twice)."""
    server, engine = engine_for
    final = (await _run(engine))[-1]
    assert final.error is not None and "bad" in final.error and final.error_code == "upstream_rejected"
    assert len(server.completions) == 1


@pytest.mark.parametrize("engine_for", [["error event 500"]], indirect=True)
async def test_an_error_event_in_vllms_older_shape_is_an_error(
    engine_for: tuple[Scripted, OpenAIUpstreamEngine],
) -> None:
    """``{"object": "error", "message", ...}`` was not seen as an error: the request failed as a
    stream without a finish, the upstream's message lost."""
    server, engine = engine_for
    final = (await _run(engine))[-1]
    assert final.error is not None and "boom" in final.error
    assert len(server.completions) == 3  # a 500: tried again twice


@pytest.mark.parametrize("engine_for", [["status 429", "status 503", "status 429", "fine"]], indirect=True)
async def test_an_overloaded_upstream_is_waited_for(
    engine_for: tuple[Scripted, OpenAIUpstreamEngine],
) -> None:
    """429 and 503 are the upstream's "not now" (a hosted API's rate limit, a server at capacity):
    tried again, further apart, within ``wait_s``; it failed after three tries, 1.5 s."""
    server, engine = engine_for
    deltas = await _run(engine)
    assert "".join(d.text for d in deltas) == " t0 t1 t2 t3" and deltas[-1].error is None
    assert len(server.completions) == 4


@pytest.mark.parametrize("engine_for", [["finish and a bad line in one read"]], indirect=True)
async def test_a_bad_line_after_the_finish_in_the_same_read_keeps_the_text_before_it(
    engine_for: tuple[Scripted, OpenAIUpstreamEngine],
) -> None:
    """The read's text was dropped when a later line of it failed, and the answer, its finish
    seen, reported whole without its last token (review)."""
    server, engine = engine_for
    deltas = await _run(engine)
    assert "".join(d.text for d in deltas) == " t0 t1 t2 t3"
    assert (deltas[-1].finish_reason, deltas[-1].error) == ("length", None)
    assert len(server.completions) == 1
