"""A lean HTTP/1.1 client for the upstream's streamed answers (the ``openai`` engine's hot path).

Each connection is one asyncio protocol that parses the response itself in ``data_received``
(status line, headers, then a chunked, sized or close-delimited body) and hands every network
read's complete lines to the caller's callback at once: no reader task woken per read, no stream
buffer, no timer re-armed per read (a stalled read is found by one check per ``read_timeout_s``).
Per token this costs about half of aiohttp's streaming read, and the request goes out sooner.
Connections are kept alive and reused; one reused connection that the server had closed meanwhile
is retried once on a new one, before any byte of an answer (so nothing is ever sent twice).

It speaks only what the upstream's POSTs need: ``http``/``https`` (verified TLS), no proxies, no
redirects, no compression (it asks for ``identity``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD = 64 << 10  # status line and headers
MAX_ERROR_BODY = 1 << 20  # a refusal's body, read whole
DRAIN_S = 5.0  # how long a finished answer's connection may take to end its body before it is closed

OnLines = Callable[[list[bytes]], bool]  # one read's complete lines; True: the answer is complete


class UpstreamHTTPError(ConnectionError):
    """The connection failed or closed before the answer was complete (retryable)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the upstream is: address, TLS, the base path (``/v1``) and the Host header."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    prefix: str
    authority: str

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port]/path, not {url!r}")
        tls = ssl.create_default_context() if parts.scheme == "https" else None
        port = parts.port or (443 if tls else 80)
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        authority = shown if port == (443 if tls else 80) else f"{shown}:{port}"
        return cls(host, port, tls, parts.path.rstrip("/"), authority)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it answers one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self._buf = b""
        self._head = True
        self.status = 0
        self._chunked = False
        self._left = -1  # a sized body's bytes still to come (-1: until the connection closes)
        self._chunk = 0  # bytes left in the current chunk, then its CRLF (chunked bodies)
        self._keep = True
        self._rest = b""  # an incomplete line
        self._error_body: list[bytes] = []
        self._on_lines: OnLines | None = None
        self._answer: asyncio.Future[int] | None = None
        self.on_end: Callable[[_Connection], None] | None = None  # called once its body has ended
        self._got_any = False
        self._complete = False  # the caller has its whole answer
        self._body_done = False
        self.last_read = time.monotonic()

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head and not self._got_any:
            self._fail(UpstreamHTTPError(f"connection closed before an answer: {exc or 'by the upstream'}"))
        elif self._left == -1 and not self._chunked and not self._head:
            self._end_body()  # a close-delimited body ends here
        else:
            self._fail(UpstreamHTTPError(f"connection closed mid-answer: {exc or 'by the upstream'}"))

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self._got_any = True
        try:
            if self._head:
                data = self._parse_head(self._buf + data)
                if self._head:
                    return
            if data:
                self._parse_body(data)
        except Exception as exc:  # a bad response, or the caller's callback refusing a line
            self._keep = False
            self._fail(exc)

    # -- one request -------------------------------------------------------------------------------
    def begin(self, request: bytes, on_lines: OnLines) -> asyncio.Future[int]:
        self._reset()
        self._on_lines = on_lines
        self._answer = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self._answer

    def idle(self) -> bool:
        """Free for the next request: the last body ended and the connection stays open."""
        return self._body_done and self._keep and not self.closed

    def abort(self) -> None:
        self._keep = False
        if self.transport is not None:
            self.transport.abort()

    def error_body(self) -> bytes:
        return b"".join(self._error_body)

    def _parse_head(self, buf: bytes) -> bytes:
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ValueError("the upstream's response headers are too large")
                self._buf = buf
                return b""
            lines = buf[:end].split(b"\r\n")
            buf = buf[end + 4 :]
            version, _, rest = lines[0].partition(b" ")
            if not version.startswith(b"HTTP/1."):
                raise ValueError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
            self.status = int(rest[:3])
            if 100 <= self.status < 200:
                continue  # 100 Continue and the like: the real answer follows
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            encoding = headers.get(b"content-encoding", b"identity")
            if encoding != b"identity":
                raise ValueError(f"the upstream compressed its answer ({encoding.decode()})")
            self._chunked = b"chunked" in headers.get(b"transfer-encoding", b"")
            if not self._chunked and b"content-length" in headers:
                self._left = int(headers[b"content-length"])
            connection = headers.get(b"connection", b"")
            persistent = version == b"HTTP/1.1" or b"keep-alive" in connection
            self._keep = persistent and b"close" not in connection
            if self._left == -1 and not self._chunked:
                self._keep = False  # the body ends when the connection does
            self._head = False
            self._buf = b""
            if self._left == 0:
                self._end_body()
            return buf

    def _parse_body(self, data: bytes) -> None:
        if not self._chunked:
            if self._left >= 0:
                data = data[: self._left]
                self._left -= len(data)
            self._take(data)
            if self._left == 0:
                self._end_body()
            return
        buf = self._buf + data if self._buf else data
        pieces: list[bytes] = []
        pos = 0
        end = len(buf)
        while pos < end:
            if self._chunk > 0:  # inside a chunk's data, then its CRLF
                take = min(self._chunk - 2, end - pos)
                if take > 0:
                    pieces.append(buf[pos : pos + take])
                    pos += take
                    self._chunk -= take
                if self._chunk <= 2:  # its CRLF, maybe split across reads
                    step = min(self._chunk, end - pos)
                    pos += step
                    self._chunk -= step
                continue
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                if end - pos > 1024:
                    raise ValueError("a bad chunk size line from the upstream")
                break
            size = int(buf[pos:line_end].split(b";", 1)[0], 16)
            pos = line_end + 2
            if size == 0:  # the last chunk; its trailers (if any) are not read
                self._buf = b""
                self._take(b"".join(pieces))
                self._end_body()
                return
            self._chunk = size + 2
        self._buf = buf[pos:]
        if pieces:
            self._take(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _take(self, data: bytes) -> None:
        if not data:
            return
        if self.status != 200:
            if sum(map(len, self._error_body)) < MAX_ERROR_BODY:
                self._error_body.append(data)
            return
        if self._complete or self._on_lines is None:
            return  # the rest after the answer's end ([DONE]): read and dropped
        *lines, self._rest = (self._rest + data).split(b"\n")
        if lines and self._on_lines(lines):
            self._complete = True
            self._check_done()

    def _end_body(self) -> None:
        self._body_done = True
        if self.status == 200 and self._rest and not self._complete and self._on_lines is not None:
            rest, self._rest = self._rest, b""
            self._complete = self._on_lines([rest])
        self._complete = True
        self._check_done()
        if not self._keep:
            self.abort()
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)

    def _check_done(self) -> None:
        if self._answer is None or self._answer.done():
            return
        if (self.status == 200 and self._complete) or self._body_done:
            self._answer.set_result(self.status)

    def _fail(self, exc: BaseException) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        self.abort()
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)


