"""One exception type and one handler set mapping errors to OpenAI's error body."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from breakwater.broker.errors import TRANSIENT, reason
from breakwater.logs import refusal_var
from breakwater.protocol.validation import described

log = logging.getLogger(__name__)

INVALID_JSON = (  # orjson's rules
    "request body is not valid JSON (RFC 8259: no NaN, Infinity or lone surrogates; at most 1024 "
    "levels of nesting)"
)


class JSONBody(Response):
    """JSON response serialised with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# The errors the same request cannot cure by being sent again (cancelled, or a job that failed every
# worker it ran on, ...): they say `x-should-retry: false`, because the openai SDK retries every 409
# and 5xx (twice, by default) unless the answer says not to, and a retried POST is a new request.
FINAL_CODES = frozenset(
    {"cancelled", "max_attempts_exceeded", "request_shared", "file_in_use", "batch_not_cancellable"}
)


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields; a 400 without a
    code of its own is an ``invalid_value`` (of ``param``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code if code is not None or status != 400 else "invalid_value"
        self.param = param
        self.headers = dict(headers) if headers else {}
        if isinstance(self.code, str) and self.code in FINAL_CODES:
            self.headers["x-should-retry"] = "false"

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def unsupported(param: str) -> APIError:
    """A parameter this server does not implement: refused by name, never ignored."""
    return APIError(
        400,
        f"`{param}` is not supported by this server; remove it from the request",
        code="unsupported_parameter",
        param=param,
    )


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    refusal_var.set((code, param))  # the refused request's log line names them (gateway.middleware)
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(error: Mapping[str, Any]) -> tuple[str, str | None, str]:
    """A validation error as OpenAI's: its message (naming the parameter), the parameter and the code
    (protocol.validation)."""
    param, msg, code = described(error)
    if code == "invalid_json":
        return INVALID_JSON, None, code
    return (f"{param}: {msg}" if param else msg), param, code


NOT_JSON = "the request body must be JSON, sent with `Content-Type: application/json`"


def json_media(content_type: str | None) -> bool:
    """Whether a Content-Type says JSON (``application/json``, ``application/*+json``)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def not_json_response() -> JSONBody:
    """415 for a JSON endpoint's body sent without a JSON Content-Type: a page of any site can send
    such a POST without a CORS preflight (none, text/plain, a form), so it must never run."""
    body = error_body(NOT_JSON, "invalid_request_error", "unsupported_media_type", "Content-Type")
    return JSONBody(body, status_code=415)


def _not_json(request: Request, errors: Sequence[Any]) -> bool:
    """A JSON endpoint's body refused whole because it came without a JSON Content-Type (FastAPI
    from 0.132 parses a body as JSON only with one; before, ``body.StrictJSONRequest`` refuses)."""
    if not errors or tuple(errors[0].get("loc", ())) != ("body",):
        return False
    return not json_media(request.headers.get("content-type"))


def api_error_response(exc: APIError) -> JSONBody:
    return JSONBody(exc.body(), status_code=exc.status, headers=exc.headers)


def unavailable_response(exc: Exception) -> JSONBody:
    """Redis unreachable, full (OOM with noeviction), read-only (failover) or loading: nothing was
    admitted; the client retries after a second."""
    return JSONBody(
        error_body("the queue is unavailable; retry shortly", "service_unavailable", "redis_unavailable"),
        status_code=503,
        headers={"Retry-After": "1", "X-Breakwater-Reason": reason(exc)},
    )


def disconnected_response() -> JSONBody:
    """The client left while sending its body (an upload cut short: nothing of it was kept) or
    before its whole answer (the request is detached): nobody reads this; not the server's error."""
    message = "the client disconnected before it was answered"
    return JSONBody(error_body(message, "invalid_request_error", "client_disconnected"), status_code=400)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONBody:
        """A bug, not the client's: OpenAI's error shape still, with the request's X-Request-ID
        (this handler runs outside its middleware); the traceback goes to the log with it."""
        rid = str(request.scope.get("state", {}).get("request_id") or "")
        log.error("unexpected error", exc_info=exc, extra={"request_id": rid})
        return JSONBody(
            error_body("internal server error", "server_error", "internal_error"),
            status_code=500,
            headers={"X-Request-ID": rid} if rid else None,
        )

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> JSONBody:
        return disconnected_response()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONBody:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONBody:
        errors = exc.errors()
        if _not_json(request, errors):
            return not_json_response()
        message, param, code = invalid(errors[0]) if errors else ("invalid request", None, "invalid_value")
        return JSONBody(error_body(message, "invalid_request_error", code, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONBody:
        if exc.status_code == 415:
            return not_json_response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # no such route: as OpenAI says it
            message = f"Invalid URL ({request.method} {request.url.path})"
        return JSONBody(error_body(message, "invalid_request_error", code), status_code=exc.status_code)

    async def _redis_unavailable(_: Request, exc: Exception) -> JSONBody:
        return unavailable_response(exc)

    for exc_type in TRANSIENT:
        app.add_exception_handler(exc_type, _redis_unavailable)
