"""A minimal, CPU-cheap fake OpenAI backend for proxy and gateway benchmarks.

A raw asyncio HTTP/1.1 server (keep-alive, Content-Length request bodies; uvloop when importable)
answering GET /v1/models, GET /health, POST /v1/completions and POST /v1/chat/completions. Every token
is the text " tok" (``--token``); a stream sends ``max_tokens`` of them (default 64), the first after
``--ttft-ms`` and each next after ``--itl-ms`` (0: all right after the first), then a finish_reason
"length" chunk, a usage chunk when ``stream_options.include_usage`` is true, and ``data: [DONE]``.
Timers are ``loop.call_at`` per stream, so thousands of concurrent streams stay cheap.

    python benchmarks/fake_openai.py --port 8001 [--ttft-ms 50 --itl-ms 10 --model fake]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any, cast

import orjson

TOKEN = " tok"
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Too Large"}
MAX_BODY = 16 << 20


@dataclass(frozen=True)
class Config:
    model: str
    ttft_s: float
    itl_s: float
    max_model_len: int = 4096
    token: str = TOKEN


def _frame(payload: bytes) -> bytes:
    """One chunked-transfer-encoding chunk holding one SSE event."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _prompt_tokens(body: dict[str, Any]) -> int:
    parts: list[str] = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts.extend(p for p in prompt if isinstance(p, str))
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
    return sum(len(p.split()) for p in parts)


class Stream:
    """One streamed response: its framed chunks are built once, timers only write them."""

    def __init__(self, conn: HttpConnection, cfg: Config, body: dict[str, Any], chat: bool) -> None:
        self.conn = conn
        self.cfg = cfg
        self.left = max(1, int(body.get("max_tokens") or 64))
        self.handle: asyncio.TimerHandle | None = None
        self.t0 = 0.0
        self.sent = 0
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{id(self):x}"
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": cfg.model,
        }

        def chunk(text: str | None, finish: str | None) -> bytes:
            if chat:
                delta = {"content": text} if text is not None else {}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _frame(orjson.dumps({**base, "choices": [choice]}))

        self.token = chunk(cfg.token, None)
        tail = chunk(None, "length")
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = _prompt_tokens(body)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": self.left,
                "total_tokens": prompt + self.left,
            }
            tail += _frame(orjson.dumps({**base, "choices": [], "usage": usage}))
        self.tail = tail + _frame(b"[DONE]") + b"0\r\n\r\n"

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.t0 = loop.time() + self.cfg.ttft_s
        self.handle = loop.call_at(self.t0, self.emit)

    def emit(self) -> None:
        transport = self.conn.transport
        if transport is None or transport.is_closing():
            return
        if self.sent == 0 and self.cfg.itl_s == 0:  # bursty: everything right after the first token
            transport.write(self.token * self.left + self.tail)
            self.conn.finished()
            return
        self.sent += 1
        if self.sent < self.left:
            transport.write(self.token)
            loop = asyncio.get_running_loop()
            self.handle = loop.call_at(self.t0 + self.sent * self.cfg.itl_s, self.emit)
        else:
            transport.write(self.token + self.tail)
            self.conn.finished()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class HttpConnection(asyncio.Protocol):
    """One client connection; requests are served one after the other (no pipelining overlap)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.stream.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.serve()

    def serve(self) -> None:
        while self.stream is None and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            length = int(headers.get("content-length", "0") or 0)
            if length > MAX_BODY or len(parts) != 3:
                self.close_after = True
                self.reply(413 if len(parts) == 3 else 400, {"error": {"message": "bad request"}})
                return
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            conn_hdr = headers.get("connection", "").lower()
            self.close_after = conn_hdr == "close" or (parts[2] == "HTTP/1.0" and conn_hdr != "keep-alive")
            self.handle(parts[0], parts[1].split("?", 1)[0], body)

    def handle(self, method: str, path: str, raw: bytes) -> None:
        if path in ("/health", "/health_generate", "/ping"):
            self.reply(200, None)
        elif path in ("/v1/models", "/models"):
            card = {"id": self.cfg.model, "object": "model", "created": 0, "owned_by": "fake"}
            self.reply(200, {"object": "list", "data": [card | {"max_model_len": self.cfg.max_model_len}]})
        elif path in ("/v1/completions", "/v1/chat/completions"):
            if method != "POST":
                self.reply(405, {"error": {"message": "POST only"}})
                return
            try:
                body = orjson.loads(raw)
                assert isinstance(body, dict)
            except (orjson.JSONDecodeError, AssertionError):
                self.reply(
                    400, {"error": {"message": "body is not a JSON object", "type": "invalid_request"}}
                )
                return
            self.generate(body, chat=path.endswith("chat/completions"))
        else:
            self.reply(404, {"error": {"message": f"no route {method} {path}"}})

    def generate(self, body: dict[str, Any], chat: bool) -> None:
        if body.get("stream"):
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\n"
                + (b"Connection: close\r\n" if self.close_after else b"")
                + b"\r\n"
            )
            self.stream = Stream(self, self.cfg, body, chat)
            self.stream.start()
            return
        n = max(1, int(body.get("max_tokens") or 64))
        prompt = _prompt_tokens(body)
        text = self.cfg.token * n
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        self.reply(
            200,
            {
                "id": f"cmpl-{id(body):x}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.cfg.model,
                "choices": [choice],
                "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n},
            },
        )

    def reply(self, status: int, payload: Any) -> None:
        assert self.transport is not None
        data = b"" if payload is None else orjson.dumps(payload)
        head = f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Length: {len(data)}\r\n"
        if payload is not None:
            head += "Content-Type: application/json\r\n"
        if self.close_after:
            head += "Connection: close\r\n"
        self.transport.write(head.encode() + b"\r\n" + data)
        if self.close_after:
            self.transport.close()

    def finished(self) -> None:
        self.stream = None
        if self.close_after and self.transport is not None:
            self.transport.close()
        elif self.buf:
            self.serve()


async def serve(host: str, port: int, cfg: Config) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HttpConnection(cfg), host, port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=10.0, help="0: all tokens right after the first")
    parser.add_argument("--token", default=TOKEN, help=f"every token's text (default {TOKEN!r})")
    args = parser.parse_args()
    cfg = Config(args.model, args.ttft_ms / 1000, args.itl_ms / 1000, token=args.token)
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port, cfg))
    except ImportError:
        asyncio.run(serve(args.host, args.port, cfg))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