class StreamClient:
    """POSTs to one upstream, each answer's lines handed over per network read."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float | None = None,
        max_idle: int = 256,
    ) -> None:
        self.origin = Origin.of(base_url)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._fixed = (
            f"Host: {self.origin.authority}\r\nAccept: */*\r\nAccept-Encoding: identity\r\n{extra}"
        ).encode("latin-1")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._draining: dict[_Connection, asyncio.TimerHandle] = {}

    async def post(self, path: str, body: bytes, on_lines: OnLines) -> tuple[int, bytes]:
        """POST ``body`` to ``path`` (below the base URL). On 200, ``on_lines`` gets each read's
        complete lines (the last, unterminated one at the end) until it returns True or the body
        ends; returns (200, b""). Otherwise the answer's status and body, ``on_lines`` not called.
        Raises :class:`UpstreamHTTPError` (``ConnectionError``) or ``TimeoutError`` on a failed
        connection or a stalled read, ``ValueError`` on a malformed answer, and whatever
        ``on_lines`` raises."""
        request = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (
            (self.origin.prefix + path).encode("latin-1"),
            self._fixed,
            len(body),
            body,
        )
        conn = await self._acquire()
        try:
            try:
                status = await self._send(conn, request, on_lines)
            except UpstreamHTTPError:
                if not conn.reused or conn._got_any:
                    raise
                conn = await self._connect()  # the server closed it while idle: once more, on a new one
                status = await self._send(conn, request, on_lines)
        except BaseException:
            conn.abort()
            raise
        raw = conn.error_body() if status != 200 else b""
        self._release(conn)
        return status, raw

    async def _send(self, conn: _Connection, request: bytes, on_lines: OnLines) -> int:
        answer = conn.begin(request, on_lines)
        if self.read_timeout_s is None:
            return await answer
        loop = asyncio.get_running_loop()
        timeout = self.read_timeout_s
        timer: list[asyncio.TimerHandle] = []

        def check() -> None:
            if answer.done():
                return
            quiet = time.monotonic() - conn.last_read
            if quiet >= timeout:
                conn._fail(TimeoutError(f"no data from the upstream for {timeout:g}s"))
            else:
                timer[0] = loop.call_later(timeout - quiet, check)

        timer.append(loop.call_later(timeout, check))
        try:
            return await answer
        finally:
            timer[0].cancel()

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.idle():
                conn.reused = True
                return conn
            conn.abort()
        return await self._connect()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        origin = self.origin
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    _Connection,
                    origin.host,
                    origin.port,
                    ssl=origin.tls,
                    server_hostname=origin.host if origin.tls else None,
                )
        except OSError as exc:
            raise UpstreamHTTPError(f"cannot connect to {origin.authority}: {exc}") from exc
        return conn

    def _release(self, conn: _Connection) -> None:
        """Back to the pool once its body has ended; a finished answer whose body has not (the
        rest after [DONE]) is read on for up to ``DRAIN_S``, then pooled, or closed."""
        if conn.idle():
            self._pool(conn)
        elif conn._body_done or conn.closed or not conn._keep:
            conn.abort()
        else:
            conn.on_end = self._drained
            self._draining[conn] = asyncio.get_running_loop().call_later(DRAIN_S, conn.abort)

    def _drained(self, conn: _Connection) -> None:
        timer = self._draining.pop(conn, None)
        if timer is not None:
            timer.cancel()
        if conn.idle():
            self._pool(conn)
        else:
            conn.abort()

    def _pool(self, conn: _Connection) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.abort()

    def close(self) -> None:
        """Close every connection it keeps (answers in progress belong to their callers)."""
        for conn, timer in self._draining.items():
            timer.cancel()
            conn.abort()
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
        self._draining.clear()
