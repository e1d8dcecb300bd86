"""The completion endpoints' common case without FastAPI's per-request machinery.

Routing, dependency solving, the exception middleware's and the dependency exit stack's wrappers and
the route handler took about a fifth of the gateway's CPU per request (docs/benchmarks.md). A POST to
``/v1/chat/completions`` or ``/v1/completions`` whose body is a JSON object that validates, with its
headers within their limits, goes from the gateway's own middlewares (X-Request-ID, the body limit)
straight to the route's code; what that raises is answered by the same handlers as on FastAPI's path
(an unexpected error still reaches the server-error middleware: a 500). Anything else (another
content type, invalid JSON, a body that does not validate, an over-long header) goes on to FastAPI
with the body replayed, so every refusal of a malformed request is FastAPI's, unchanged.
"""

from __future__ import annotations

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from breakwater.broker.errors import TRANSIENT
from breakwater.gateway.auth import caller
from breakwater.gateway.cache import CacheControl
from breakwater.gateway.errors import (
    APIError,
    api_error_response,
    disconnected_response,
    json_media,
    unavailable_response,
)
from breakwater.gateway.routes import HEADER_MAX, complete
from breakwater.protocol.openai import ChatCompletionRequest, CompletionRequest

ROUTES: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
WANTED = (b"content-type", b"idempotency-key", b"cache-control")


class FastCompletions:
    """Pure ASGI, innermost of the gateway's middlewares; ``app`` is FastAPI's exception middleware
    and router, where every other request goes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if model is None:
            await self.app(scope, receive, send)
            return
        response: Response | None = None
        try:
            # The caller first: a request without a valid key is refused before its body is read
            # (a keyless client made the gateway parse megabytes of JSON to answer it 401).
            who = await caller(Request(scope, receive))
            body = await _read_body(receive)
        except APIError as exc:  # or over the body limit: its middleware answers 413 instead
            response = api_error_response(exc)
        except TRANSIENT as exc:
            response = unavailable_response(exc)
        if response is not None:
            await response(scope, receive, send)
            return
        if body is None:
            return  # the client left before it sent its body
        replay = _replay(body, receive)
        headers = _headers(scope)
        parsed = _parse(model, headers, body)
        if parsed is None:
            await self.app(scope, replay, send)
            return
        request = Request(scope, replay)
        try:
            response = await complete(
                parsed,
                request,
                who,
                headers.get(b"idempotency-key"),
                CacheControl.parse(headers.get(b"cache-control")),
            )
        except APIError as exc:
            response = api_error_response(exc)
        except ClientDisconnect:  # before its whole answer (gateway.whole)
            response = disconnected_response()
        except TRANSIENT as exc:
            response = unavailable_response(exc)
        await response(scope, replay, send)


def _headers(scope: Scope) -> dict[bytes, str]:
    """The first value of each header the routes read (Starlette's ``headers.get``)."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in WANTED and name not in found:
            found[name] = value.decode("latin-1")
    return found


def _parse(
    model: type[ChatCompletionRequest] | type[CompletionRequest], headers: dict[bytes, str], body: bytes
) -> ChatCompletionRequest | CompletionRequest | None:
    """The validated body, or None when FastAPI should see the request (to refuse it its way)."""
    # A body without a JSON Content-Type is FastAPI's to refuse (its strict_content_type): a browser
    # sends one without a CORS preflight from any page (a Blob without a type: no Content-Type).
    if not json_media(headers.get(b"content-type")):
        return None
    if any(len(headers.get(name, "")) > HEADER_MAX for name in (b"idempotency-key", b"cache-control")):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` with the body, already read, as its first message."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
