"""A cheap open-loop streaming load client: raw asyncio HTTP/1.1 with a keep-alive pool.

httpx costs tens of microseconds per SSE line; at thousands of chunks per second that alone would fill
the client's core and blur the latencies it measures, so this speaks just enough HTTP/1.1 itself
(Content-Length, chunked and close-delimited bodies).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Outcome:
    ok: bool
    sent: float  # perf_counter at send
    done: float = 0.0  # perf_counter at the end of the response
    ttft_s: float = 0.0
    tokens: int = 0
    error: str = ""
    gaps_s: list[float] = field(default_factory=list)  # between consecutive chunks with text (ITL)


@dataclass
class RunResult:
    outcomes: list[Outcome]
    unfinished: int  # still running when the drain bound ran out (counted as errors)
    errors: Counter[str] = field(default_factory=Counter)


class Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Conn] = []
        self.all: set[asyncio.StreamWriter] = set()

    async def connect(self) -> Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.all.add(writer)
        return reader, writer

    def release(self, conn: Conn, reuse: bool) -> None:
        if reuse:
            self.idle.append(conn)
        else:
            conn[1].close()
            self.all.discard(conn[1])

    def close(self) -> None:
        for writer in self.all:
            writer.close()
        self.all.clear()
        self.idle.clear()


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("connection closed before the response")
    status = int(line.split(b" ", 2)[1])
    headers: dict[str, str] = {}
    while (raw := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = raw.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers


async def stream_one(pool: Pool, path: str, payload: bytes) -> Outcome:
    """POST one streaming request; TTFT is the first event with text, tokens from usage (else events)."""
    out = Outcome(False, sent=time.perf_counter())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {pool.host}:{pool.port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    conn: Conn | None = None
    try:
        for attempt in range(2):  # a reused keep-alive connection may have been closed by the server
            reused = bool(pool.idle)
            conn = pool.idle.pop() if reused else await pool.connect()
            conn[1].write(head)
            try:
                status, headers = await _head(conn[0])
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                pool.release(conn, reuse=False)
                conn = None
                if not reused or attempt:
                    raise
        assert conn is not None
        reuse = headers.get("connection", "").lower() != "close" and (
            "content-length" in headers or "chunked" in headers.get("transfer-encoding", "")
        )
        if status != 200:
            async for _ in _body(conn[0], headers):
                pass
            out.error = f"HTTP {status}"
        else:
            await _events(out, _body(conn[0], headers))
        pool.release(conn, reuse)
        conn = None
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        out.ok, out.error = False, type(exc).__name__
    finally:
        if conn is not None:  # cancelled or failed mid-response: the connection is unusable
            pool.release(conn, reuse=False)
    out.done = time.perf_counter()
    return out


async def _events(out: Outcome, body: AsyncIterator[bytes]) -> None:
    buf = b""
    counted = 0
    usage = -1
    done = False
    last = 0.0
    async for data in body:
        buf += data.replace(b"\r\n", b"\n")
        *events, buf = buf.split(b"\n\n")
        for event in events:
            at = event.find(b"data:")  # an event may have id: or event: lines first
            if at < 0:
                continue
            payload = b"".join(ln[5:] for ln in event[at:].split(b"\n") if ln.startswith(b"data:")).strip()
            if payload == b"[DONE]":
                done = True
                continue
            chunk = orjson.loads(payload)
            if chunk.get("usage"):
                usage = int(chunk["usage"].get("completion_tokens") or 0)
            for choice in chunk.get("choices") or ():
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    counted += 1
                    now = time.perf_counter()
                    if not out.ttft_s:
                        out.ttft_s = now - out.sent
                    else:
                        out.gaps_s.append(now - last)
                    last = now
    out.tokens = usage if usage >= 0 else counted
    out.ok = done and counted > 0
    if not out.ok:
        out.error = "no [DONE]" if not done else "no tokens"


async def open_loop(
    host: str, port: int, body: dict[str, Any], rate: float, seconds: float, drain_s: float, seed: int
) -> RunResult:
    """Poisson arrivals at ``rate`` for ``seconds``, then wait at most ``drain_s`` for in-flight ones.

    Exactly ``rate * seconds`` arrivals, placed uniformly at random: a Poisson process given its count,
    so every system and rate sees the offered load it is labelled with."""
    rng = random.Random(seed)
    arrivals = sorted(rng.uniform(0, seconds) for _ in range(round(rate * seconds)))
    pool = Pool(host, port)
    payload = orjson.dumps(body)
    tasks: list[asyncio.Task[Outcome]] = []
    start = time.perf_counter()
    try:
        for at in arrivals:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_one(pool, "/v1/completions", payload)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        pool.close()
    outcomes = [t.result() for t in tasks if not t.cancelled()]
    result = RunResult(outcomes, unfinished=len(tasks) - len(outcomes))
    result.errors.update(o.error for o in outcomes if not o.ok)
    if result.unfinished:
        result.errors["unfinished"] += result.unfinished
    return result
