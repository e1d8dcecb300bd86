"""The stateless gateway: OpenAI API over HTTP/SSE and WebSocket."""

from breakwater.gateway.app import build_app

__all__ = ["build_app"]
