"""The lean HTTP/1.1 client of the ``openai`` engine's streamed answers, against a real asyncio
server that answers each request with scripted bytes: every body framing, reads split anywhere,
keep-alive reuse, a stale pooled connection, refusals, failures, a stalled read, cancellation."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from breakwater.engines.upstream_http import UpstreamHTTPError
from breakwater.engines.upstream_pool import STALE_S, Origin, StreamClient

Script = Callable[["Served"], list[bytes]]  # the request → the writes of its answer


@dataclass
class Served:
    """One request as the server read it, and the connection it came on."""

    head: bytes
    body: bytes
    conn: int


@dataclass
class ScriptedServer:
    answers: list[Script]
    requests: list[Served] = field(default_factory=list)
    connections: int = 0
    closed_by_client: list[int] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    close_after: bool = False  # close each connection after its answer
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client.append(conn)
                    return
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                served = Served(head, await reader.readexactly(length), conn)
                self.requests.append(served)
                for piece in self.answers.pop(0)(served):
                    if piece == b"<hold>":
                        await self.hold.wait()
                        continue
                    if piece == b"<close>":
                        return
                    if piece == b"<abort>":  # a reset (RST), not a close
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.transport.abort()
                        return
                    if piece == b"<pause>":  # longer than a stale connection's retry window
                        await asyncio.sleep(4 * STALE_S)
                        continue
                    if piece == b"<eof>":
                        if await reader.read() == b"":
                            self.closed_by_client.append(conn)
                        return
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.001)  # a read each
                if self.close_after:
                    return
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[ScriptedServer, str]]:
    scripted = ScriptedServer([])
    srv = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield scripted, f"http://127.0.0.1:{port}/v1"
    scripted.hold.set()
    srv.close()


def sse(*events: bytes) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events)


def chunked(*pieces: bytes) -> list[bytes]:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return [head, *(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces), b"0\r\n\r\n"]


class Lines:
    """An ``on_lines`` that records every read's lines; done at ``data: [DONE]``."""

    def __init__(self) -> None:
        self.reads: list[list[bytes]] = []

    def __call__(self, lines: list[bytes]) -> bool:
        self.reads.append(lines)
        return b"data: [DONE]" in lines

    @property
    def data(self) -> list[bytes]:
        return [line for read in self.reads for line in read if line]


async def _answered(client: StreamClient, path: str = "/completions", *, pooled: bool = False) -> None:
    """One POST answered with EVENTS, whole; ``pooled``: then wait until its connection is back in
    the pool (once its body has ended)."""
    got = Lines()
    assert await client.post(path, b"{}", got) == (200, b"")
    assert got.data == EXPECTED
    if pooled:
        await _until(lambda: len(client._idle) == 1)


EVENTS = (b'{"n": 1}', b'{"n": 2, "text": "a\\u2028b"}', b'{"n": 3}', b"[DONE]")
EXPECTED = [b"data: " + e for e in EVENTS]


