"""Request heads on the public listener are bounded in size and time (gateway.httpguard): a client
sending a 64 MB header line, never ended, held ~60 MB of the gateway's memory per connection for as
long as it liked. A real uvicorn (uvloop, the guarded httptools protocol, the gateway's WebSocket
protocol) serves a small app on a free port in a thread; the tests talk raw HTTP to it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import uvicorn
from uvicorn.config import UvicornDeprecationWarning
from websockets.sync.client import connect as ws_connect

from breakwater.gateway.httpguard import MAX_HEAD_BYTES, GuardedHttpTools
from tests.helpers import wait_for

HEAD_TIMEOUT_S = 0.5
READ_TIMEOUT_S = 10.0  # any one read in a test: the deadline of a wait for the server


class QuickGuard(GuardedHttpTools):
    head_timeout_s = HEAD_TIMEOUT_S
    first_byte_s = 3 * HEAD_TIMEOUT_S


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """HTTP: the path and the number of headers, as JSON (``/slow``: after twice the head timeout;
    ``/late``: the body read after a while, so that the rest of it comes in one large read).
    WebSocket: an echo (``later``: after twice the head timeout)."""
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            if message["text"] == "later":
                await asyncio.sleep(2 * HEAD_TIMEOUT_S)
            await send({"type": "websocket.send", "text": "echo " + message["text"]})
        return
    if scope["path"] == "/late":  # reads its body late: uvicorn stops reading the socket meanwhile
        await asyncio.sleep(0.6 * HEAD_TIMEOUT_S)
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":
        await asyncio.sleep(2 * HEAD_TIMEOUT_S)
    body = orjson.dumps({"path": scope["path"], "headers": len(scope["headers"])})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def port() -> Iterator[int]:
    """The port of a uvicorn served as ``breakwater gateway`` serves (cli._serve), its head timeout
    short."""
    with warnings.catch_warnings():
        # uvicorn 0.55 deprecates (at import) its websockets protocol, which the gateway's extends.
        warnings.simplefilter("ignore", UvicornDeprecationWarning)
        from breakwater.gateway.uvicorn_ws import GatewayWebSocket
    config = uvicorn.Config(
        _app,
        loop="uvloop",
        http=QuickGuard,
        ws=GatewayWebSocket,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout_s=10, what="the server to start")
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S)


def _get(path: str, *headers: bytes) -> bytes:
    return b"".join(
        [f"GET {path} HTTP/1.1\r\nHost: gw\r\n".encode(), *(h + b"\r\n" for h in headers), b"\r\n"]
    )


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (with a Content-Length) read from ``sock``: status, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        assert chunk, f"closed before a whole response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (li.partition(":") for li in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(1 << 16)
        assert chunk, f"closed before a whole response body: {body!r}"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _closed(sock: socket.socket) -> bool:
    """The server closed its end (within READ_TIMEOUT_S), having sent nothing more."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_an_over_long_head_is_431_and_the_connection_closed(port: int) -> None:
    with _connect(port) as sock:
        # A header line of 1 MiB, never ended: the server answers once it has read past the limit.
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20))
        status, headers, body = _response(sock)
        assert status == 431, body
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert orjson.loads(body) == {
            "error": {
                "message": f"The request's line and headers are larger than {MAX_HEAD_BYTES} bytes.",
                "type": "invalid_request_error",
                "param": None,
                "code": "headers_too_large",
            }
        }
        assert _closed(sock)
    with _connect(port) as sock:  # the server serves on
        sock.sendall(_get("/v1/models"))
        status, _, body = _response(sock)
        assert status == 200 and orjson.loads(body) == {"path": "/v1/models", "headers": 1}, body


