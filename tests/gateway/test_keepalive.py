"""A stream that has sent nothing for ``sse_keepalive_s`` (its request queued behind others, or a
slow token) sends an SSE comment, which SSE readers skip, so that an idle-timeout proxy (nginx's 60 s
``proxy_read_timeout``, a cloud load balancer's) does not cut it. It sent nothing at all until its
first token, however long its request waited in the queue."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.redis_server import RedisServer
from tests.inproc import busy_gateway, inproc_gateway

COMMENT = b": keepalive\n"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
# The path, the body, and how many events open the stream before its wait (n > 1: every choice's
# role at once; the Responses API: response.created and response.in_progress).
CASES = [
    ("/v1/chat/completions", {**CHAT, "stream": True}, 0),
    ("/v1/chat/completions", {**CHAT, "stream": True, "n": 2}, 2),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": True}, 0),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 16, "stream": True}, 2),
]


def _data(body: bytes) -> list[bytes]:
    """The stream's events, without its comment lines."""
    lines = b"\n".join(line for line in body.split(b"\n") if not line.startswith(b":"))
    return [e for e in lines.split(b"\n\n") if e]


@pytest.mark.parametrize(("path", "body", "opening"), CASES)
async def test_a_queued_stream_sends_comments_until_its_first_event(
    redis_server: RedisServer, prefix: str, path: str, body: dict[str, Any], opening: int
) -> None:
    async with busy_gateway(redis_server.url, prefix, 1.2, sse_keepalive_s=0.2) as gw:
        got = await gw.http.post(path, json={"model": "sim", **body})
    assert got.status_code == 200, got.text
    raw = got.content
    waited = raw.split(COMMENT)
    assert len(waited) >= 4, raw[:400]  # ~1.2 s queued, a comment every 0.2 s (and one poll)
    assert len(_data(waited[0])) == opening, raw[:400]
    assert all(part == b"" for part in waited[1:-1]), raw[:600]  # nothing between the comments
    events = _data(raw)
    if path == "/v1/responses":
        last = orjson.loads(events[-1].split(b"data: ", 1)[1])
        # Its own end or max_output_tokens (the sim's length is seeded by the response's id).
        assert last["type"] in ("response.completed", "response.incomplete"), last["type"]
        assert 0 < last["response"]["usage"]["output_tokens"] <= 16
    else:
        assert events[-1] == b"data: [DONE]"
        chunks = [orjson.loads(e.split(b"data: ", 1)[1]) for e in events[:-1]]
        assert {c["choices"][0]["index"] for c in chunks} == set(range(body.get("n", 1)))
        assert all(c["choices"][0]["finish_reason"] in (None, "length") for c in chunks)


async def test_the_sdk_reads_a_stream_with_comments_as_one_without(
    redis_server: RedisServer, prefix: str
) -> None:
    async with busy_gateway(redis_server.url, prefix, 1.2, sse_keepalive_s=0.2) as gw:
        sdk = gw.sdk()
        stream = await sdk.chat.completions.create(model="sim", **CHAT, stream=True)  # type: ignore[call-overload]
        chunks = [c async for c in stream]
        whole = await sdk.chat.completions.create(model="sim", **CHAT)  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_no_comments_when_turned_off(redis_server: RedisServer, prefix: str) -> None:
    async with busy_gateway(redis_server.url, prefix, 1.2, sse_keepalive_s=0, idle_poll_s=0.2) as gw:
        got = await gw.http.post("/v1/chat/completions", json={"model": "sim", **CHAT, "stream": True})
    assert got.status_code == 200
    assert got.content.startswith(b"id: 1\n") and b": keepalive" not in got.content, got.content[:200]


async def test_a_stream_that_keeps_sending_has_no_comments(redis_server: RedisServer, prefix: str) -> None:
    """Tokens every 60 ms, each well inside the 0.2 s: a comment is only for a silence."""
    async with inproc_gateway(redis_server.url, prefix, sse_keepalive_s=0.2) as gw:
        await gw.add_worker(SimEngine(SimOptions(capacity=4, decode_base_ms=60, decode_per_seq_ms=0)))
        body = {"model": "sim", **CHAT, "max_tokens": 20, "ignore_eos": True, "stream": True}
        got = await gw.http.post("/v1/chat/completions", json=body)
    assert got.status_code == 200
    assert b": keepalive" not in got.content
    assert len(_data(got.content)) == 22  # 20 tokens, the finish, [DONE]


async def test_a_tool_call_parsed_whole_sends_comments_while_its_tokens_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model's call is sent once parsed whole: its tokens render nothing meanwhile, and the
    follower, seeing tokens come, yields no IDLE. A long call on a slow model was silent past an
    idle-timeout proxy's limit (a review's finding); a comment goes out every ``keepalive_s``."""
    from breakwater.gateway import sse
    from breakwater.gateway.autotools import ToolChunks
    from breakwater.protocol.events import TokenEvent

    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(sse.Silence, "clock", staticmethod(lambda: next(clock)))  # a second a token
    texts = ["<tool_call>", '[{"name": "f", ', '"arguments": ', '{"a": 1', "}", "}]", "</tool_call>"]

    async def events() -> Any:
        for seq, text in enumerate(texts, 1):
            yield TokenEvent(seq, "token", text=text)
        yield TokenEvent(len(texts) + 1, "done", finish_reason="stop")

    render = ToolChunks(rid="chatcmpl-x", model="sim", created=1, resumed=True)
    out = [
        chunk
        async for chunk in sse.sse_chunks(
            events(),
            render,
            rid="chatcmpl-x",
            model="sim",
            created=1,
            chat=True,
            include_usage=False,
            keepalive_s=2,
        )
    ]
    # Six tokens inside the call render nothing (seconds 0-5): the first starts the silence, then a
    # comment each two seconds (2, 4); the closing tag sends the call, then the finish and [DONE].
    assert out[:2] == [COMMENT, COMMENT] and out.count(COMMENT) == 2, out
    rest = b"".join(out[2:])
    assert b'"name":"f"' in rest and rest.endswith(b"data: [DONE]\n\n"), rest


async def test_the_sdk_reads_comments_between_events(redis_server: RedisServer, prefix: str) -> None:
    """Comments after a stream's first ``id:`` (slow tokens; a queued ``n > 1`` stream's second
    choice, after the roles): the SDK's decoder took the blank line that ended a comment event for an
    event with that id and empty data, and raised a JSONDecodeError mid-stream."""
    async with inproc_gateway(redis_server.url, prefix, sse_keepalive_s=0.1) as gw:
        await gw.add_worker(SimEngine(SimOptions(capacity=1, decode_base_ms=350, decode_per_seq_ms=0)))
        raw = await gw.http.post("/v1/chat/completions", json={"model": "sim", **CHAT, "stream": True})
        body = raw.content
        assert COMMENT in body[body.index(b"\n\n") :], body[:300]  # a comment after an event
        sdk = gw.sdk()
        for n in (1, 2):
            stream = await sdk.chat.completions.create(model="sim", **CHAT, n=n, stream=True)  # type: ignore[call-overload]
            chunks = [c async for c in stream]
            whole = await sdk.chat.completions.create(model="sim", **CHAT, n=n)  # type: ignore[call-overload]
            for i in range(n):
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
                assert text == whole.choices[i].message.content