async def test_a_chunked_stream_gives_its_lines_and_the_request_is_what_was_sent(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    scripted.answers.append(lambda _: chunked(*(sse(e) for e in EVENTS)))
    client = StreamClient(url, {"Authorization": "Bearer k", "Content-Type": "application/json"})
    got = Lines()
    assert await client.post("/chat/completions", b'{"x": 1}', got) == (200, b"")
    assert got.data == EXPECTED
    assert len(got.reads) >= 2  # handed over per read, not at the end
    served = scripted.requests[0]
    assert served.head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in served.head
    assert b"\r\nAccept-Encoding: identity\r\n" in served.head
    assert f"\r\nHost: 127.0.0.1:{url.split(':')[2].split('/')[0]}\r\n".encode() in served.head
    assert served.body == b'{"x": 1}'
    client.close()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
async def test_reads_split_anywhere_give_the_same_lines(
    server: tuple[ScriptedServer, str], size: int
) -> None:
    scripted, url = server
    whole = b"".join(chunked(sse(EVENTS[0]) + sse(EVENTS[1]), sse(*EVENTS[2:])))
    scripted.answers.append(lambda _: [whole[i : i + size] for i in range(0, len(whole), size)])
    got = Lines()
    client = StreamClient(url, {})
    assert await client.post("/completions", b"{}", got) == (200, b"")
    assert got.data == EXPECTED
    client.close()


async def test_sized_and_close_delimited_bodies_end_with_their_last_unterminated_line(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    body = sse(*EVENTS[:2]) + b"data: [DONE]"  # no newline after the last line
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    scripted.answers.append(lambda _: [sized, body[:10], body[10:]])
    scripted.answers.append(lambda _: [b"HTTP/1.0 200 OK\r\n\r\n", body, b"<close>"])
    client = StreamClient(url, {})
    for _ in range(2):
        got = Lines()
        assert await client.post("/completions", b"{}", got) == (200, b"")
        assert got.data == [*EXPECTED[:2], b"data: [DONE]"]
    assert [r.conn for r in scripted.requests] == [1, 1]  # the sized answer's connection was kept
    client.close()


async def test_a_refusal_returns_its_status_and_whole_body_and_keeps_the_connection(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    error = b'{"error": {"message": "too long"}}'
    refusal = (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    scripted.answers.append(
        lambda _: [
            refusal,
            b"%x\r\n%s\r\n" % (7, error[:7]),
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(error) - 7, error[7:]),
        ]
    )
    scripted.answers.append(lambda _: [b"HTTP/1.1 100 Continue\r\n\r\n", *chunked(sse(*EVENTS))])
    client = StreamClient(url, {})
    got = Lines()
    assert await client.post("/completions", b"{}", got) == (400, error)
    assert got.reads == []
    assert await client.post("/completions", b"{}", got) == (200, b"")  # after a 100 Continue
    assert got.data == EXPECTED
    assert [r.conn for r in scripted.requests] == [1, 1]
    client.close()


async def test_keep_alive_reuses_one_connection_and_a_stale_one_is_retried_once_on_a_new_one(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    client = StreamClient(url, {})
    for _ in range(2):
        scripted.answers.append(lambda _: chunked(sse(*EVENTS)))
        await _answered(client, pooled=True)
    assert scripted.connections == 1
    # The server closes the idle connection, and the client has not read that yet when it sends.
    idle = client._idle[0]
    assert idle.transport is not None
    idle.transport.pause_reading()
    scripted.writers[0].close()
    await scripted.writers[0].wait_closed()
    asyncio.get_running_loop().call_soon(idle.transport.resume_reading)  # right after the send
    scripted.answers.append(lambda _: chunked(sse(*EVENTS)))
    got = Lines()
    assert await client.post("/completions", b"{}", got) == (200, b"")
    assert got.data == EXPECTED
    assert idle.closed
    assert [r.conn for r in scripted.requests] == [1, 1, 2]  # sent once each, never twice
    client.close()


async def test_a_connection_lost_mid_answer_fails_after_the_lines_it_gave(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    scripted.answers.append(lambda _: chunked(sse(EVENTS[0]), sse(EVENTS[1]))[:-1])  # no last chunk
    scripted.close_after = True
    client = StreamClient(url, {})
    got = Lines()
    with pytest.raises(UpstreamHTTPError, match="mid-answer"):
        await client.post("/completions", b"{}", got)
    assert got.data == EXPECTED[:2]
    assert len(scripted.requests) == 1  # not retried: the answer had begun
    client.close()


async def test_nothing_listening_is_a_connection_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    client = StreamClient(f"http://127.0.0.1:{port}/v1", {})
    with pytest.raises(UpstreamHTTPError, match="cannot connect"):
        await client.post("/completions", b"{}", Lines())


async def test_a_stalled_read_times_out_and_the_connection_is_closed(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    scripted.answers.append(lambda _: [chunked(sse(EVENTS[0]))[0], chunked(sse(EVENTS[0]))[1], b"<eof>"])
    client = StreamClient(url, {}, read_timeout_s=0.2)
    got = Lines()
    with pytest.raises(TimeoutError, match=r"no data from the upstream for 0\.2s"):
        await client.post("/completions", b"{}", got)
    assert got.data == EXPECTED[:1]
    await _until(lambda: scripted.closed_by_client == [1])
    client.close()


async def test_a_callback_error_propagates_and_closes_the_connection(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    scripted.answers.append(lambda _: [*chunked(sse(EVENTS[0]))[:2], b"<eof>"])

    def refuse(lines: list[bytes]) -> bool:
        raise ValueError("a bad line")

    client = StreamClient(url, {})
    with pytest.raises(ValueError, match="a bad line"):
        await client.post("/completions", b"{}", refuse)
    await _until(lambda: scripted.closed_by_client == [1])
    client.close()


async def test_cancelling_the_caller_closes_its_connection(server: tuple[ScriptedServer, str]) -> None:
    scripted, url = server
    scripted.answers.append(lambda _: [*chunked(sse(EVENTS[0]))[:2], b"<eof>"])
    client = StreamClient(url, {})
    got = Lines()
    task = asyncio.create_task(client.post("/completions", b"{}", got))
    await _until(lambda: bool(got.reads))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: scripted.closed_by_client == [1])  # the upstream sees the client leave
    client.close()


async def test_done_returns_at_once_and_the_connection_is_pooled_when_its_body_ends(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    writes = chunked(sse(*EVENTS))
    scripted.answers.append(lambda _: [*writes[:-1], b"<hold>", writes[-1]])
    scripted.answers.append(lambda _: chunked(sse(*EVENTS)))
    client = StreamClient(url, {})
    got = Lines()
    assert await client.post("/completions", b"{}", got) == (200, b"")  # before the body's end
    assert got.data == EXPECTED
    scripted.hold.set()  # now the last chunk comes, read in the background
    await _until(lambda: len(client._idle) == 1)
    got = Lines()
    assert await client.post("/completions", b"{}", got) == (200, b"")
    assert [r.conn for r in scripted.requests] == [1, 1]
    client.close()


async def test_a_compressed_answer_is_refused(server: tuple[ScriptedServer, str]) -> None:
    scripted, url = server
    scripted.answers.append(
        lambda _: [b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc"]
    )
    client = StreamClient(url, {})
    with pytest.raises(ValueError, match="compressed"):
        await client.post("/completions", b"{}", Lines())
    client.close()


def test_origins() -> None:
    assert Origin.of("http://h:8000/v1") == Origin("h", 8000, None, "/v1", "h:8000")
    tls = Origin.of("https://api.example.com/v1/")
    assert (tls.host, tls.port, tls.prefix, tls.authority, tls.tls is not None) == (
        "api.example.com",
        443,
        "/v1",
        "api.example.com",
        True,
    )
    assert Origin.of("http://[::1]:81").authority == "[::1]:81"
    with pytest.raises(ValueError, match="http"):
        Origin.of("ftp://h/v1")


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_last_chunk_whose_end_comes_later_still_leaves_the_connection_reusable(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    head, *chunks, _ = chunked(sse(*EVENTS))
    # The last chunk, a trailer and the closing empty line, each in a write of its own.
    scripted.answers.append(lambda _: [head, *chunks, b"0\r\n", b"X-Checksum: 1\r\n", b"\r\n"])
    scripted.answers.append(lambda _: chunked(sse(*EVENTS)))
    client = StreamClient(url, {})
    for _ in range(2):
        await _answered(client, pooled=True)
    assert [r.conn for r in scripted.requests] == [1, 1]
    client.close()


async def test_bytes_after_an_answer_keep_its_connection_out_of_the_pool(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    scripted.answers.append(
        lambda _: [b"".join(chunked(sse(*EVENTS))) + b"HTTP/1.1 408 Request Timeout\r\n\r\n"]
    )
    scripted.answers.append(lambda _: chunked(sse(*EVENTS)))
    client = StreamClient(url, {})
    for _ in range(2):
        await _answered(client)
    assert [r.conn for r in scripted.requests] == [1, 2]
    client.close()


async def test_a_bad_last_line_of_a_close_delimited_body_fails_at_once(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    scripted.answers.append(
        lambda _: [b"HTTP/1.0 200 OK\r\n\r\n", sse(EVENTS[0]) + b'data: {"trunc', b"<close>"]
    )

    def strict(lines: list[bytes]) -> bool:
        if any(line.startswith(b'data: {"trunc') for line in lines):
            raise ValueError("a truncated line")
        return False

    client = StreamClient(url, {}, read_timeout_s=30)
    with pytest.raises(ValueError, match="a truncated line"):
        await asyncio.wait_for(client.post("/completions", b"{}", strict), 5)  # not the read timeout
    client.close()


async def test_a_reset_ends_a_close_delimited_body_as_a_failure(server: tuple[ScriptedServer, str]) -> None:
    scripted, url = server
    scripted.answers.append(lambda _: [b"HTTP/1.0 200 OK\r\n\r\n", sse(EVENTS[0]), b"<abort>"])
    client = StreamClient(url, {})
    got = Lines()
    with pytest.raises(UpstreamHTTPError, match="mid-answer"):
        await client.post("/completions", b"{}", got)
    assert got.data == EXPECTED[:1]
    client.close()


async def test_a_reused_connection_closed_after_the_server_took_the_request_is_not_retried(
    server: tuple[ScriptedServer, str],
) -> None:
    scripted, url = server
    scripted.answers.append(lambda _: chunked(sse(*EVENTS)))
    scripted.answers.append(lambda _: [b"<pause>", b"<abort>"])  # read it, worked on it, died
    client = StreamClient(url, {})
    assert await client.post("/completions", b"{}", Lines()) == (200, b"")
    await _until(lambda: len(client._idle) == 1)
    with pytest.raises(UpstreamHTTPError, match="before an answer"):
        await client.post("/completions", b"{}", Lines())
    assert len(scripted.requests) == 2  # sent once: the caller decides whether to send it again
    client.close()


async def test_a_bodiless_answer_and_malformed_frames(server: tuple[ScriptedServer, str]) -> None:
    scripted, url = server
    scripted.answers.append(lambda _: [b"HTTP/1.1 204 No Content\r\n\r\n"])
    client = StreamClient(url, {})
    assert await asyncio.wait_for(client.post("/completions", b"{}", Lines()), 5) == (204, b"")
    for bad, why in [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n", "past its size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "Content-Length"),
        (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x"),
    ]:
        scripted.answers.append(lambda _, bad=bad: [bad, b"<eof>"])  # type: ignore[misc]
        with pytest.raises(ValueError, match=why):
            await asyncio.wait_for(client.post("/completions", b"{}", Lines()), 5)
    client.close()


TLS = Path(__file__).parent / "tls"  # a test CA and a certificate for 127.0.0.1 it signed (2000-2125)


@pytest.fixture
async def tls_server() -> AsyncIterator[tuple[ScriptedServer, str]]:
    scripted = ScriptedServer([])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(TLS / "server.pem", TLS / "server.key")
    srv = await asyncio.start_server(scripted.handle, "127.0.0.1", 0, ssl=context)
    port = srv.sockets[0].getsockname()[1]
    yield scripted, f"https://127.0.0.1:{port}/v1"
    srv.close()


async def test_https_with_a_trusted_certificate_streams_and_reuses_its_connection(
    tls_server: tuple[ScriptedServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted, url = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS / "ca.pem"))  # what the default context trusts
    client = StreamClient(url, {"Authorization": "Bearer k"})
    for _ in range(2):
        scripted.answers.append(lambda _: chunked(sse(*EVENTS)))
        await _answered(client, "/chat/completions", pooled=True)
    assert [r.conn for r in scripted.requests] == [1, 1]
    assert scripted.requests[0].head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    client.close()


async def test_https_refuses_a_certificate_it_does_not_trust(tls_server: tuple[ScriptedServer, str]) -> None:
    _, url = tls_server
    client = StreamClient(url, {})
    with pytest.raises(UpstreamHTTPError, match="CERTIFICATE_VERIFY_FAILED"):
        await client.post("/chat/completions", b"{}", Lines())
