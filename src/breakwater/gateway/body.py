"""Request bodies: a size limit before anything is parsed, the caller authenticated before a route's
body is read, and strict JSON (RFC 8259) parsing.

Python's ``json`` accepts ``NaN``, ``Infinity`` and lone surrogates (``"\\ud800"``), which then fail
deep inside the gateway (a 500); orjson refuses them, so they are a 400 like any invalid JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from breakwater.gateway.auth import caller
from breakwater.gateway.errors import NOT_JSON, APIError, error_body, json_media


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            if not json_media(self.headers.get("content-type")):
                # FastAPI before 0.132 parses a body without a Content-Type as JSON: refused here
                # as from 0.132 on (errors.not_json_response), whatever FastAPI is installed.
                raise HTTPException(415, NOT_JSON)
            # orjson.JSONDecodeError is a json.JSONDecodeError: FastAPI answers it as invalid JSON.
            self._json = orjson.loads(await self.body())
        return self._json


class OrjsonRoute(APIRoute):
    """A route whose JSON body is parsed by orjson (strict, and several times faster), and read
    only once its caller is authenticated."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        # FastAPI reads and validates a body before it solves the dependencies: a keyless client's
        # invalid JSON was answered 400 instead of 401, and its megabytes parsed to answer it at all.
        authenticate = self.body_field is not None and _depends_on(self.dependant, caller)

        async def strict(request: Request) -> Response:
            if authenticate:
                await caller(request)  # the Caller dependency finds it in the request's state
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


def _depends_on(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return any(d.call is call or _depends_on(d, call) for d in dependant.dependencies)


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than {limit} bytes",
        code="request_too_large",
    )


class BodyLimitMiddleware:
    """Pure ASGI: refuse bodies over ``max_bytes`` (413) by Content-Length before reading, and while
    reading when the length is not declared (chunked), so no oversized body is ever buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: dict[str, int] | None = None) -> None:
        """``paths``: other limits for these paths (file uploads)."""
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.paths.get(scope["path"], self.max_bytes)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit() or int(value) > max_bytes:
                    drained = await _discard_body(receive)
                    await _send_error(send, too_large(max_bytes), close=not drained)
                    return
                break
        received = 0
        too_big = False

        async def limited() -> Message:
            nonlocal received, too_big
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    too_big = True  # the app fails to read its body; its answer is replaced below
                    raise too_large(max_bytes)
            return message

        async def answer(message: Message) -> None:
            if not too_big:
                await send(message)
            elif message["type"] == "http.response.start":
                drained = await _discard_body(receive)
                await _send_error(send, too_large(max_bytes), close=not drained)

        await self.app(scope, limited, answer)


async def _discard_body(receive: Receive, cap_bytes: int = 64 << 20, cap_s: float = 5.0) -> bool:
    """Read and drop what the client is still sending, up to a cap, before answering: a server that
    answers and closes with unread data in the socket makes the kernel reset the connection, and
    the client never sees the 413. True when the whole body was read."""
    read = 0
    deadline = asyncio.get_running_loop().time() + cap_s
    while read < cap_bytes:
        # asyncio.wait, not asyncio.timeout: on Python 3.11 the latter can leave a stray
        # cancellation in this (the request's) task when its deadline and the data coincide.
        receiving = asyncio.ensure_future(receive())
        remaining = deadline - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait({receiving}, timeout=max(0.0, remaining))
        if not done:
            receiving.cancel()
            return False
        message = receiving.result()
        if message["type"] != "http.request":
            return False
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


async def _send_error(send: Send, exc: APIError, *, close: bool) -> None:
    body = orjson.dumps(error_body(exc.message, exc.type, exc.code, exc.param))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # part of the body is still unread: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
