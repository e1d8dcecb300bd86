"""``sse_lines``: an SSE body's lines as the format defines them, across any chunking."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from breakwater.protocol.sse_lines import sse_lines

BODY = 'id: 1\r\ndata: {"t": "a\u2028b\x85c\u2029d"}\r\n\r\nid: 2\ndata: x\n\ndata: [DONE]\r\rlast'.encode()
LINES = [
    "id: 1",
    'data: {"t": "a\u2028b\x85c\u2029d"}',
    "",
    "id: 2",
    "data: x",
    "",
    "data: [DONE]",
    "",
    "last",
]


async def _lines(chunks: list[bytes]) -> list[str]:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [line async for line in sse_lines(httpx.Response(200, content=body()))]


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(BODY)])
async def test_lines_end_only_at_cr_lf_or_crlf_however_the_body_is_cut(size: int) -> None:
    chunks = [BODY[i : i + size] for i in range(0, len(BODY), size)]
    assert await _lines(chunks) == LINES


@pytest.mark.parametrize(
    ("chunks", "lines"),
    [
        ([b"a\r"], ["a"]),
        ([b"a\n\r"], ["a", ""]),
        ([b"a", b"", b"\r", b"", b"\nb"], ["a", "b"]),
        ([b"data: \xff\n"], ["data: \ufffd"]),  # invalid UTF-8: replaced, as the format says
    ],
)
async def test_ends_empty_chunks_and_bad_bytes(chunks: list[bytes], lines: list[str]) -> None:
    assert await _lines(chunks) == lines


async def test_httpx_aiter_lines_would_break_the_data_line() -> None:
    """Why the reader exists: httpx splits at the separators JSON leaves raw."""

    async def body() -> AsyncIterator[bytes]:
        yield BODY

    lines = [line async for line in httpx.Response(200, content=body()).aiter_lines()]
    assert 'data: {"t": "a\u2028b\x85c\u2029d"}' not in lines
