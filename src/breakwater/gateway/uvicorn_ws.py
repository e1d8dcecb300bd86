"""uvicorn's ``websockets`` protocol, but the gateway closes its open WebSockets when it drains."""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_impl import WebSocketProtocol


class GatewayWebSocket(WebSocketProtocol):
    def shutdown(self) -> None:
        """uvicorn fails every open WebSocket with 1012 as it begins to shut down. The gateway closes
        its own (1012 too) once the requests each follows have ended, or its stream grace is over
        (``GatewayService.begin_drain``); uvicorn waits for them to close. A connection still in its
        handshake is refused as before."""
        if not self.handshake_completed_event.is_set():
            super().shutdown()
        else:
            self.ws_server.closing = True
