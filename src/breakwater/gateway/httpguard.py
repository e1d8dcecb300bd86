"""The public listener's limits on a request's head, which uvicorn's httptools protocol lacks.

httptools buffers a head (request line and headers) however long it grows and waits for its end
however long that takes: one unauthenticated connection sending a 64 MB header line, never ended,
held ~60 MB of the gateway's memory for as long as it stayed open. As nginx does
(``large_client_header_buffers``, ``client_header_timeout``), a head over :data:`MAX_HEAD_BYTES` is
answered 431 and its connection closed, and a connection whose head has not ended within
:data:`HEAD_TIMEOUT_S` of its start is closed, with a 408; a new connection that sends nothing is
closed after :data:`FIRST_BYTE_S` (as an idle keep-alive one), without an answer.

Per request this costs a length and a few attribute reads; a timer per connection (its wait for a
first byte), and one only while a head is incomplete at the end of a read (a head that arrives
whole, the common case, starts none).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

if TYPE_CHECKING:
    from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope

MAX_HEAD_BYTES = 64 << 10  # twice nginx's default 4 x 8 KiB
HEAD_TIMEOUT_S = 30.0  # nginx's client_header_timeout is 60 s
# A new connection's wait for its first byte: as long as an idle keep-alive connection's (cli._serve),
# so a proxy's connection opened ahead of use (a warm pool) is not closed before a load balancer's.
FIRST_BYTE_S = 75.0
LINGER_S = 2.0  # after a 431, how long the rest of the refused head is read (and dropped) at most


def _error(message: str, code: str) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    )


TOO_LARGE = _error(
    f"The request's line and headers are larger than {MAX_HEAD_BYTES} bytes.", "headers_too_large"
)
TOO_SLOW = _error(
    f"The request's line and headers did not arrive within {HEAD_TIMEOUT_S:g} s.", "request_timeout"
)


async def _too_large(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(TOO_LARGE)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 431, "headers": headers, "trailers": False})
    await send({"type": "http.response.body", "body": TOO_LARGE, "more_body": False})


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size limit and a read timeout on each request's head.

    While a head is incomplete, its size is the bytes of the reads since the one it began in (a
    length per read, no look at each byte), so the parser holds at most the limit and one read; a
    head that ends is measured once it has, only when the reads it came in could pass the limit."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S
    first_byte_s = FIRST_BYTE_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False  # between a message's first byte and the end of its headers
        self._head_bytes = 0  # of the reads after the one it began in, before this one
        self._read_bytes = 0  # this read's
        self._began_read = 0  # the read it began in (which may hold the previous message's body)
        self._begun_now = False  # a message began in this read
        self._waiting_first = False  # the timer is the connection's wait for its first byte
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = False  # refused: what the client still sends is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # From the connection's start: one that never sends a byte is closed too (nothing else in
        # uvicorn closes it before a first response arms the keep-alive timeout).
        self._head_timer = self.loop.call_later(self.first_byte_s, self._head_timed_out)
        self._waiting_first = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._read_bytes = len(data)
        self._begun_now = False
        super().data_received(data)
        # Counted after the parser has seen the read: a head that ended in it is not counted, nor
        # the body that followed it in the same read (a POST's head and first megabyte at once),
        # nor the read a head began in, which may end the previous message's body (pipelined): a
        # head incomplete is refused past the limit and one read at most.
        if self._in_head and not self.transport.is_closing():
            if not self._begun_now:
                self._head_bytes += len(data)
                if self._head_bytes > self.max_head_bytes:
                    self._refuse_head()
                    return
            if self._head_timer is None or self._waiting_first:  # a head begun: its own timeout
                self._stop_head_timer()
                self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes, self._began_read, self._begun_now = 0, self._read_bytes, True

    def on_headers_complete(self) -> None:
        # Before uvicorn's own: a WebSocket upgrade hands the connection on from within it.
        self._in_head = False
        self._stop_head_timer()
        if (
            self._began_read + self._head_bytes + self._read_bytes > self.max_head_bytes
            and self._head_size() > self.max_head_bytes
        ):
            # A head that ended in the read that took it past the limit: refused all the same,
            # through uvicorn's own request cycle (the parser goes on to the request's body).
            app, self.app = self.app, _too_large
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def _head_size(self) -> int:
        """The ended head's size near enough (its line ends and separators as the common ones)."""
        return len(self.url) + 16 + sum(len(name) + len(value) + 4 for name, value in self.headers) + 2

    def _stop_head_timer(self) -> None:
        self._waiting_first = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _answering(self) -> bool:
        """A request before this head has not been answered whole: its answer owns the connection."""
        return self.cycle is not None and not self.cycle.response_complete

    def _respond(self, status: int, body: bytes) -> None:
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(content))

    def _refuse_head(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        if self._answering() or not self.transport.can_write_eof():
            self.transport.close()
            return
        self._respond(431, TOO_LARGE)
        # The answer, then our end of the connection, and the client's rest read and dropped for a
        # while: closed with its data unread, the kernel would reset the connection, and a client
        # still writing its head would see the reset instead of the 431 (nginx's lingering close).
        self.transport.write_eof()
        self._lingering = True
        self._head_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._answering():
            # A head begun behind an answer still going out (a pipelined request): the answer
            # ends whole, then the connection closes.
            self.cycle.keep_alive = False
            return
        if self._in_head:  # else not one byte came: closed without a word, as nginx does
            self._respond(408, TOO_SLOW)
        self.transport.close()
