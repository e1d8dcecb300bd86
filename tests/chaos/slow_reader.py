"""A streaming client that reads far slower than its tokens arrive, on a connection with tiny buffers.

The kernel would otherwise absorb megabytes of a slow reader's stream (Linux grows a socket's send
buffer up to ``tcp_wmem``'s maximum, 4 MiB), so the gateway would never feel it. Here the socket
announces a tiny MSS before it connects (the gateway's send buffer is sized in segments) and keeps a
tiny receive buffer, and the reader takes one event at a time with a pause between: the gateway's
socket soon stops taking this stream's bytes, its writes back up, and its live buffer for the stream
overflows. It must then serve this stream from the durable stream without stalling anyone else.

Plain ``httpx`` cannot do this (it sets socket options after connecting), so this speaks HTTP/1.1
with ``h11`` over an asyncio stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import h11
import orjson

from tests.chaos.harness import Spec
from tests.helpers import async_wait_for

TINY_MSS = 88  # Linux's smallest (TCP_MIN_MSS)
TINY_RCVBUF = 1024  # the kernel rounds it up to its minimum
READ_BYTES = 512


class SlowReader:
    def __init__(self, url: str, spec: Spec, *, pause_s: float = 0.5) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.spec = spec
        self.pause_s = pause_s
        self.parts: list[str] = []
        self.status = 0
        self.finished = False  # [DONE] arrived
        self._first = asyncio.Event()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SlowReader:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def started(self, timeout_s: float = 30.0) -> None:
        """Wait for the first token: the stream is open and running."""
        await async_wait_for(lambda: self._first.is_set() or self.done, timeout_s, what="the first token")
        if not self._first.is_set() and self._task is not None:
            await self._task  # it ended before any token: raise what ended it
            raise AssertionError(f"the slow reader's stream ended without a token (HTTP {self.status})")

    async def read_rest(self) -> str:
        """Stop dawdling: open the receive window, read to the end; the whole text received."""
        self.pause_s = 0.0
        if self._sock is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if self._task is not None:
            await self._task
        assert self.finished, "the slow reader's stream ended without [DONE]"
        return "".join(self.parts)

    async def _run(self) -> None:
        sock = self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect, so the SYN announces them: the gateway sizes its send buffer from the MSS.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, TINY_MSS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RCVBUF)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        # A small StreamReader limit: asyncio stops reading the socket when it holds 2 x limit.
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_BYTES)
        try:
            await self._exchange(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        http = h11.Connection(our_role=h11.CLIENT)
        body = orjson.dumps(self.spec.body())
        headers = [
            ("Host", f"{self.host}:{self.port}"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ]
        writer.write(http.send(h11.Request(method="POST", target=self.spec.path, headers=headers)) or b"")
        writer.write(http.send(h11.Data(data=body)) or b"")
        writer.write(http.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        pending = b""
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await reader.read(READ_BYTES))
            elif isinstance(event, h11.Response):
                self.status = event.status_code
                assert self.status == 200, self.status
            elif isinstance(event, h11.Data):
                pending += bytes(event.data)
                *events, pending = pending.split(b"\n\n")
                for raw in events:
                    await self._take(raw.decode())
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def _take(self, raw: str) -> None:
        """One SSE event, then a pause: the slow part."""
        for line in raw.splitlines():
            if line == "data: [DONE]":
                self.finished = True
            elif line.startswith("data: "):
                self._take_chunk(orjson.loads(line[6:]))
        await asyncio.sleep(self.pause_s)

    def _take_chunk(self, data: dict[str, Any]) -> None:
        assert "error" not in data, data
        for choice in data.get("choices") or []:
            text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            if text:
                self.parts.append(text)
                self._first.set()
