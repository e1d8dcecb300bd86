"""A lean HTTP/1.1 client for the upstream's streamed answers (the ``openai`` engine's hot path).

Each connection is one asyncio protocol that parses the response itself in ``data_received``
(status line, headers, then a chunked, sized or close-delimited body, RFC 9112) and hands every
network read's complete lines to the caller's callback at once: no reader task woken per read, no
stream buffer, no timer re-armed per read (a stalled read is found by one check per
``read_timeout_s``). Per token this costs about half of aiohttp's streaming read, and the request
goes out sooner.

Connections are kept alive and reused once their body has ended exactly (a chunked body's trailer
section included); anything unexpected (bytes after the body, a malformed frame) closes one
instead. A pooled connection idle for ``KEEP_IDLE_S`` is not reused (servers close idle ones:
uvicorn after 5 s). A request on a reused connection that the server closes at once, before any
byte of an answer (it had closed it while idle and the close crossed our send), is sent once more
on a new connection; one that fails later is the caller's to retry.

It speaks only what the upstream's POSTs need: ``http``/``https`` (verified TLS), no proxies, no
redirects, no credentials in the URL (the engine sends its key as a header), no compression (it
asks for ``identity``).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

MAX_HEAD = 64 << 10  # status line and headers; a chunk-size line or trailer section likewise
MAX_ERROR_BODY = 1 << 20  # a refusal's body is kept up to this
DRAIN_S = 5.0  # how long a finished answer's connection may take to end its body before it is closed
KEEP_IDLE_S = 4.0  # a pooled connection idle longer is closed, not reused
STALE_S = 0.25  # a reused connection closed this soon after the send, with no answer, is retried

OnLines = Callable[[list[bytes]], bool]  # one read's complete lines; True: the answer is complete

_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,18}")


def _chunk_size(line: bytes) -> int:
    """A chunk-size line's size (its extensions ignored)."""
    size = line.partition(b";")[0].strip()
    if not _HEX.fullmatch(size):
        raise ValueError(f"a bad chunk size from the upstream: {line[:40]!r}")
    return int(size, 16)


class UpstreamHTTPError(ConnectionError):
    """The connection failed or closed before the answer was complete (retryable)."""


class _State(Enum):
    HEAD = 1
    SIZED = 2  # a Content-Length body
    UNTIL_CLOSE = 3  # a body that ends when the connection does
    CHUNK_SIZE = 4
    CHUNK_DATA = 5
    CHUNK_END = 6  # the CRLF after a chunk's data
    TRAILERS = 7  # after the last chunk: trailer lines, then an empty one
    DONE = 8


