"""A lean HTTP/1.1 response parser for the upstream's streamed answers (the ``openai`` engine's hot
path; :mod:`breakwater.engines.upstream_pool` keeps the connections).

Each connection is one asyncio protocol that parses the response itself in ``data_received``
(status line, headers, then a chunked, sized or close-delimited body, RFC 9112) and hands every
network read's complete lines to the caller's callback at once: no reader task woken per read, no
stream buffer, no timer re-armed per read (a stalled read is found by one check per
``read_timeout_s``). Per token this costs about half of aiohttp's streaming read, and the request
goes out sooner.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from enum import Enum

MAX_HEAD = 64 << 10  # status line and headers; a chunk-size line or trailer section likewise
MAX_ERROR_BODY = 1 << 20  # a refusal's body is kept up to this

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


class UpstreamUnreachable(UpstreamHTTPError):
    """No connection could be made: the upstream is down (a sidecar restarting, loading its model)."""


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


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class Connection(asyncio.Protocol):
    """One keep-alive connection; it answers one request at a time."""

    def __init__(self, on_lost: Callable[[Connection], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_lost = on_lost
        self.closed = False
        self.reused = False
        self.sent_at = 0.0
        self.idle_since = 0.0
        self.on_end: Callable[[Connection], None] | None = None  # called once when its body ends
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
            self.fail(UpstreamHTTPError(f"connection closed before an answer: {why}"))
        elif self._state is not _State.DONE:
            self.fail(UpstreamHTTPError(f"connection closed mid-answer: {why}"))
        self._drop_caller()
        self.on_lost(self)

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self.got_any = True
        try:  # _guarded's, inline: this runs for every read of every answer
            self._parse(data)
        except Exception as exc:
            self.fail(exc)

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

    def spent(self) -> bool:
        """Never to be reused: closed, not kept alive, or its answer over (yet not idle)."""
        return self.closed or not self._keep or self._state is _DONE

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
            self.fail(exc)

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

    def fail(self, exc: BaseException) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        self._drop_caller()
        self.abort()
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)