def test_a_whole_head_over_the_limit_at_once_is_431(port: int) -> None:
    with _connect(port) as sock:
        # Ended in the read that takes it past the limit (uvloop reads up to 256 KiB at once).
        url = b"/" + b"a" * (MAX_HEAD_BYTES // 2)
        sock.sendall(_get(url.decode(), b"X-Half: " + b"b" * (MAX_HEAD_BYTES // 2)))
        status, headers, body = _response(sock)
        assert (status, headers["connection"]) == (431, "close"), body
        assert orjson.loads(body)["error"]["code"] == "headers_too_large"
        assert _closed(sock)


def test_many_headers_under_the_limit_pass_and_the_next_head_on_the_connection_is_bounded(port: int) -> None:
    many = [f"X-Header-{i}: {'v' * 400}".encode() for i in range(120)]  # ~50 KiB
    with _connect(port) as sock:
        sock.sendall(_get("/first", *many))
        status, _, body = _response(sock)
        assert status == 200 and orjson.loads(body) == {"path": "/first", "headers": 121}, body
        sock.sendall(_get("/second"))  # keep-alive: the next head is bounded afresh
        assert orjson.loads(_response(sock)[2]) == {"path": "/second", "headers": 1}
        sock.sendall(_get("/third", *many, *many))  # ~100 KiB
        status, headers, _ = _response(sock)
        assert (status, headers["connection"]) == (431, "close")
        assert _closed(sock)


def test_a_body_read_with_its_head_is_not_counted_as_head(port: int) -> None:
    body = b"x" * (4 * MAX_HEAD_BYTES)
    with _connect(port) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        status, _, answer = _response(sock)
        assert status == 200 and orjson.loads(answer)["path"] == "/upload", answer


def test_an_unfinished_head_is_408_and_closed_after_the_timeout(port: int) -> None:
    with _connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        status, headers, body = _response(sock)
        waited_s = time.monotonic() - started
        assert status == 408, body
        assert headers["connection"] == "close"
        assert orjson.loads(body)["error"]["code"] == "request_timeout"
        assert _closed(sock)
    assert HEAD_TIMEOUT_S * 0.9 <= waited_s < READ_TIMEOUT_S / 2


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port: int) -> None:
    """After as long as an idle keep-alive connection is kept (first_byte_s), not the head timeout:
    a proxy's connection opened ahead of use is not closed before a load balancer's idle timeout."""
    with _connect(port) as sock:
        started = time.monotonic()
        assert _closed(sock)
    assert QuickGuard.first_byte_s * 0.9 <= time.monotonic() - started < READ_TIMEOUT_S


def test_a_pipelined_head_read_with_the_end_of_a_large_body_does_not_cut_its_answer(port: int) -> None:
    """The read that began the next head also held the rest of the previous request's body (read late,
    so in one large read): all of it was counted as head, refused past the limit, and the previous
    answer cut."""
    body = b"x" * 200_000
    with _connect(port) as sock:
        first = b"POST /late HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        sock.sendall(first + b"GET /next HTTP/1.1\r\nHost:")
        status, _, answer = _response(sock)
        assert status == 200 and orjson.loads(answer)["path"] == "/late", answer


def test_a_keep_alive_connections_next_head_has_the_timeout_too(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(_get("/slow"))  # answered after twice the head timeout: its head had ended
        assert _response(sock)[0] == 200
        sock.sendall(b"GET /next HTTP/1.1\r\nHost:")
        status, headers, _ = _response(sock)
        assert (status, headers["connection"]) == (408, "close")
        assert _closed(sock)


def test_a_partial_head_behind_a_slow_answer_lets_that_answer_end_whole(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(_get("/slow") + b"GET /next HTTP/1.1\r\nHost:")
        status, headers, body = _response(sock)
        assert status == 200 and orjson.loads(body)["path"] == "/slow"
        assert headers["connection"] == "close"  # the pipelined head ran out of time meanwhile
        assert _closed(sock)


def test_a_websocket_outlives_the_head_timeout(port: int) -> None:
    with ws_connect(f"ws://127.0.0.1:{port}/v1/ws", open_timeout=READ_TIMEOUT_S) as ws:
        ws.send("hi")
        assert ws.recv(timeout=READ_TIMEOUT_S) == "echo hi"
        ws.send("later")  # answered after twice the head timeout: the upgrade's head had ended
        assert ws.recv(timeout=READ_TIMEOUT_S) == "echo later"