# The states the parse compares against on every read, as module globals (read faster than an Enum
# member, which is looked up on its class each time); code that runs once per answer uses _State.X.
_HEAD, _SIZED, _UNTIL_CLOSE = _State.HEAD, _State.SIZED, _State.UNTIL_CLOSE
_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END = _State.CHUNK_SIZE, _State.CHUNK_DATA, _State.CHUNK_END
_TRAILERS, _DONE = _State.TRAILERS, _State.DONE


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


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it answers one request at a time."""

    def __init__(self, on_lost: Callable[[_Connection], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_lost = on_lost
        self.closed = False
        self.reused = False
        self.sent_at = 0.0
        self.idle_since = 0.0
        self.on_end: Callable[[_Connection], None] | None = None  # called once when its body ends
        self._start(None)
        self._state = _State.DONE  # nothing asked yet: any byte now is unexpected

    def _start(self, on_lines: OnLines | None) -> None:
        self._state = _State.HEAD
        self._buf = b""
        self.status = 0
        self._left = 0  # bytes left of a sized body or of the current chunk's data
        self._keep = True
        self._rest = b""  # an incomplete line
        self._error_body: list[bytes] = []
        self._error_size = 0
        self._on_lines = on_lines
        self._answer: asyncio.Future[int] | None = None
        self.got_any = False
        self._complete = False  # the caller has its whole answer
        self.last_read = time.monotonic()

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        why = exc or "by the upstream"
        if self._state is _State.UNTIL_CLOSE and exc is None:
            self._guarded(self._end_body)  # a close-delimited body ends here
        elif self._state is _State.HEAD and not self.got_any:
            self._fail(UpstreamHTTPError(f"connection closed before an answer: {why}"))
        elif self._state is not _State.DONE:
            self._fail(UpstreamHTTPError(f"connection closed mid-answer: {why}"))
        self._drop_caller()
        self.on_lost(self)

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self.got_any = True
        try:  # _guarded's, inline: this runs for every read of every answer
            self._parse(data)
        except Exception as exc:
            self._fail(exc)

    # -- one request -------------------------------------------------------------------------------
    def begin(self, request: bytes, on_lines: OnLines) -> asyncio.Future[int]:
        self._start(on_lines)
        self._answer = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        self.sent_at = time.monotonic()
        return self._answer

    def idle(self) -> bool:
        """Free for the next request: the last body ended exactly and the connection stays open."""
        return (
            self._state is _State.DONE
            and self._keep
            and not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def abort(self) -> None:
        self._keep = False
        if self.transport is not None:
            self.transport.abort()

    def error_body(self) -> bytes:
        return b"".join(self._error_body)

    # -- parsing -----------------------------------------------------------------------------------
    def _guarded(self, step: Callable[..., None], *args: bytes) -> None:
        """Run a parsing step; a bad response, or the caller's callback refusing a line, fails the
        answer and closes the connection."""
        try:
            step(*args)
        except Exception as exc:
            self._fail(exc)

    def _parse(self, data: bytes) -> None:
        state = self._state
        if state is _DONE:
            raise ValueError("the upstream sent bytes after its answer")  # never reuse this one
        if state is _HEAD:
            data = self._parse_head(self._buf + data)
            if self._state is _DONE and data:  # bytes after a bodiless answer
                self.abort()
                return
        elif self._buf:
            data, self._buf = self._buf + data, b""
        if not data:
            return
        state = self._state
        if state is _SIZED:
            if len(data) > self._left:  # more than its Content-Length: the rest is not trusted
                data = data[: self._left]
                self._keep = False
            self._left -= len(data)
            self._take(data)
            if self._left == 0:
                self._end_body()
        elif state is _UNTIL_CLOSE:
            self._take(data)
        else:
            self._parse_chunks(data)

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
            code = rest[:3]
            if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit():
                raise ValueError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
            self.status = int(code)
            if 100 <= self.status < 200:
                continue  # 100 Continue and the like: the real answer follows
            break
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise ValueError(f"a malformed header line from the upstream: {line[:80]!r}")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        self._buf = b""
        self._frame(version, headers)
        return buf

    def _frame(self, version: bytes, headers: dict[bytes, list[bytes]]) -> None:
        """How the body ends (RFC 9112 §6.3), and whether the connection is kept after it."""
        encoding = b",".join(headers.get(b"content-encoding", []))
        if _tokens(encoding) not in ([], [b"identity"]):
            raise ValueError(f"the upstream compressed its answer ({encoding.decode('latin-1')})")
        connection = _tokens(b",".join(headers.get(b"connection", [])))
        self._keep = b"close" not in connection and (version == b"HTTP/1.1" or b"keep-alive" in connection)
        transfer = _tokens(b",".join(headers.get(b"transfer-encoding", [])))
        lengths = set(headers.get(b"content-length", []))
        if self.status in (204, 304):
            self._end_body()  # no body, whatever the headers say
        elif transfer:
            if transfer[-1] != b"chunked":
                raise ValueError(f"an unsupported transfer coding: {transfer[-1]!r}")
            if lengths:
                self._keep = False  # both framings: chunked wins, the connection is not trusted
            self._state = _State.CHUNK_SIZE
        elif lengths:
            (length,) = lengths if len(lengths) == 1 else (b"",)
            if not _DIGITS.fullmatch(length):
                raise ValueError(f"a bad Content-Length from the upstream: {length[:40]!r}")
            self._left = int(length)
            self._state = _State.SIZED
            if self._left == 0:
                self._end_body()
        else:
            self._keep = False  # the body ends when the connection does
            self._state = _State.UNTIL_CLOSE

    def _parse_chunks(self, buf: bytes) -> None:
        pieces: list[bytes] = []
        try:
            self._chunks(buf, pieces)
        finally:  # the text of whole chunks before a bad frame still counts
            if pieces:
                self._take(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if self._state is _DONE:
            self._end_body()

    def _chunks(self, buf: bytes, pieces: list[bytes]) -> None:
        pos, end = 0, len(buf)
        while pos < end:
            state = self._state
            if state is _CHUNK_DATA:
                take = min(self._left, end - pos)
                pieces.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _CHUNK_END
                continue
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                if end - pos > MAX_HEAD:
                    raise ValueError("a chunk-size or trailer line from the upstream is too long")
                self._buf = buf[pos:]
                return
            line = buf[pos:line_end]
            pos = line_end + 2
            if state is _CHUNK_SIZE:
                left = _chunk_size(line)
                stop = pos + left
                if left and buf[stop : stop + 2] == b"\r\n":
                    # The whole chunk is in this read: CHUNK_DATA and CHUNK_END in one pass (the
                    # state stays CHUNK_SIZE, whose _left is 0, as those two would leave it).
                    pieces.append(buf[pos:stop])
                    pos = stop + 2
                    continue
                self._left = left
                self._state = _CHUNK_DATA if left else _TRAILERS
            elif state is _CHUNK_END:
                if line:
                    raise ValueError("a chunk's data ran past its size")
                self._state = _CHUNK_SIZE
            elif not line:  # TRAILERS: the empty line ends the body
                self._state = _DONE
                if pos != end:
                    self._keep = False  # bytes after the answer: the connection is not reused
                self._buf = b""
                return
        self._buf = b""

    def _take(self, data: bytes) -> None:
        if self.status != 200:
            if self._error_size < MAX_ERROR_BODY:
                self._error_body.append(data)
                self._error_size += len(data)
            return
        if self._complete or self._on_lines is None:
            return  # the rest after the answer's end ([DONE]): read and dropped
        *lines, self._rest = (self._rest + data).split(b"\n")
        if lines and self._on_lines(lines):
            self._complete = True
            self._settle()

    def _end_body(self) -> None:
        self._state = _State.DONE
        if self.status == 200 and self._rest and not self._complete and self._on_lines is not None:
            rest, self._rest = self._rest, b""
            self._on_lines([rest])
        self._complete = True
        self._settle()
        self._drop_caller()
        if not self._keep:
            self.abort()
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)

    def _settle(self) -> None:
        answer = self._answer
        finished = (self.status == 200 and self._complete) or self._state is _State.DONE
        if answer is not None and not answer.done() and finished:
            answer.set_result(self.status)

    def _drop_caller(self) -> None:
        """Nothing of the last request outlives it on a pooled connection."""
        self._on_lines = None
        self._rest = b""

    def _fail(self, exc: BaseException) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        self._drop_caller()
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
            f"Host: {self.origin.authority}\r\nUser-Agent: breakwater\r\nAccept: */*\r\n"
            f"Accept-Encoding: identity\r\n{extra}"
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
                if not (conn.reused and not conn.got_any and time.monotonic() - conn.sent_at < STALE_S):
                    raise
                conn = await self._connect()  # closed while idle, crossing our send: once more
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
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.idle() and now - conn.idle_since < KEEP_IDLE_S:
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
                    lambda: _Connection(self._lost),
                    origin.host,
                    origin.port,
                    ssl=origin.tls,
                    server_hostname=origin.host if origin.tls else None,
                )
        except TimeoutError as exc:
            raise UpstreamHTTPError(f"cannot connect to {origin.authority}: timed out") from exc
        except OSError as exc:
            raise UpstreamHTTPError(f"cannot connect to {origin.authority}: {exc}") from exc
        return conn

    def _release(self, conn: _Connection) -> None:
        """Back to the pool once its body has ended; a finished answer whose body has not (the
        rest after [DONE]) is read on for up to ``DRAIN_S``, then pooled, or closed."""
        if conn.idle():
            self._pool(conn)
        elif conn.closed or not conn._keep or conn._state is _State.DONE:
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
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.abort()

    def _lost(self, conn: _Connection) -> None:
        """A connection closed (by either side): out of the pool at once."""
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        """Close every connection it keeps (answers in progress belong to their callers)."""
        for conn, timer in self._draining.items():
            timer.cancel()
            conn.abort()
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
        self._draining.clear()
