"""The WebSocket probe session (``/v1/ws``): submit, drop the socket once, ``{"resume", "after"}``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from breakwater.probe.session import RETRY_STATUS, Result, SessionError, Tracker, rotate, settle

RETRY_S = 0.5


async def _connect(
    urls: Sequence[str], start: int, api_key: str | None, result: Result
) -> tuple[int, ClientConnection]:
    """The first URL from ``start`` that accepts a socket (each refusal is a ``connect`` error)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    while True:
        for offset, url in enumerate(rotate(urls, start)):
            began = time.monotonic()
            try:
                conn = await connect(ws_url(url), additional_headers=headers, open_timeout=10)
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status not in RETRY_STATUS:
                    raise SessionError(f"http_{status}", "WebSocket refused") from None
                result.errors.append(f"http_{status}")  # draining or no upstream: try elsewhere
                continue
            except (OSError, InvalidHandshake, TimeoutError):
                result.errors.append("connect")
                continue
            if result.connect_s is None:
                result.connect_s = time.monotonic() - began
            return (start + offset) % len(urls), conn
        await asyncio.sleep(RETRY_S)  # every URL refused: try again until the session's deadline


def ws_url(url: str) -> str:
    root = url.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return f"{root}/v1/ws"


async def websocket_session(
    urls: Sequence[str], body: dict[str, Any], *, api_key: str | None, drop_after: int, timeout_s: float
) -> Result:
    tracker = Tracker(Result("websocket"))
    sockets: list[ClientConnection] = []  # every one opened, closed at the end
    try:
        exchange = _exchange(urls, body, api_key, drop_after, tracker, sockets)
        return await settle(tracker.result, exchange, timeout_s)
    finally:
        for conn in sockets:
            with contextlib.suppress(Exception):
                await conn.close()


async def _exchange(
    urls: Sequence[str],
    body: dict[str, Any],
    api_key: str | None,
    drop_after: int,
    tracker: Tracker,
    sockets: list[ClientConnection],
) -> None:
    result = tracker.result
    index, conn = await _connect(urls, 0, api_key, result)
    sockets.append(conn)
    tracker.sent_at = time.monotonic()
    await conn.send(orjson.dumps(body).decode())
    created = orjson.loads(await conn.recv())
    if created.get("type") != "created":
        raise SessionError("error_event", str(created.get("error", created))[:200])
    rid = str(created["request_id"])
    planned = drop_after <= 0
    while not tracker.finished:
        try:
            message = orjson.loads(await conn.recv())
        except ConnectionClosed:  # not ours: the gateway died or drains (1012)
            result.errors.append("stream_broken")
            tracker.dropped()
            await asyncio.sleep(RETRY_S)  # a server that accepts and closes is not hammered
            index, conn = await _reattach(urls, index + 1, api_key, result, rid, tracker, conn)
            sockets.append(conn)
            continue
        kind = message.get("type")
        if kind == "token":
            tracker.token(int(message["seq"]))
            if not planned and tracker.last_seq >= drop_after:
                planned = True
                tracker.dropped()
                index, conn = await _reattach(urls, index, api_key, result, rid, tracker, conn)
                sockets.append(conn)
        elif kind == "done":
            tracker.done(int(message["seq"]))
        elif kind == "error":
            raise SessionError("error_event", str(message.get("error"))[:200])


async def _reattach(
    urls: Sequence[str],
    start: int,
    api_key: str | None,
    result: Result,
    rid: str,
    tracker: Tracker,
    old: ClientConnection,
) -> tuple[int, ClientConnection]:
    """Close ``old`` and follow ``rid`` from the last token seen on a new socket (the next URL
    whenever one closes before the resume is sent)."""
    with contextlib.suppress(Exception):
        await old.close()
    while True:
        index, conn = await _connect(urls, start % len(urls), api_key, result)
        try:
            await conn.send(orjson.dumps({"resume": rid, "after": tracker.last_seq}).decode())
            return index, conn
        except ConnectionClosed:
            result.errors.append("stream_broken")
            with contextlib.suppress(Exception):
                await conn.close()
            start = index + 1
            await asyncio.sleep(RETRY_S)
