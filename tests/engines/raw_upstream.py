"""A fake OpenAI upstream on a raw asyncio server, for tests that need control of the bytes and
their timing (one write, a stall mid-stream). It answers ``GET /v1/models`` with one model and
hands every other request's parsed body and writer to :meth:`RawUpstream.complete`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from breakwater.engines.options import UpstreamOptions
from breakwater.engines.upstream import OpenAIUpstreamEngine


class RawUpstream:
    """Serves ``model`` (``max_model_len`` 512); subclasses write the completions' answers."""

    def __init__(self, model: str) -> None:
        entry = {"id": model, "object": "model", "max_model_len": 512}
        self.models = orjson.dumps({"object": "list", "data": [entry]})
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def complete(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Called first on exit: let any answer still being written end."""

    @staticmethod
    async def answer(writer: asyncio.StreamWriter, chunks: list[dict[str, Any]]) -> None:
        """A whole streamed answer (``chunks`` then ``[DONE]``) in one write, with a Content-Length."""
        events = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
            + f"Content-Length: {len(events)}\r\n\r\n".encode()
            + events
        )
        await writer.drain()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0
        )
        body = await reader.readexactly(length) if length else b""
        if b" /v1/models " in head.split(b"\r\n", 1)[0]:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n")
            writer.write(f"Content-Length: {len(self.models)}\r\n\r\n".encode() + self.models)
            await writer.drain()
            writer.close()
            return
        await self.complete(orjson.loads(body), writer)
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@asynccontextmanager
async def started_engine(server: RawUpstream, **options: Any) -> AsyncIterator[OpenAIUpstreamEngine]:
    """``server`` serving, and an ``openai`` engine started against it (no metrics; ``options``)."""
    async with server as url:
        engine = OpenAIUpstreamEngine(UpstreamOptions(url=url, metrics_url="off", **{"wait_s": 5, **options}))
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()
