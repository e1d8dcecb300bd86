"""Pure ASGI middleware (never buffers SSE bodies): the X-Request-ID of every request and response,
and a log line for every request refused (4xx) or failed (5xx): method, path, status, the error's
code and parameter, and the caller's tenant and key id where its key was accepted (never the key)."""

from __future__ import annotations

import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from breakwater.logs import caller_var, refusal_var, request_id_var

log = logging.getLogger("breakwater.gateway.requests")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def valid_request_id(value: str | None) -> str:
    """The client's id when it is safe to log and forward, else a fresh one."""
    if value and _VALID_REQUEST_ID.match(value):
        return value
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        supplied = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                supplied = value.decode("latin-1")
                break
        request_id = valid_request_id(supplied)
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        caller, refusal = caller_var.set(None), refusal_var.set((None, None))  # this request's own
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept"):
                started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
                if message.get("status", 200) >= 400:
                    _refused(scope, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if not started and scope["type"] == "http":  # the server-error handler outside answers 500
                refused(scope.get("method"), scope.get("path"), 500, "internal_error", None)
            raise
        finally:
            request_id_var.reset(token)
            caller_var.reset(caller)
            refusal_var.reset(refusal)


def _refused(scope: Scope, status: int) -> None:
    code, param = refusal_var.get()
    refused(scope.get("method"), scope.get("path"), status, code, param)


def refused(
    method: str | None, path: str | None, status: int, code: str | None, param: str | None, rid: str = ""
) -> None:
    """The ``request refused`` line (also a WebSocket's error messages', method ``WEBSOCKET``)."""
    fields = {"method": method, "path": path, "status": status, "code": code}
    if param:
        fields["param"] = param
    level = logging.WARNING if status >= 500 else logging.INFO
    log.log(level, "request refused", extra={"fields": fields, "rid": rid or None})
