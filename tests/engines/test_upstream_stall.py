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
from tests.engines.raw_upstream import RawUpstream


class StallingServer(RawUpstream):
    """Answers every completion with one chunk of text, then silence."""

    def __init__(self) -> None:
        super().__init__("stall")
        self.completions: list[dict[str, Any]] = []
        self.stop = asyncio.Event()

    async def complete(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        self.completions.append(body)
        chunk = {"choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}]}
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        event = b"data: " + orjson.dumps(chunk) + b"\n\n"
        writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        await writer.drain()
        await self.stop.wait()  # hang: the connection stays open, nothing more comes

    async def close(self) -> None:
        self.stop.set()


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
