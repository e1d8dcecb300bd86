"""Reading a server-sent event stream line by line as the SSE format defines lines: ended by LF, CR
LF or CR only. httpx's ``aiter_lines()`` also breaks at NEL, LINE and PARAGRAPH SEPARATOR (as
``str.splitlines()`` does), which JSON may carry raw inside a string: an event whose text holds one
would reach the reader as two broken lines."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of ``response``'s body, without their ends (a last line without one included)."""
    rest = b""
    async for data in response.aiter_bytes():
        rest += data
        held = rest.endswith(b"\r")  # the first half of a CR LF, maybe: wait for what follows
        body = rest[:-1] if held else rest
        if b"\r" in body:
            body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, rest = body.split(b"\n")
        if held:
            rest += b"\r"
        for line in lines:
            yield line.decode(errors="replace")  # as the SSE format decodes, and aiter_lines did
    if rest:
        yield rest.removesuffix(b"\r").decode(errors="replace")
