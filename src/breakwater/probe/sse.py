"""The SSE probe session: a streamed chat completion, closed once, resumed with ``Last-Event-ID``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from breakwater.probe.session import RETRY_STATUS, Result, SessionError, StreamBroken, Tracker, settle
from breakwater.protocol.sse_lines import sse_lines

RETRY_S = 0.5
REQUEST_ID = "x-breakwater-request-id"


async def sse_session(
    client: httpx.AsyncClient, urls: Sequence[str], body: dict[str, Any], *, drop_after: int, timeout_s: float
) -> Result:
    tracker = Tracker(Result("sse"))
    return await settle(tracker.result, _run(client, urls, body, drop_after, tracker), timeout_s)


async def _run(
    client: httpx.AsyncClient, urls: Sequence[str], body: dict[str, Any], drop_after: int, tracker: Tracker
) -> None:
    result = tracker.result
    index, rid, planned, refused = 0, "", drop_after <= 0, 0
    while not tracker.finished:
        url = urls[index].rstrip("/")
        began = time.monotonic()
        if not rid:
            tracker.sent_at = began
            request = client.build_request("POST", f"{url}/v1/chat/completions", json=body)
        else:
            headers = {"Last-Event-ID": str(tracker.last_seq)}
            request = client.build_request("GET", f"{url}/v1/requests/{rid}/events", headers=headers)
        try:
            resp = await client.send(request, stream=True)
        except httpx.TransportError:
            result.errors.append("connect")
            index, refused = (index + 1) % len(urls), refused + 1
            if refused % len(urls) == 0:
                await asyncio.sleep(RETRY_S)
            continue
        try:
            if resp.status_code in RETRY_STATUS:
                result.errors.append(f"http_{resp.status_code}")
                index = (index + 1) % len(urls)
                await asyncio.sleep(RETRY_S)
                continue
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise SessionError(f"http_{resp.status_code}", text[:200])
            if result.connect_s is None:
                result.connect_s = time.monotonic() - began  # until the response headers
            if not rid and REQUEST_ID not in resp.headers:
                raise SessionError("protocol", f"no {REQUEST_ID} header: not a Breakwater gateway?")
            rid = rid or resp.headers[REQUEST_ID]
            if await _read(resp, tracker, 0 if planned else drop_after):
                planned = True  # dropped on purpose: resume on the same URL
                tracker.dropped()
            elif not tracker.finished:
                raise StreamBroken
        except (httpx.TransportError, StreamBroken):
            result.errors.append("stream_broken")  # a cut the probe did not make: resume elsewhere
            tracker.dropped()
            index = (index + 1) % len(urls)
            await asyncio.sleep(RETRY_S)  # a server that accepts and closes is not hammered
        finally:
            await resp.aclose()


async def _read(resp: httpx.Response, tracker: Tracker, drop_after: int) -> bool:
    """Follow the events; True when the probe drops the stream on purpose after ``drop_after``."""
    seq: int | None = None
    data: list[str] = []
    first = True
    async for line in sse_lines(resp):
        if line.startswith("id:"):
            seq = int(line[3:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            payload = "\n".join(data)
            data = []
            if payload == "[DONE]":
                if not tracker.finished:
                    raise SessionError("integrity", "[DONE] before the finish")
                return False
            _event(tracker, seq, orjson.loads(payload), first)
            seq, first = None, False  # every event names its own id
            if drop_after and not tracker.finished and tracker.last_seq >= drop_after:
                return True
    return False


def _event(tracker: Tracker, seq: int | None, chunk: dict[str, Any], first: bool) -> None:
    """One chunk. The probe asks for plain text, so each token event is one chunk with an id of its
    own; only the finish may share the id of the text just before it (a final event with text), and
    the usage chunk that of the finish."""
    if "error" in chunk:
        error = chunk["error"]
        raise SessionError("error_event", str(error.get("message") if isinstance(error, dict) else error))
    if seq is None:
        raise SessionError("integrity", "a chunk without an id")
    if tracker.finished:
        return  # the usage chunk: it shares the finish's id
    choices = chunk.get("choices") or []
    if any(c.get("finish_reason") for c in choices):
        tracker.done(seq, shares_last=not first)
    elif seq == tracker.last_seq + 1:
        tracker.token(seq)
    else:
        raise SessionError("integrity", f"id {seq} after {tracker.last_seq}")
