"""The SSE response: Starlette's ``StreamingResponse`` contract at less cost per event and per stream.

Every streamed event used to pass through five ASGI ``send`` wrappers (the error and exception
middlewares', X-Request-ID's, the body limit's) that only act on the response's first message, and
every stream ran in an anyio task group beside a disconnect listener. Here the status line and
headers go through the whole stack as before (so X-Request-ID is added and the error middleware
knows the response started), the events go straight to the server's own ``send`` (stashed in the
scope by :class:`GatewayApp`), and the disconnect listener is one plain task that cancels the
stream when the client goes (the stream's own cleanup then runs: the request is detached, not
cancelled, exactly as before).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

SERVER_SEND = "breakwater.server_send"


class GatewayApp(FastAPI):
    """FastAPI, with the server's own ``send`` in the scope for :class:`SSEResponse`'s events."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str]) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        streaming = True
        gone = False

        async def listen() -> None:
            nonlocal gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # e.g. a body limit refusing a chunked GET's body
                return  # no disconnect to see: a client that leaves fails the next send instead
            if streaming:  # the client left mid-stream: stop it (its cleanup detaches the request)
                gone = True
                task.cancel()

        watcher = asyncio.create_task(listen())
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            out = scope.get(SERVER_SEND, send)
            async for chunk in self.events:
                await out({"type": "http.response.body", "body": chunk, "more_body": True})
            streaming = False
            await out({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Our own cancellation, for the disconnect, ends the response quietly; any other one
            # (the server shutting down, even at the same moment) goes on up.
            if not gone or task.uncancel() > 0:
                raise
        finally:
            streaming = False
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
