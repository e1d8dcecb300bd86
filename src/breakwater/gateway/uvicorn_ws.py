"""uvicorn's ``websockets`` protocol, but the gateway closes its open WebSockets when it drains."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.websockets.websockets_impl import WebSocketProtocol

CUT_BEFORE_S = 2.0  # before uvicorn's graceful-shutdown timeout, a socket still open is cut (1012)


class GatewayWebSocket(WebSocketProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A close waits this long for the client's closing frame (10 s by default): a drain's
        # close must not outlast the shutdown's timeout because a client went silent.
        self.close_timeout = 1.0

    def shutdown(self) -> None:
        """uvicorn fails every open WebSocket with 1012 as it begins to shut down. The gateway closes
        its own (1012 too) once the requests each follows have ended, or its stream grace is over
        (``GatewayService.begin_drain``); a socket the gateway has not taken up yet (one still
        authenticating) is cut shortly before uvicorn's timeout. One still in its handshake is
        refused as before."""
        if not self.handshake_completed_event.is_set():
            super().shutdown()
            return
        self.ws_server.closing = True
        limit = self.config.timeout_graceful_shutdown
        if limit is not None:
            asyncio.get_running_loop().call_later(max(0.0, limit - CUT_BEFORE_S), self._cut)

    def _cut(self) -> None:
        if not self.transport.is_closing():
            super().shutdown()
