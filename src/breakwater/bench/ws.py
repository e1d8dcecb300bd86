"""Breakwater's WebSocket API as a bench target: requests multiplexed over a few sockets.

The gateway handles one socket's frames in order and answers each submission with ``created`` (or an
``error`` without a request id) before reading the next frame, so a FIFO per socket pairs answers
with submissions; later events carry the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

Queue = asyncio.Queue[dict[str, Any]]


class _Socket:
    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.pending: deque[Queue] = deque()
        self.routes: dict[str, Queue] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.conn:
                msg = orjson.loads(raw)
                rid = msg.get("request_id")
                if msg.get("type") == "created" or (msg.get("type") == "error" and rid is None):
                    queue = self.pending.popleft()
                    if rid is not None:
                        self.routes[str(rid)] = queue
                    queue.put_nowait(msg)
                elif rid in self.routes:
                    queue = self.routes[rid]
                    if msg.get("type") in ("done", "error"):
                        del self.routes[rid]
                    queue.put_nowait(msg)
        except WebSocketException:
            pass
        finally:  # the socket died: every open request sees a broken stream
            for queue in [*self.pending, *self.routes.values()]:
                queue.put_nowait({"type": "closed"})


class WSPool:
    def __init__(self, url: str, connections: int = 8) -> None:
        self.url = url.rstrip("/") + "/v1/ws"
        self.size = connections
        self.sockets: list[_Socket] = []
        self._next = itertools.count()

    async def start(self) -> None:
        for _ in range(self.size):
            conn = await connect(self.url, max_size=None, open_timeout=30)
            self.sockets.append(_Socket(conn))

    async def submit(self, body: dict[str, Any]) -> Queue:
        sock = self.sockets[next(self._next) % len(self.sockets)]
        queue: Queue = asyncio.Queue()
        sock.pending.append(queue)
        await sock.conn.send(orjson.dumps(body).decode())
        return queue

    async def close(self) -> None:
        for sock in self.sockets:
            await sock.conn.close()
            sock.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sock.reader
