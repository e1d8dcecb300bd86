"""WebSocket API ``/v1/ws`` (DESIGN §5): OpenAI request bodies in, ``token``/``done``/``error`` events out.

Messages in: a chat (``messages``) or completion (``prompt``) body, or ``{"resume": id, "after": seq}``,
or ``{"cancel": id}``. Each request is followed in its own task; up to ``MAX_TASKS`` run on one socket.

With ``auth=keys`` the socket is authenticated by its ``Authorization: Bearer`` header or, for browsers
(which cannot set headers on a WebSocket), by a first message ``{"auth": key}`` answered with
``{"type": "authenticated"}``; otherwise the server sends a 401 error and closes with 1008.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from breakwater.broker.errors import TRANSIENT, reason
from breakwater.broker.fanin import GatewayDraining
from breakwater.gateway.auth import bearer
from breakwater.gateway.cache import HEADER, NO_CACHE
from breakwater.gateway.cors import websocket_origin_allowed
from breakwater.gateway.errors import APIError, error_body, invalid
from breakwater.gateway.following import RedisAway, RequestEnded, Submission
from breakwater.gateway.middleware import refused as log_refusal
from breakwater.gateway.service import GatewayService
from breakwater.gateway.sse import event_error
from breakwater.protocol.events import TokenEvent
from breakwater.protocol.openai import MAX_SEQ, ChatCompletionRequest, CompletionRequest
from breakwater.protocol.tools import call_id
from breakwater.stopping import report_stuck, stop_loops
from breakwater.tenancy import ANONYMOUS, Principal

router = APIRouter()
log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20  # the server (uvicorn ws_max_size) closes with 1009 above this, too
MAX_TASKS = 64  # requests followed at once on one socket
AUTH_TIMEOUT_S = 10.0  # for the first message's key, when the upgrade request had none
WS_METHOD = "WEBSOCKET"  # a socket's refusals in the log (gateway.middleware.refused)


class _Connection:
    def __init__(self, ws: WebSocket, svc: GatewayService, request_id: str, principal: Principal) -> None:
        self.ws = ws
        self.svc = svc
        self.request_id = request_id
        self.principal = principal
        self.lock = asyncio.Lock()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.open = True
        self.idle = asyncio.Event()  # no message being handled (a drain waits for one that is)
        self.idle.set()

    async def send(self, message: dict[str, Any]) -> None:
        if not self.open:
            return
        async with self.lock:
            await self.ws.send_text(orjson.dumps(message).decode())

    async def error(
        self,
        message: str,
        code: str,
        request_id: str | None = None,
        status: int = 400,
        param: str | None = None,
        refused: APIError | None = None,
    ) -> None:
        """An ``error`` message; for an ``APIError`` (``refused``) with its OpenAI type (a 429's
        ``rate_limit_error`` or ``insufficient_quota``) and when to retry (``retry_after_ms``)."""
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = error_body(message, refused.type if refused else kind, code, param)
        log_refusal(WS_METHOD, self.ws.url.path, status, code, param, request_id or "")
        sent: dict[str, Any] = {"type": "error", "request_id": request_id, "status": status, **body}
        if refused is not None and "retry-after-ms" in refused.headers:
            sent["retry_after_ms"] = int(refused.headers["retry-after-ms"])
        elif refused is not None and "Retry-After" in refused.headers:  # a full lane's, in seconds
            sent["retry_after_ms"] = int(refused.headers["Retry-After"]) * 1000
        await self.send(sent)

    async def handle(self, raw: str) -> None:
        self.idle.clear()
        try:
            await self._handle(raw)
        finally:
            self.idle.set()

    async def _handle(self, raw: str) -> None:
        if len(raw) > MAX_MESSAGE_BYTES:
            await self.error("message too large", "message_too_large")
            return
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self.error("message is not valid JSON (RFC 8259)", "invalid_json")
            return
        if not isinstance(data, dict):
            await self.error("message must be a JSON object", "invalid_message")
            return
        if "cancel" not in data and len(self.tasks) >= MAX_TASKS:
            message = f"at most {MAX_TASKS} requests at once on one socket"
            refused = APIError(429, message, type="rate_limit_error")
            await self.error(message, "too_many_requests", None, 429, refused=refused)
            return
        try:
            if "auth" in data:
                await self.error("this socket is already authenticated", "already_authenticated")
            elif "resume" in data:
                await self._resume(data)
            elif "cancel" in data:
                await self._cancel(str(data["cancel"]))
            else:
                await self._submit(data)
        except APIError as exc:
            rid = data.get("resume") or data.get("cancel")
            await self.error(
                exc.message, exc.code or "error", str(rid) if rid else None, exc.status, exc.param, exc
            )
        except TRANSIENT as exc:  # Redis unreachable, full or read-only: nothing was admitted
            await self.error(
                f"the queue is unavailable; retry shortly ({reason(exc)})", "redis_unavailable", None, 503
            )

    async def _cancel(self, rid: str) -> None:
        """Cancel ``rid``. A request this socket follows answers with its own last event (``error``,
        ``cancelled``); one it does not follow is answered ``{"type": "cancel", "request_id",
        "status"}``, its status after the cancel (``done`` when it had ended: nothing was cancelled)."""
        followed = rid in self.tasks  # (before: its task may end meanwhile, its last event sent)
        record = await self.svc.requests.cancel(rid, self.principal)
        if not followed:
            await self.send({"type": "cancel", "request_id": rid, "status": record.status.value})

    async def _submit(self, data: dict[str, Any]) -> None:
        try:
            body: ChatCompletionRequest | CompletionRequest = (
                ChatCompletionRequest.model_validate(data)
                if "messages" in data
                else CompletionRequest.model_validate(data)
            )
        except ValidationError as exc:
            message, param, code = invalid(exc.errors()[0])
            await self.error(message, code, param=param)
            return
        sub = await self.svc.submit(  # token events carry raw text: the model's own tool calls are HTTP's
            body, request_id=self.request_id, idempotency_key=None, principal=self.principal, auto_tools=False
        )
        if sub.cached and sub.rid in self.tasks:
            # An identical request this socket already follows: its events would carry the same id
            # twice. Generate this one on its own instead.
            await self.svc.requests.release(sub)
            sub = await self.svc.submit(
                body,
                request_id=self.request_id,
                idempotency_key=None,
                principal=self.principal,
                auto_tools=False,
                cache=NO_CACHE,
            )
        created: dict[str, Any] = {"type": "created", "request_id": sub.rid, "model": sub.model}
        if HEADER in sub.headers:  # hit, miss or bypass (gateway.cache)
            created["cache"] = sub.headers[HEADER]
        if sub.tool:  # the tokens are this call's arguments
            created["tool_call"] = {"id": call_id(sub.rid), "type": "function", "name": sub.tool}
        await self.send(created)
        await self._follow(sub, 0)

    async def _resume(self, data: dict[str, Any]) -> None:
        rid = str(data.get("resume"))
        after = data.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= MAX_SEQ:
            await self.error("after must be a non-negative integer", "invalid_value", rid)
            return
        self.svc.refuse_if_draining()
        await self._follow(await self.svc.requests.resume(rid, self.principal), after)

    async def _follow(self, sub: Submission, after: int) -> None:
        # A second follow of the same id on this socket replaces the first (the client asks again
        # from its own position), so no task is left orphaned and each event is sent once.
        previous = self.tasks.pop(sub.rid, None)
        if previous is not None:
            # Bounded: this loop also reads the socket's next messages, so it must never hang here.
            report_stuck(log, await stop_loops([previous], within_s=1.0))
        task = asyncio.create_task(self._pump(sub, after))
        self.tasks[sub.rid] = task
        task.add_done_callback(lambda t: self.tasks.pop(sub.rid) if self.tasks.get(sub.rid) is t else None)

    async def _pump(self, sub: Submission, after: int) -> None:
        me = asyncio.current_task()
        finished = False
        try:
            async with contextlib.aclosing(self.svc.requests.events(sub, after)) as events:
                async for event in events:
                    if self.tasks.get(sub.rid) is not me:
                        # Replaced by a later follow of the same id. Its cancellation should have
                        # ended this task, but one arriving inside a Redis call can be lost: never
                        # send twice.
                        return
                    await self.send(_event_message(sub.rid, event, sub.tool))
            finished = True
        except RequestEnded:  # resumed after its last event, which the client has
            message = f"request `{sub.rid}` has ended, and its events up to {after} include its last"
            await self.error(message, "request_finished", sub.rid)
            finished = True
        except APIError as exc:
            await self.error(exc.message, exc.code or "error", sub.rid, exc.status, refused=exc)
            finished = not isinstance(exc, RedisAway)  # that request goes on: let go of it
        except (WebSocketDisconnect, RuntimeError, GatewayDraining):
            pass  # the client resumes (on this or another gateway) with {"resume": id, "after": seq}
        finally:
            if not finished:
                self.svc.requests.detach_later(sub.rid, shared=sub.cached)

    async def drain(self, grace_s: float) -> None:
        """The gateway drains: the requests this socket follows run on for up to ``grace_s`` (the
        stream grace; new ones are refused meanwhile), then it closes with 1012 so that the client
        resumes the rest on another gateway."""
        if grace_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self.idle.wait()  # a request being admitted now is followed too
                    if self.tasks:
                        await asyncio.wait(list(self.tasks.values()))
        self.open = False  # nothing is sent after the close
        with contextlib.suppress(Exception):  # already closed or broken: nothing to tell
            await self.ws.close(code=1012, reason="gateway restarting; resume on another gateway")

    async def close(self) -> None:
        self.open = False
        # Cancelled again while one runs on (a cancellation inside a Redis call can be lost): with
        # the socket closed its sends do nothing, and it would follow its generation to the end.
        report_stuck(log, await stop_loops(list(self.tasks.values()), within_s=5.0))


def _event_message(rid: str, event: TokenEvent, tool: str) -> dict[str, Any]:
    message: dict[str, Any] = {"type": event.kind, "request_id": rid, "seq": event.seq}
    if event.kind == "token":
        message["text"] = event.text
        if event.logprobs is not None:  # asked for: OpenAI's chat entries, one per token of the text
            message["logprobs"] = event.logprobs
    elif event.kind == "done":
        reason = event.finish_reason
        message["finish_reason"] = "tool_calls" if tool and reason == "stop" else reason
        message["usage"] = event.usage
    else:  # with its HTTP status and OpenAI's whole error object, as the socket's own errors
        failed = event_error(event)
        message["status"] = failed.status
        fields = {"message": failed.message, "type": failed.type, "param": failed.param}
        message["error"] = {**fields, "code": failed.code}
    return message


async def _authenticate(ws: WebSocket, svc: GatewayService) -> tuple[Principal, str | None] | None:
    """The socket's caller and its key; None when it was refused (and closed)."""
    auth = svc.auth
    if not auth.enabled:
        return ANONYMOUS, None
    header = ws.headers.get("authorization")
    first_message = header is None
    try:
        key = await _auth_message(ws) if first_message else bearer(header)
        principal = await auth.principal(key)
    except APIError as exc:
        await _refuse(ws, exc)
        return None
    if first_message:
        await ws.send_text(orjson.dumps({"type": "authenticated", "tenant": principal.tenant}).decode())
    return principal, key


