"""Raw RESP connections for the hot paths: an :class:`asyncio.Protocol` parsed by hiredis, opened
with the same address, TLS and ACL user as the process's redis-py client.

redis-py's asyncio client spends ~150 us of CPU per command (pool, retry wrapper, timeouts, per
argument encoding, response callbacks); the token path cannot afford that per engine step or per
stream. :class:`PipelinedRedis` sends commands as they come on one connection and matches replies
in order, so concurrent callers share it without a pool. A blocking command stalls every command
behind it on its connection: a worker's blocking read for new jobs has a connection of its own;
the other blocking reads and everything off the hot path stay on redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | int | float


def error(reply: hiredis.ReplyError) -> Exception:
    """The redis-py exception for an error reply (``NOSCRIPT`` -> NoScriptError, ``OOM`` -> ...)."""
    exc: Exception = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return exc


class Wire(asyncio.Protocol):
    """One connection: bytes in, parsed replies out to ``on_reply``."""

    def __init__(self, on_reply: Callable[[Any], None]) -> None:
        self.on_reply = on_reply
        self.parser = hiredis.Reader(encoding="utf-8", errors="replace")
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.last_seen = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        self.parser.feed(data)
        try:
            while (reply := self.parser.gets()) is not False:
                self.on_reply(reply)
        except hiredis.ProtocolError as exc:
            self.abort(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self, why: Exception | None = None) -> None:
        if why is not None and not self.closed.done():
            self.closed.set_result(why)
        if self.transport is not None:
            self.transport.abort()


def text(value: Any) -> str:
    """A reply as text (the raw connection answers bytes, redis-py's client may answer str)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def raise_errors(replies: list[Any]) -> list[Any]:
    """``replies`` of a pipeline, unless one is an error reply: then that one is raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def command(*args: Arg) -> bytes:
    return bytes(hiredis.pack_command(args))  # type: ignore[arg-type]  # the stub says a 1-tuple


@dataclass(frozen=True)
class Endpoint:
    """Where a raw connection goes and how it opens: address (or unix socket), TLS, and the
    AUTH/SELECT commands a new connection sends first (as redis-py's client would)."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    tls: ssl.SSLContext | None = None
    hello: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def of(cls, redis: Redis) -> Endpoint:
        """The server ``redis`` talks to, with its TLS settings and ACL user."""
        pool = redis.connection_pool
        klass, kw = pool.connection_class, pool.connection_kwargs
        tls = None
        if issubclass(klass, SSLConnection):
            tls = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
            if kw.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        hello: list[tuple[str, ...]] = []
        if kw.get("password"):
            hello.append(
                ("AUTH", kw["username"], kw["password"]) if kw.get("username") else ("AUTH", kw["password"])
            )
        if kw.get("db"):
            hello.append(("SELECT", str(kw["db"])))
        path = kw["path"] if issubclass(klass, UnixDomainSocketConnection) else None
        return cls(kw.get("host", "localhost"), int(kw.get("port", 6379)), path, tls, tuple(hello))

    def at(self, host: str, port: int) -> Endpoint:
        """Another node of the same deployment (a cluster's): same TLS and user."""
        return replace(self, host=host, port=port, path=None)

    @property
    def address(self) -> str:
        return self.path or f"{self.host}:{self.port}"


def auth_commands(target: Redis | Endpoint) -> list[tuple[str, ...]]:
    """AUTH (and SELECT) as the redis-py client would send them on a new connection."""
    endpoint = target if isinstance(target, Endpoint) else Endpoint.of(target)
    return list(endpoint.hello)


async def open_wire(
    target: Redis | Endpoint, on_reply: Callable[[Any], None], timeout_s: float = 5.0
) -> Wire:
    """A connection to ``target`` (host/port, unix socket, TLS)."""
    loop = asyncio.get_running_loop()
    endpoint = target if isinstance(target, Endpoint) else Endpoint.of(target)
    wire = Wire(on_reply)
    if endpoint.path is not None:
        opening = loop.create_unix_connection(lambda: wire, endpoint.path)
    else:
        opening = loop.create_connection(lambda: wire, endpoint.host, endpoint.port, ssl=endpoint.tls)
    await asyncio.wait_for(opening, timeout_s)
    sock = wire.transport.get_extra_info("socket") if wire.transport else None
    if sock is not None and endpoint.path is None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return wire


class PipelinedRedis:
    """Commands on one raw connection, replies matched in order. Concurrent callers are pipelined
    for free. A lost connection fails every command pending on it with a ConnectionError (callers
    retry: the broker's scripts are idempotent); a reply later than ``timeout_s`` fails the
    connection. Each connection keeps its own queue of pending replies, so a reply can only ever
    answer a command sent on the same connection."""

    cluster = False

    def __init__(self, target: Redis | Endpoint, timeout_s: float | None = 10.0) -> None:
        self.endpoint = target if isinstance(target, Endpoint) else Endpoint.of(target)
        self.timeout_s = timeout_s
        self._wire: _Pipe | None = None
        self._connecting = asyncio.Lock()

    async def execute(self, *args: Arg) -> Any:
        (reply,) = await self.pipeline([args])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send ``commands`` in one write; their replies, an error reply as its exception (not raised)."""
        pipe = self._wire
        if pipe is None or pipe.failed is not None:  # a timed-out connection is replaced at once
            pipe = await self._connect()
        return await pipe.send(commands)

    async def broadcast(self, *args: Arg) -> None:
        """A command for every server (``SCRIPT LOAD``): here, the one."""
        await self.execute(*args)

    async def execute_at(self, key: str, *args: Arg) -> Any:
        """A command on the connection that wrote ``key`` (``WAIT``): here, the one."""
        return await self.execute(*args)

    async def aclose(self) -> None:
        pipe, self._wire = self._wire, None
        if pipe is not None:
            pipe.close(RedisConnectionError("closed"))

    async def _connect(self) -> _Pipe:
        async with self._connecting:
            if self._wire is not None and self._wire.failed is None:
                return self._wire
            pipe = _Pipe(self.timeout_s)
            try:
                pipe.wire = await open_wire(self.endpoint, pipe.on_reply)
            except (OSError, TimeoutError) as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
            pipe.wire.closed.add_done_callback(lambda _: self._lost(pipe))
            try:
                hello = list(self.endpoint.hello)
                if hello:
                    replies = await asyncio.wait_for(pipe.send(hello), self.timeout_s)
                    for reply in replies:
                        if isinstance(reply, Exception):
                            raise reply
            except BaseException:
                pipe.close(RedisConnectionError("connection setup failed"))
                raise
            self._wire = pipe
            return pipe

    def _lost(self, pipe: _Pipe) -> None:
        if self._wire is pipe:
            self._wire = None
        pipe.close(RedisConnectionError("connection to Redis lost"))


class _Pipe:
    """One connection and the replies it still owes, in order."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.wire: Wire | None = None
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.failed: Exception | None = None

    async def send(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        if self.failed is not None or self.wire is None:
            raise RedisConnectionError(f"connection to Redis lost: {self.failed}")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = [loop.create_future() for _ in commands]
        self.pending.extend((f, now) for f in futures)
        self.wire.write(b"".join(command(*c) for c in commands))
        if self.timeout_s is not None and self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout_s / 4, self._check)
        try:
            return [await f for f in futures]
        except BaseException:
            for f in futures:  # the rest fail too (their connection is gone): theirs is this error
                f.add_done_callback(_retrieved)
            raise

    def on_reply(self, reply: Any) -> None:
        if not self.pending:
            return
        future, _ = self.pending.popleft()
        if not future.done():
            future.set_result(error(reply) if isinstance(reply, hiredis.ReplyError) else reply)

    def close(self, exc: Exception) -> None:
        """Fail every pending command and drop the connection; a later send fails at once."""
        if self.failed is None:
            self.failed = exc
        pending, self.pending = self.pending, deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(exc)
        if self.wire is not None:
            self.wire.abort()

    def _check(self) -> None:
        """A reply overdue by ``timeout_s`` means a half-open connection: fail it and its commands."""
        self._watchdog = None
        if not self.pending or self.timeout_s is None:
            return
        if time.monotonic() - self.pending[0][1] > self.timeout_s:
            self.close(RedisTimeoutError("Timeout reading from Redis"))
            return
        self._watchdog = asyncio.get_running_loop().call_later(self.timeout_s / 4, self._check)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a failed reply's error as seen (asyncio logs one nobody retrieved, at ERROR)."""
    if not future.cancelled():
        future.exception()
