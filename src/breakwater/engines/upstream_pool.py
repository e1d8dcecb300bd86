"""The upstream's keep-alive pool (the ``openai`` engine's hot path): one request at a time per
connection (:mod:`breakwater.engines.upstream_http` parses each answer).

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
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from breakwater.engines.upstream_http import Connection, OnLines, UpstreamHTTPError, UpstreamUnreachable

DRAIN_S = 5.0  # how long a finished answer's connection may take to end its body before it is closed
KEEP_IDLE_S = 4.0  # a pooled connection idle longer is closed, not reused
STALE_S = 0.25  # a reused connection closed this soon after the send, with no answer, is retried


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
        self._idle: list[Connection] = []
        self._draining: dict[Connection, asyncio.TimerHandle] = {}

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

    async def _send(self, conn: Connection, request: bytes, on_lines: OnLines) -> int:
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
                conn.fail(TimeoutError(f"no data from the upstream for {timeout:g}s"))
            else:
                timer[0] = loop.call_later(timeout - quiet, check)

        timer.append(loop.call_later(timeout, check))
        try:
            return await answer
        finally:
            timer[0].cancel()

    async def _acquire(self) -> Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.idle() and now - conn.idle_since < KEEP_IDLE_S:
                conn.reused = True
                return conn
            conn.abort()
        return await self._connect()

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        origin = self.origin
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(self._lost),
                    origin.host,
                    origin.port,
                    ssl=origin.tls,
                    server_hostname=origin.host if origin.tls else None,
                )
        except TimeoutError as exc:
            raise UpstreamUnreachable(f"cannot connect to {origin.authority}: timed out") from exc
        except OSError as exc:
            raise UpstreamUnreachable(f"cannot connect to {origin.authority}: {exc}") from exc
        return conn

    def _release(self, conn: Connection) -> None:
        """Back to the pool once its body has ended; a finished answer whose body has not (the
        rest after [DONE]) is read on for up to ``DRAIN_S``, then pooled, or closed."""
        if conn.idle():
            self._pool(conn)
        elif conn.spent():
            conn.abort()
        else:
            conn.on_end = self._drained
            self._draining[conn] = asyncio.get_running_loop().call_later(DRAIN_S, conn.abort)

    def _drained(self, conn: Connection) -> None:
        timer = self._draining.pop(conn, None)
        if timer is not None:
            timer.cancel()
        if conn.idle():
            self._pool(conn)
        else:
            conn.abort()

    def _pool(self, conn: Connection) -> None:
        if len(self._idle) < self.max_idle:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.abort()

    def _lost(self, conn: Connection) -> None:
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