async def _refuse(ws: WebSocket, exc: APIError) -> None:
    """Say why (a 401 error message) and close with 1008."""
    body = exc.body()
    log_refusal(WS_METHOD, ws.url.path, exc.status, exc.code, exc.param)
    with contextlib.suppress(Exception):  # the client may be gone already
        await ws.send_text(
            orjson.dumps({"type": "error", "request_id": None, "status": exc.status, **body}).decode()
        )
        await ws.close(code=1008, reason="invalid API key")


async def _auth_message(ws: WebSocket) -> str | None:
    """The key of the socket's first message, ``{"auth": key}``; None when it is not one."""
    try:
        message = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT_S)
    except TimeoutError:
        return None
    text = message.get("text")
    if message["type"] != "websocket.receive" or text is None or len(text) > 4096:
        return None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    key = data.get("auth") if isinstance(data, dict) else None
    return key if isinstance(key, str) else None


@router.websocket("/v1/ws")
async def websocket_endpoint(ws: WebSocket) -> None:
    svc: GatewayService = ws.app.state.service
    if not websocket_origin_allowed(ws.scope, svc.settings.cors_origins):
        log_refusal(WS_METHOD, ws.url.path, 403, "origin_not_allowed", "Origin")
        await ws.close(1008, "this origin may not use the API (cors_allow_origins)")
        return  # before the handshake: the browser's page sees it fail (HTTP 403)
    await ws.accept()
    authenticated = await _authenticate(ws, svc)
    if authenticated is None:
        return
    principal, key = authenticated
    conn = _Connection(ws, svc, str(ws.scope["state"]["request_id"]), principal)
    if svc.draining:  # opened as the gateway began to drain, which passed it by
        await conn.drain(0)
        return
    svc.websockets.add(conn)
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                await conn.error("binary frames are not supported; send JSON text", "invalid_message")
                continue
            if svc.auth.enabled:  # every message: a key revoked (or expired) meanwhile ends the socket
                try:
                    conn.principal = await svc.auth.principal(key)
                except APIError as exc:
                    await _refuse(ws, exc)
                    break
            await conn.handle(text)
    except WebSocketDisconnect:
        pass
    finally:
        svc.websockets.discard(conn)
        await conn.close()
