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
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from breakwater.protocol.events import TokenEvent

SERVER_SEND = "breakwater.server_send"
# The HTTP/1.1 protocol whose connection a stream's tokens are written to directly (ClientWrites).
HTTPTOOLS_CYCLE = "uvicorn.protocols.http.httptools_impl"


class LastChunk(bytes):
    """A response's last body chunk: :class:`SSEResponse` sends it as the end of the body, so it and
    the chunked encoding's terminator go out in one write (one system call and one packet, where
    the terminator alone took another of each)."""

    __slots__ = ()


def joined(chunks: list[bytes]) -> bytes:
    """``chunks`` as one, a :class:`LastChunk` if the last of them is."""
    out = b"".join(chunks)
    return LastChunk(out) if type(chunks[-1]) is LastChunk else out


class ClientWrites:
    """A stream's tokens written to the client's connection from the fan-in's callback.

    Per token this skips the stream task's wake-up, its timer, the generators between the fan-in
    and the response, and the server's ``send``: the chunk is rendered (``render``, the stream's own
    renderer, so its state stays one) and written exactly as uvicorn's httptools protocol writes a
    body chunk (chunked transfer encoding) when its ``send`` would not wait. It is :meth:`ready` only
    for that protocol, once the response has started, and while the connection is open and not
    paused for flow control; otherwise the token goes through the task and ``send`` as before."""

    __slots__ = ("_cycle", "_render", "sent")

    def __init__(self, render: Callable[[TokenEvent], bytes]) -> None:
        self._render = render
        self._cycle: Any = None
        self.sent = 0  # tokens written this way

    def attach(self, send: Send) -> None:
        """The response has started on ``send``'s connection. Not attached (every token through the
        task) unless it is that protocol's and has all this reads, so another uvicorn's differences
        make this slower, not wrong."""
        cycle: Any = getattr(send, "__self__", None)
        if (
            type(cycle).__module__ == HTTPTOOLS_CYCLE
            and getattr(cycle, "chunked_encoding", None) is True
            and all(hasattr(cycle, a) for a in ("disconnected", "response_complete", "transport", "flow"))
            and hasattr(cycle.flow, "write_paused")
        ):
            self._cycle = cycle

    def detach(self) -> None:
        self._cycle = None

    def ready(self) -> bool:
        cycle = self._cycle
        return (
            cycle is not None
            and not cycle.flow.write_paused
            and not cycle.disconnected
            and not cycle.response_complete
            and not cycle.transport.is_closing()
        )

    def send(self, event: TokenEvent) -> None:
        """Render and write ``event``. A render that fails leaves its renderer as it was; an open
        transport's ``write`` does not raise (a failed socket reports through ``connection_lost``)."""
        body = self._render(event)
        self._cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        self.sent += 1


class GatewayApp(FastAPI):
    """FastAPI, with the server's own ``send`` in the scope for :class:`SSEResponse`'s events."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: Mapping[str, str],
        direct: ClientWrites | None = None,
        unstarted: Callable[[], None] | None = None,
    ) -> None:
        self.events = events
        self.direct = direct
        # Called if the response ends before its events were first asked for (the client left, or
        # the server stopped it, at the status line): a generator closed unstarted runs none of its
        # cleanup, so what was taken for it (a subscription, an attach) is let go by this instead.
        self.unstarted = unstarted
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        streaming = True
        gone = began = False

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
            if self.direct is not None:
                self.direct.attach(out)
            ended = False
            began = True
            async for chunk in self.events:
                if gone:  # its cancellation was lost (Python 3.11, in a Redis call: stopping.py)
                    return  # the events' cleanup (below) detaches the request
                ended = type(chunk) is LastChunk  # the events end with it
                await out({"type": "http.response.body", "body": chunk, "more_body": not ended})
            streaming = False
            if not ended:
                await out({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Our own cancellation, for the disconnect, ends the response quietly; any other one
            # (the server shutting down, even at the same moment) goes on up.
            if not gone or task.uncancel() > 0:
                raise
        finally:
            streaming = False
            await self._close(watcher, began)

    async def _close(self, watcher: asyncio.Task[None], began: bool) -> None:
        """After the response (or its end by a disconnect): no more direct writes, the disconnect
        listener stopped, the events closed (their cleanup runs here, in order; if they never began,
        ``unstarted`` stands in for it)."""
        if self.direct is not None:
            self.direct.detach()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        aclose = getattr(self.events, "aclose", None)
        if aclose is not None:
            await aclose()
        if not began and self.unstarted is not None:
            self.unstarted()
