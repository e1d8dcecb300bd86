"""A minimal HTTP/1.1 GET server for probes and ``/metrics`` on a port of their own, off the public
listener: one request per connection, bounded reads, no body. On a loopback address it answers to
loopback names and addresses only (hosts.py: a DNS-rebinding page's requests are refused)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from breakwater.hosts import host_rule

log = logging.getLogger(__name__)

Responder = Callable[[str, str], tuple[int, bytes, str]]  # (method, path) -> (status, body, type)
REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    421: "Misdirected Request",
    503: "Service Unavailable",
}


class PlainHTTP:
    def __init__(self, host: str, port: int, respond: Responder, name: str, allowed_hosts: str = "") -> None:
        self.host, self.port = host, port
        self.respond = respond
        self.name = name
        self.rule = host_rule(host, allowed_hosts)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        log.info(f"{self.name} http listening", extra={"fields": {"host": self.host, "port": self.port}})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5.0)
            host = ""
            while (line := await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                if len(line) > 8192:
                    return
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "host":
                    host = value.strip()
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2:
                return
            if self.rule is not None and not self.rule.allows(host):
                status, body, ctype = 421, b"this listener does not answer to that name", "text/plain"
            else:
                status, body, ctype = self.respond(parts[0], parts[1])
            head = (
                f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if parts[0] == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
