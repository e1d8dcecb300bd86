"""HTTP routes: OpenAI endpoints, request status/resume/cancel, health and metrics."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from breakwater.gateway.errors import APIError, JSONBody
from breakwater.gateway.fanin import GatewayDraining
from breakwater.gateway.service import GatewayService, Submission
from breakwater.gateway.sse import collect_response, sse_chunks
from breakwater.protocol.openai import ChatCompletionRequest, CompletionRequest

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def service(request: Request) -> GatewayService:
    svc: GatewayService = request.app.state.service
    return svc


def request_id(request: Request) -> str:
    return str(request.scope["state"]["request_id"])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    return await _complete(body, request, idempotency_key)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    return await _complete(body, request, idempotency_key)


async def _complete(
    body: ChatCompletionRequest | CompletionRequest, request: Request, idempotency_key: str | None
) -> Response:
    svc = service(request)
    sub = await svc.submit(body, request_id=request_id(request), idempotency_key=idempotency_key)
    headers = {"X-Breakwater-Request-Id": sub.rid}
    if body.stream:
        return StreamingResponse(
            _stream(svc, sub, 0), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
        )
    try:
        result = await collect_response(
            svc.events(sub), rid=sub.rid, model=sub.model, created=sub.created, chat=sub.chat
        )
    except GatewayDraining:
        svc.detach_later(sub.rid)
        raise APIError(
            503,
            f"this gateway is restarting; the request continues: GET /v1/requests/{sub.rid}/events",
            code="draining",
            headers={"Retry-After": "1", "X-Breakwater-Reason": "draining", **headers},
        ) from None
    except BaseException:
        svc.detach_later(sub.rid)
        raise
    return JSONBody(result, headers=headers)


async def _stream(svc: GatewayService, sub: Submission, after: int) -> Any:
    finished = False
    try:
        async for chunk in sse_chunks(
            svc.events(sub, after),
            rid=sub.rid,
            model=sub.model,
            created=sub.created,
            chat=sub.chat,
            include_usage=sub.include_usage,
            after=after,
        ):
            yield chunk
        finished = True
    except GatewayDraining:
        pass  # end the stream without [DONE]: the client resumes on another gateway (Last-Event-ID)
    finally:
        if not finished:
            svc.detach_later(sub.rid)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    models = await service(request).models(fresh=True)
    return {
        "object": "list",
        "data": [
            {
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": m.owned_by,
                "context_length": m.context_length,
                "max_model_len": m.context_length,
                "workers": m.workers,
            }
            for m in sorted(models.values(), key=lambda m: m.name)
        ],
    }


async def _record_or_404(svc: GatewayService, rid: str) -> dict[str, str]:
    record = await svc.broker.get_request(rid)
    if not record:
        raise APIError(404, f"request `{rid}` not found or expired", code="request_not_found", param="id")
    return record


@router.get("/v1/requests/{rid}")
async def request_status(rid: str, request: Request) -> dict[str, Any]:
    record = await _record_or_404(service(request), rid)
    usage = record.get("usage")
    return {
        "id": rid,
        "object": "breakwater.request",
        "model": record.get("model"),
        "lane": record.get("lane"),
        "status": record.get("status"),
        "attempt": int(record.get("attempt", "0")),
        "last_seq": int(record.get("seq", "0")),
        "completion_tokens": int(record.get("tokens", "0")),
        "finish_reason": record.get("finish_reason") or None,
        "usage": orjson.loads(usage) if usage else None,
        "created": int(record.get("created", "0")),
    }


@router.get("/v1/requests/{rid}/events", response_model=None)
async def request_events(
    rid: str,
    request: Request,
    after: Annotated[int | None, Query(ge=0)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """Resume a request's stream: everything after ``Last-Event-ID`` (or ``?after=``)."""
    svc = service(request)
    start = after if after is not None else 0
    if last_event_id is not None:
        if not last_event_id.isdigit():
            raise APIError(400, "Last-Event-ID must be a sequence number", param="Last-Event-ID")
        start = int(last_event_id)
    record = await _record_or_404(svc, rid)
    await svc.broker.attach(rid)
    sub = Submission(
        rid,
        record.get("model", ""),
        record.get("kind") == "chat",
        int(record.get("created", "0")),
        record.get("include_usage") == "1",
        await svc.fanin.subscribe(rid),
        duplicate=True,
    )
    return StreamingResponse(
        _stream(svc, sub, start),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, "X-Breakwater-Request-Id": rid},
    )


@router.delete("/v1/requests/{rid}")
async def cancel_request(rid: str, request: Request) -> dict[str, Any]:
    svc = service(request)
    await _record_or_404(svc, rid)
    await svc.broker.cancel(rid, svc.settings.result_ttl_s)
    record = await _record_or_404(svc, rid)
    return {"id": rid, "object": "breakwater.request", "status": record.get("status")}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> Response:
    svc = service(request)
    if svc.draining:
        return JSONBody({"status": "draining"}, status_code=503)
    try:
        await svc.broker.redis.ping()
    except Exception:
        return JSONBody({"status": "redis_unavailable"}, status_code=503)
    return JSONBody({"status": "ready"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
