"""The probe's SSE session against scripted responses (httpx.MockTransport): the sequence check catches
a lost or repeated token, the planned drop resumes with Last-Event-ID, and errors are classified."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson

from breakwater.probe.sse import sse_session

URL = "http://gw"


def _chunk(seq: int, content: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    body = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"id: {seq}\ndata: ".encode() + orjson.dumps(body) + b"\n\n"


def _stream(seqs: list[int], finish_at: int | None) -> bytes:
    out = b"".join(_chunk(s, f"t{s}") for s in seqs)
    if finish_at is not None:
        out += (
            _chunk(finish_at, finish="length") + b'id: %d\ndata: {"choices": [], "usage": {}}\n\n' % finish_at
        )
        out += b"data: [DONE]\n\n"
    return out


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_a_clean_session_with_its_planned_drop() -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.headers.get("last-event-id")))
        if request.method == "POST":
            return httpx.Response(
                200, headers={"x-breakwater-request-id": "r1"}, content=_stream([1, 2, 3, 4], None)
            )
        assert request.url.path == "/v1/requests/r1/events"
        after = int(request.headers["last-event-id"])
        return httpx.Response(200, content=_stream(list(range(after + 1, 7)), 7))

    async with _client(handler) as client:
        result = await sse_session(client, [URL], {"stream": True}, drop_after=2, timeout_s=5)
    assert (result.outcome, result.errors, result.tokens) == ("success", [], 6)
    assert seen == [("POST", None), ("GET", "2")]  # dropped after token 2, resumed after it
    assert len(result.resume_gaps_s) == 1 and len(result.gaps_s) == 4 and result.ttft_s is not None


async def test_a_repeated_or_missing_token_fails_the_session() -> None:
    """A resume that replays the last token seen (Last-Event-ID ignored), or a stream that skips one."""
    for first, resumed in (([1, 2], [2, 3]), ([1, 2], [4, 5]), ([1, 3], [9])):

        def handler(
            request: httpx.Request, first: list[int] = first, resumed: list[int] = resumed
        ) -> httpx.Response:
            if request.method == "POST":
                return httpx.Response(
                    200, headers={"x-breakwater-request-id": "r"}, content=_stream(first, None)
                )
            return httpx.Response(200, content=_stream(resumed, resumed[-1] + 1))

        async with _client(handler) as client:
            result = await sse_session(client, [URL], {}, drop_after=2, timeout_s=5)
        assert result.outcome == "failed" and result.errors == ["integrity"], (first, resumed, result)


async def test_a_cut_stream_resumes_on_the_next_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "gw":  # ends without its finish: a gateway that died
            return httpx.Response(
                200, headers={"x-breakwater-request-id": "r"}, content=_stream([1, 2, 3], None)
            )
        assert request.headers["last-event-id"] == "3"
        return httpx.Response(200, content=_stream([4, 5], 6))

    async with _client(handler) as client:
        result = await sse_session(client, [URL, "http://other"], {}, drop_after=0, timeout_s=5)
    assert (result.outcome, result.errors, result.tokens) == ("recovered", ["stream_broken"], 5)


async def test_http_errors_are_named_by_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"error": {"message": "slow down"}})

    async with _client(handler) as client:
        result = await sse_session(client, [URL], {}, drop_after=0, timeout_s=5)
    assert result.outcome == "failed" and result.errors == ["http_429"] and "slow down" in result.detail


async def test_a_token_repeated_mid_stream_fails_the_session() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = (
            _chunk(1, "a")
            + _chunk(2, "b")
            + _chunk(2, "b")
            + _chunk(3, finish="length")
            + b"data: [DONE]\n\n"
        )
        return httpx.Response(200, headers={"x-breakwater-request-id": "r"}, content=body)

    async with _client(handler) as client:
        result = await sse_session(client, [URL], {}, drop_after=0, timeout_s=5)
    assert result.outcome == "failed" and result.errors == ["integrity"], result


async def test_a_draining_gateway_sends_the_resume_elsewhere() -> None:
    """503 on the resume (the gateway drains): the next URL, then the rest of the stream."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(
                200, headers={"x-breakwater-request-id": "r"}, content=_stream([1, 2], None)
            )
        if request.url.host == "gw":
            return httpx.Response(503, json={"error": {"message": "draining"}})
        return httpx.Response(200, content=_stream([3, 4], 5))

    async with _client(handler) as client:
        result = await sse_session(client, [URL, "http://other"], {}, drop_after=2, timeout_s=5)
    assert (result.outcome, result.errors, result.tokens) == ("recovered", ["http_503"], 4), result


async def test_an_answer_that_is_not_breakwaters_fails_cleanly() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"data: not json\n\n")  # a proxy's page, no request id

    async with _client(handler) as client:
        result = await sse_session(client, [URL], {}, drop_after=0, timeout_s=5)
    assert result.outcome == "failed" and result.errors == ["protocol"], result
