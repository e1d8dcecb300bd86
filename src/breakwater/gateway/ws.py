"""WebSocket API ``/v1/ws`` (DESIGN §5): OpenAI request bodies in, ``token``/``done``/``error`` events out.

Messages in: a chat (``messages``) or completion (``prompt``) body, or ``{"resume": id, "after": seq}``,
or ``{"cancel": id}``. Each request is followed in its own task; many may run on one socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from breakwater.gateway.errors import APIError, error_body
from breakwater.gateway.fanin import GatewayDraining
from breakwater.gateway.service import GatewayService, Submission
from breakwater.protocol.events import TokenEvent
from breakwater.protocol.openai import ChatCompletionRequest, CompletionRequest

router = APIRouter()
log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20


class _Connection:
    def __init__(self, ws: WebSocket, svc: GatewayService, request_id: str) -> None:
        self.ws = ws
        self.svc = svc
        self.request_id = request_id
        self.lock = asyncio.Lock()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.open = True

    async def send(self, message: dict[str, Any]) -> None:
        if not self.open:
            return
        async with self.lock:
            await self.ws.send_text(orjson.dumps(message).decode())

    async def error(self, message: str, code: str, request_id: str | None = None, status: int = 400) -> None:
        body = error_body(message, "invalid_request_error" if status < 500 else "server_error", code)
        await self.send({"type": "error", "request_id": request_id, "status": status, **body})

    async def handle(self, raw: str) -> None:
        if len(raw) > MAX_MESSAGE_BYTES:
            await self.error("message too large", "message_too_large")
            return
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self.error("message is not valid JSON", "invalid_json")
            return
        if not isinstance(data, dict):
            await self.error("message must be a JSON object", "invalid_message")
            return
        if "resume" in data:
            await self._resume(data)
        elif "cancel" in data:
            rid = str(data["cancel"])
            if await self.svc.broker.get_request(rid):
                await self.svc.broker.cancel(rid, self.svc.settings.result_ttl_s)
            else:
                await self.error(f"request `{rid}` not found", "request_not_found", rid, 404)
        else:
            await self._submit(data)

    async def _submit(self, data: dict[str, Any]) -> None:
        try:
            body: ChatCompletionRequest | CompletionRequest = (
                ChatCompletionRequest.model_validate(data)
                if "messages" in data
                else CompletionRequest.model_validate(data)
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ()))
            msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            await self.error(f"{param}: {msg}" if param else msg, "invalid_value")
            return
        try:
            sub = await self.svc.submit(body, request_id=self.request_id, idempotency_key=None)
        except APIError as exc:
            await self.error(exc.message, exc.code or "error", None, exc.status)
            return
        await self.send({"type": "created", "request_id": sub.rid, "model": sub.model})
        self._follow(sub, 0)

    async def _resume(self, data: dict[str, Any]) -> None:
        rid = str(data.get("resume"))
        after = data.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            await self.error("after must be a non-negative integer", "invalid_value", rid)
            return
        record = await self.svc.broker.get_request(rid)
        if not record:
            await self.error(f"request `{rid}` not found or expired", "request_not_found", rid, 404)
            return
        await self.svc.broker.attach(rid)
        sub = Submission(
            rid,
            record.get("model", ""),
            record.get("kind") == "chat",
            int(record.get("created", "0")),
            False,
            await self.svc.fanin.subscribe(rid),
            duplicate=True,
        )
        self._follow(sub, after)

    def _follow(self, sub: Submission, after: int) -> None:
        task = asyncio.create_task(self._pump(sub, after))
        self.tasks[sub.rid] = task
        task.add_done_callback(lambda _: self.tasks.pop(sub.rid, None))

    async def _pump(self, sub: Submission, after: int) -> None:
        finished = False
        try:
            async for event in self.svc.events(sub, after):
                await self.send(_event_message(sub.rid, event))
            finished = True
        except APIError as exc:
            await self.error(exc.message, exc.code or "error", sub.rid, exc.status)
            finished = True
        except (WebSocketDisconnect, RuntimeError, GatewayDraining):
            pass  # the client resumes (on this or another gateway) with {"resume": id, "after": seq}
        finally:
            if not finished:
                self.svc.detach_later(sub.rid)

    async def close(self) -> None:
        self.open = False
        for task in list(self.tasks.values()):
            task.cancel()
        for task in list(self.tasks.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _event_message(rid: str, event: TokenEvent) -> dict[str, Any]:
    message: dict[str, Any] = {"type": event.kind, "request_id": rid, "seq": event.seq}
    if event.kind == "token":
        message["text"] = event.text
    elif event.kind == "done":
        message["finish_reason"] = event.finish_reason
        message["usage"] = event.usage
    else:
        message["error"] = event.error
    return message


@router.websocket("/v1/ws")
async def websocket_endpoint(ws: WebSocket) -> None:
    svc: GatewayService = ws.app.state.service
    await ws.accept()
    conn = _Connection(ws, svc, str(ws.scope["state"]["request_id"]))
    svc.websockets.add(ws)
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                await conn.error("binary frames are not supported; send JSON text", "invalid_message")
                continue
            await conn.handle(text)
    except WebSocketDisconnect:
        pass
    finally:
        svc.websockets.discard(ws)
        await conn.close()
