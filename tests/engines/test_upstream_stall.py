"""An upstream that stops sending mid-stream (hung server, half-open socket) fails the read after
``read_timeout_s`` instead of hanging the sequence forever; the engine retries, continuing from the
text already received, then ends the sequence with an error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from breakwater.engines.base import GenerationRequest, SequenceDelta
from breakwater.engines.options import UpstreamOptions
from breakwater.engines.upstream import OpenAIUpstreamEngine

MODELS = orjson.dumps({"object": "list", "data": [{"id": "stall", "object": "model", "max_model_len": 512}]})


class StallingServer:
    """Answers /v1/models, and every completion with one chunk of text, then silence."""

    def __init__(self) -> None:
        self.completions: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None
        self.stop = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode()
        length = next(
            (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0
        )
        body = await reader.readexactly(length) if length else b""
        if " /v1/models " in request_line:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            writer.write(f"Content-Length: {len(MODELS)}\r\n\r\n".encode() + MODELS)
            await writer.drain()
            writer.close()
            return
        self.completions.append(orjson.loads(body))
        chunk = {"choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}]}
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        event = b"data: " + orjson.dumps(chunk) + b"\n\n"
        writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        await writer.drain()
        await self.stop.wait()  # hang: the connection stays open, nothing more comes
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def stalled() -> AsyncIterator[tuple[StallingServer, str]]:
    server = StallingServer()
    async with server as url:
        yield server, url


async def test_a_stalled_upstream_stream_fails_instead_of_hanging(
    stalled: tuple[StallingServer, str],
) -> None:
    server, url = stalled
    engine = OpenAIUpstreamEngine(UpstreamOptions(url=url, metrics_url="off", read_timeout_s=0.3, wait_s=5))
    await engine.start()
    try:
        engine.add(GenerationRequest("r1", messages=[{"role": "user", "content": "hi"}], max_tokens=50))
        deltas: list[SequenceDelta] = []
        async with asyncio.timeout(15):  # 3 attempts x 0.3 s + backoff; without a read timeout: never
            while not any(d.finished for d in deltas):
                deltas += await engine.step()
    finally:
        await engine.close()
    final = deltas[-1]
    # The read timeout, not a hang.
    assert final.error is not None and "no data from the upstream for 0.3s" in final.error
    assert len(server.completions) == 3  # the first try and two retries
    # Each retry continues from the text received so far instead of starting over.
    assert server.completions[1]["messages"][-1] == {"role": "assistant", "content": "partial"}
    assert "".join(d.text for d in deltas) == "partial" * 3
