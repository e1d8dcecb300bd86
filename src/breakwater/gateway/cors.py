"""Web pages of other origins: CORS for the HTTP API, an Origin check for the WebSocket.

Off by default: a page of another origin can then neither read an answer (no CORS headers) nor send
a JSON request without a preflight (gateway.errors: 415), nor open the WebSocket. With
``cors_allow_origins`` the listed origins (``*``: any) may do all three, sending the headers the
OpenAI SDKs send (``Authorization``, ``Idempotency-Key``, ``Last-Event-ID``, ...) and reading the
ones a client needs to resume or back off (``X-Breakwater-Request-Id``, ``Retry-After``, ...).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from breakwater.gateway.errors import error_body
from breakwater.gateway.middleware import refused
from breakwater.hosts import HostRule, normal_origin

EXPOSED = (
    "X-Request-ID",
    "X-Breakwater-Request-Id",
    "X-Breakwater-Model",
    "X-Breakwater-Cache",
    "X-Breakwater-Reason",
    "Retry-After",
    "retry-after-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
PREFLIGHT_MAX_AGE_S = 600


def add_cors(app: FastAPI, origins: list[str]) -> None:
    """The outermost middleware when ``origins`` is set: preflights answered, headers added. A
    request without an ``Origin`` header (any non-browser client) passes through untouched."""
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["*"],
        expose_headers=list(EXPOSED),
        max_age=PREFLIGHT_MAX_AGE_S,
    )


def websocket_origin_allowed(scope: Scope, origins: list[str]) -> bool:
    """A WebSocket handshake's ``Origin`` (browsers always send one; other clients, none): allowed
    when absent or listed (or ``*`` is). The gateway serves no pages of its own, so no origin is
    trusted by its ``Host`` (which a DNS-rebinding page would share): a page of any site not listed
    must not use the gateway through its visitor's browser (with auth off, or a key it holds)."""
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            origin = normal_origin(value.decode("latin-1"))
            return not origin or "*" in origins or origin in origins
    return True


UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class CrossSiteGuard:
    """Pure ASGI: a request that changes something (POST, DELETE) sent by a web page of an origin
    neither listed nor the gateway's own is a 403, whatever it is: the ones a page can send without
    a CORS preflight (a form's file upload, a body-less cancel) reach the gateway, and a gateway
    without keys would run them. Requests without an ``Origin`` (every non-browser client) and the
    gateway's own pages (``/docs`` without keys) pass."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE and "*" not in self.origins:
            origin = host = ""
            for name, value in scope["headers"]:
                if name == b"origin":
                    origin = normal_origin(value.decode("latin-1"))
                elif name == b"host":
                    host = value.decode("latin-1").lower()
            own = normal_origin(f"{urlsplit(origin).scheme}://{host}")  # the Host as an origin
            if origin and origin not in self.origins and origin != own:
                message = (
                    f"requests from web pages of {origin} are refused: the gateway's "
                    "cors_allow_origins lists it not"
                )
                await _refuse(send, 403, message, "cross_site_request")
                return
        await self.app(scope, receive, send)


class HostGuard:
    """Pure ASGI, outermost: an HTTP request for a name the gateway does not answer to (hosts.py: on
    a loopback listener, a DNS-rebinding page's) is a 421, before anything reads it. WebSockets need
    no such check: a rebinding page's handshake carries its Origin, which is not listed."""

    def __init__(self, app: ASGIApp, rule: HostRule) -> None:
        self.app = app
        self.rule = rule

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"host":
                    host = value.decode("latin-1")
                    if not self.rule.allows(host):
                        message = (
                            f"the gateway does not answer to the name {host!r}: a page of another site "
                            "may have been made to point at it (DNS rebinding). List the name in "
                            "allowed_hosts (BREAKWATER_ALLOWED_HOSTS) if it is the gateway's own"
                        )
                        refused(scope["method"], scope["path"], 421, "host_not_allowed", None)
                        await _refuse(send, 421, message, "host_not_allowed")
                        return
                    break
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    body = orjson.dumps(error_body(message, "invalid_request_error", code))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
