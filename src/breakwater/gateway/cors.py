"""Web pages of other origins: CORS for the HTTP API, an Origin check for the WebSocket.

Off by default: a page of another origin can then neither read an answer (no CORS headers) nor send
a JSON request without a preflight (gateway.errors: 415), nor open the WebSocket. With
``cors_allow_origins`` the listed origins (``*``: any) may do all three, sending the headers the
OpenAI SDKs send (``Authorization``, ``Idempotency-Key``, ``Last-Event-ID``, ...) and reading the
ones a client needs to resume or back off (``X-Breakwater-Request-Id``, ``Retry-After``, ...).
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Scope

from breakwater.config import normal_origin

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
