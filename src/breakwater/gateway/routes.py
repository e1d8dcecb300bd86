"""HTTP routes: OpenAI endpoints, request status/resume/cancel, health and metrics.

Routes translate HTTP to service calls and back; they never reach the broker themselves."""

from __future__ import annotations

import time
from contextlib import aclosing
from datetime import date
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive

from breakwater.broker.fanin import GatewayDraining
from breakwater.broker.ledger import UsageRow, day_of
from breakwater.broker.record import RequestRecord, Status
from breakwater.gateway import choices
from breakwater.gateway.auth import caller
from breakwater.gateway.autotools import ToolChunks
from breakwater.gateway.body import OrjsonRoute
from breakwater.gateway.cache import DEFAULT_CONTROL, CacheControl
from breakwater.gateway.errors import APIError, JSONBody
from breakwater.gateway.following import RedisAway, RequestEnded, Submission
from breakwater.gateway.models import ModelInfo
from breakwater.gateway.service import GatewayService
from breakwater.gateway.sse import (
    ChoiceChunks,
    collect_response,
    ended_stream,
    renderer,
    sse_chunks,
    sse_event,
    token_event,
)
from breakwater.gateway.streaming import ClientWrites, LastChunk, SSEResponse, joined
from breakwater.gateway.whole import answered, restarting, unless_gone
from breakwater.protocol.embeddings import EmbeddingRequest, embedding_response, unpack
from breakwater.protocol.openai import MAX_SEQ, ChatCompletionRequest, CompletionRequest
from breakwater.rollout.aliases import VERSION_SEP
from breakwater.tenancy import Principal

router = APIRouter(route_class=OrjsonRoute)

HEADER_MAX = 256  # Idempotency-Key and Cache-Control values, at most
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
COALESCE_MAX = 64  # events per write at most
Caller = Annotated[Principal, Depends(caller)]
DATE = r"^\d{4}-\d{2}-\d{2}$"
MAX_USAGE_DAYS = 366


def service(request: Request) -> GatewayService:
    svc: GatewayService = request.app.state.service
    return svc


def request_id(request: Request) -> str:
    return str(request.scope["state"]["request_id"])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    who: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=HEADER_MAX)] = None,
    cache_control: Annotated[str | None, Header(max_length=HEADER_MAX)] = None,
) -> Response:
    return await complete(body, request, who, idempotency_key, CacheControl.parse(cache_control))


@router.post("/v1/embeddings", response_model=None)
async def embeddings(
    body: EmbeddingRequest,
    request: Request,
    who: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=HEADER_MAX)] = None,
    cache_control: Annotated[str | None, Header(max_length=HEADER_MAX)] = None,
) -> Response:
    """Embeddings: a short job through the same queue; the worker answers with packed vectors."""
    return await complete(body, request, who, idempotency_key, CacheControl.parse(cache_control))


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    who: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=HEADER_MAX)] = None,
    cache_control: Annotated[str | None, Header(max_length=HEADER_MAX)] = None,
) -> Response:
    return await complete(body, request, who, idempotency_key, CacheControl.parse(cache_control))


async def complete(
    body: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
    request: Request,
    who: Principal,
    idempotency_key: str | None,
    cache: CacheControl,
) -> Response:
    svc = service(request)
    xrid = request_id(request)
    if isinstance(body, EmbeddingRequest) or not body.stream:
        headers, result = await whole_answer(svc, body, xrid, who, idempotency_key, cache, request.receive)
        return JSONBody(result, headers=headers)
    last_event_id = _resuming(request, idempotency_key, body.choice_count())
    if body.choice_count() > 1:
        group = await svc.submit_choices(
            body, request_id=xrid, idempotency_key=idempotency_key, principal=who
        )
        if last_event_id is not None and group.choices[0].sub and group.choices[0].sub.duplicate:
            choices.release_all(svc, group)  # followed again from the client's position
            return await _resume_choices(svc, group.rid, len(group.choices), who, None, last_event_id)
        headers = {"X-Breakwater-Request-Id": group.rid, "X-Breakwater-Model": group.model, **group.headers}
        return SSEResponse(
            choices.stream(svc, group),
            headers={**SSE_HEADERS, **headers},
            unstarted=partial(choices.release_all, svc, group),
        )
    sub = await svc.submit(body, request_id=xrid, idempotency_key=idempotency_key, principal=who, cache=cache)
    # The model (version, when the client named an alias) the request runs on.
    headers = {"X-Breakwater-Request-Id": sub.rid, "X-Breakwater-Model": sub.model, **sub.headers}
    return _sse(svc, sub, int(last_event_id) if last_event_id and sub.duplicate else 0, headers)


def _resuming(request: Request, idempotency_key: str | None, n: int) -> str | None:
    """A stream's ``Last-Event-ID`` when its client sends the request again to resume it (as SSE
    clients of a POST reconnect): checked before anything is queued, and only with the
    ``Idempotency-Key`` that makes it the same request (whose stream then goes on after it)."""
    last = request.headers.get("last-event-id")
    if last is None:
        return None
    if idempotency_key is None:
        message = "Last-Event-ID resumes a request sent again with its Idempotency-Key (or GET its events)"
        raise APIError(400, message, param="Last-Event-ID")
    if n > 1:
        choices.parse_positions(last, n)
    elif not choices.is_seq(last):
        raise APIError(400, "Last-Event-ID must be a sequence number", param="Last-Event-ID")
    return last


async def whole_answer(
    svc: GatewayService,
    body: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
    xrid: str,
    who: Principal,
    idempotency_key: str | None,
    cache: CacheControl = DEFAULT_CONTROL,
    receive: Receive | None = None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """A non-streamed answer to ``body`` (its headers and body); a failed one raises its APIError.
    ``receive``: its client's, watched for a disconnect (disconnect.py)."""
    if not isinstance(body, EmbeddingRequest) and body.choice_count() > 1:
        return await _complete_choices(svc, body, xrid, who, idempotency_key, receive)
    sub = await svc.submit(body, request_id=xrid, idempotency_key=idempotency_key, principal=who, cache=cache)
    headers = {"X-Breakwater-Request-Id": sub.rid, "X-Breakwater-Model": sub.model, **sub.headers}
    collected = collect_response(
        svc.requests.events(sub),
        rid=sub.rid,
        model=sub.model,
        created=sub.created,
        chat=sub.chat,
        tool=sub.tool,
        tool_format=sub.tool_format,
        logprobs=sub.logprobs,
    )
    result = await answered(svc, sub, headers, collected, receive)
    if isinstance(body, EmbeddingRequest):
        result = _embeddings(body, result)
    return headers, result


async def _complete_choices(
    svc: GatewayService,
    body: ChatCompletionRequest | CompletionRequest,
    xrid: str,
    who: Principal,
    idempotency_key: str | None,
    receive: Receive | None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """``n > 1`` or several prompts, not streamed: one request per choice, merged (gateway.choices)."""
    group = await svc.submit_choices(body, request_id=xrid, idempotency_key=idempotency_key, principal=who)
    headers = {"X-Breakwater-Request-Id": group.rid, "X-Breakwater-Model": group.model, **group.headers}
    try:
        result = await unless_gone(receive, choices.collect(svc, group))
    except GatewayDraining:
        choices.detach_all(svc, group)
        raise restarting(group.rid, headers) from None
    except APIError as exc:
        choices.detach_all(svc, group)
        exc.headers = {**headers, **exc.headers}
        raise
    except BaseException:
        choices.detach_all(svc, group)
        raise
    return headers, result


def _embeddings(body: EmbeddingRequest, result: dict[str, Any]) -> dict[str, Any]:
    """The embedding response from the job's result (its one text event: the packed vectors)."""
    vectors = unpack(result["choices"][0]["text"])
    width = len(vectors[0]) if vectors else 0
    if body.dimensions is not None and body.dimensions > width:
        raise APIError(
            400,
            f"`dimensions` is {body.dimensions}; this model's embeddings have {width}",
            param="dimensions",
            code="invalid_value",
        )
    return embedding_response(body.model, vectors, result.get("usage"), body.encoding_format, body.dimensions)


def _sse(svc: GatewayService, sub: Submission, after: int, headers: dict[str, str]) -> SSEResponse:
    """A streamed response; its live tokens are written from the fan-in when they can be
    (streaming.ClientWrites), except where the model's tool calls are parsed from its text."""
    render = renderer(
        rid=sub.rid,
        model=sub.model,
        created=sub.created,
        chat=sub.chat,
        after=after,
        tool=sub.tool,
        tool_format=sub.tool_format,
    )
    direct = ClientWrites(partial(token_event, render)) if isinstance(render, ChoiceChunks) else None
    return SSEResponse(
        _stream(svc, sub, after, render, direct),
        headers={**SSE_HEADERS, **headers},
        direct=direct,
        unstarted=partial(svc.requests.release_later, sub),
    )


async def _stream(
    svc: GatewayService,
    sub: Submission,
    after: int,
    render: ChoiceChunks | ToolChunks,
    direct: ClientWrites | None,
) -> Any:
    finished = False
    # Events that are already buffered when one is rendered go out in the same write (under load a
    # reader wakes to several): one send through the ASGI stack and one syscall instead of many.
    live = sub.subscription
    pending: list[bytes] = []
    # The model's tool calls are parsed from the whole answer: a resume replays it (autotools).
    chunks = sse_chunks(
        svc.requests.events(sub, 0 if sub.tool_format else after, direct, keepalive=True),
        render,
        rid=sub.rid,
        model=sub.model,
        created=sub.created,
        chat=sub.chat,
        include_usage=sub.include_usage,
        keepalive_s=svc.settings.sse_keepalive_s,
    )
    try:
        async with aclosing(chunks):  # here, not by the loop's finalizer (sse_chunks)
            async for chunk in chunks:
                pending.append(chunk)
                if live is not None and live.next_is_ready() and len(pending) < COALESCE_MAX:
                    continue
                yield joined(pending)
                pending.clear()
        finished = True
    except GatewayDraining:
        pass  # end the stream without [DONE]: the client resumes on another gateway (Last-Event-ID)
    except APIError as exc:  # the status line is sent: say it as the stream's last event
        pending.append(LastChunk(sse_event(exc.body())))
        finished = not isinstance(exc, RedisAway)  # that request goes on: let go of it
    finally:
        if not finished:
            svc.requests.detach_later(sub.rid, shared=sub.cached)
        if direct is not None and direct.sent:
            svc.metrics.direct_events.inc(direct.sent)
    if pending:
        yield joined(pending)


@router.get("/v1/models")
async def list_models(request: Request, who: Caller) -> dict[str, Any]:
    return {"object": "list", "data": await _models(service(request), who)}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request, who: Caller) -> dict[str, Any]:
    """One entry of the list (OpenAI's ``models.retrieve``); a model the caller's key may not use is
    as unknown as one nobody serves."""
    for entry in await _models(service(request), who):
        if entry["id"] == model:
            return entry
    raise APIError(404, f"The model `{model}` does not exist or has no live worker.", code="model_not_found")


async def _models(svc: GatewayService, who: Principal) -> list[dict[str, Any]]:
    """Served models and versions (``version``/``base`` on a version), then aliases with their
    versions' weights; only what the caller's key may use."""
    aliases = await svc.versions.aliases(fresh=True)
    served = await svc.registry.models(fresh=True)
    data: list[dict[str, Any]] = []
    for m in sorted(served.values(), key=lambda m: m.name):
        if not who.may_use(m.name) or m.name in aliases:
            continue
        entry = _model_entry(m.name, m)
        base, _, version = m.name.partition(VERSION_SEP)
        if version:
            entry |= {"base": base, "version": version}
        data.append(entry)
    for name, alias in sorted(aliases.items()):
        if not who.may_use(name):
            continue
        weights = alias.weights_for(who.tenant)  # the caller's split: its own, or the alias's
        versions = [served[v] for v in weights if v in served and served[v].workers]
        context = min((v.context_length for v in versions), default=0)
        entry = _model_entry(name, ModelInfo(name, context, sum(v.workers for v in versions), 0, 0))
        entry["versions"] = [{"id": v, "weight": w} for v, w in weights.items()]
        entry["sticky"] = alias.sticky
        data.append(entry)
    return data


def _model_entry(name: str, m: ModelInfo) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": m.owned_by,
        "context_length": m.context_length,
        "max_model_len": m.context_length,
        "workers": m.workers,
        "features": sorted(m.features),
    }


@router.get("/v1/requests/{rid}")
async def request_status(rid: str, request: Request, who: Caller) -> dict[str, Any]:
    svc = service(request)
    n = await _group_size(svc, rid, who)
    if n:
        records = [await svc.requests.record(choices.choice_rid(rid, i), who) for i in range(n)]
        return {
            "id": rid,
            "object": "breakwater.request",
            "model": records[0].spec.model,
            "lane": records[0].spec.lane,
            "status": _group_status([r.status for r in records]).value,
            "choices": [
                {**_status(choices.choice_rid(rid, i), r), "index": i} for i, r in enumerate(records)
            ],
            "created": records[0].created,
        }
    return _status(rid, await svc.requests.record(rid, who))


def _status(rid: str, record: RequestRecord) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "breakwater.request",
        "model": record.spec.model,
        "lane": record.spec.lane,
        "status": record.status.value,
        "attempt": record.attempt,
        "last_seq": record.seq,
        "completion_tokens": record.tokens,
        "finish_reason": record.finish_reason,
        "usage": record.usage,
        "created": record.created,
    }


@router.get("/v1/requests/{rid}/events", response_model=None)
async def request_events(
    rid: str,
    request: Request,
    who: Caller,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """Resume a request's stream: everything after ``Last-Event-ID`` (or ``?after=``)."""
    svc = service(request)
    svc.refuse_if_draining()
    n = await _group_size(svc, rid, who)
    if n:
        return await _resume_choices(svc, rid, n, who, after, last_event_id)
    start = after if after is not None else 0
    if last_event_id is not None:
        if not choices.is_seq(last_event_id):
            raise APIError(400, "Last-Event-ID must be a sequence number", param="Last-Event-ID")
        start = int(last_event_id)
    sub = await svc.requests.resume(rid, who)
    return _sse(svc, sub, start, {"X-Breakwater-Request-Id": rid})


async def _group_size(svc: GatewayService, rid: str, who: Principal) -> int:
    """The number of choices when ``rid`` is a group (``n > 1`` or several prompts: it has no
    record of its own)."""
    if await svc.broker.exists(rid):
        return 0
    return await choices.group_size(svc, rid, who)


async def _resume_choices(
    svc: GatewayService, rid: str, n: int, who: Principal, after: int | None, last_event_id: str | None
) -> Response:
    if after:
        raise APIError(400, "resume an n > 1 request with Last-Event-ID (one seq per choice)", param="after")
    positions = choices.parse_positions(last_event_id, n) if last_event_id is not None else [0] * n
    try:
        group = await choices.resume(svc, rid, n, who, positions)
    except RequestEnded as ended:  # resumed after every choice's last event: as one choice's stream
        return SSEResponse(ended_stream(ended.done), headers={**SSE_HEADERS, "X-Breakwater-Request-Id": rid})
    return SSEResponse(
        choices.stream(svc, group, fresh=last_event_id is None),
        headers={**SSE_HEADERS, "X-Breakwater-Request-Id": rid},
        unstarted=partial(choices.release_all, svc, group),
    )


@router.delete("/v1/requests/{rid}")
async def cancel_request(rid: str, request: Request, who: Caller) -> dict[str, Any]:
    svc = service(request)
    n = await _group_size(svc, rid, who)
    if n:  # every choice
        statuses = [(await svc.requests.cancel(choices.choice_rid(rid, i), who)).status for i in range(n)]
        return {"id": rid, "object": "breakwater.request", "status": _group_status(statuses).value}
    record = await svc.requests.cancel(rid, who)
    return {"id": rid, "object": "breakwater.request", "status": record.status.value}


def _group_status(statuses: list[Status]) -> Status:
    """A group's status: running while any choice is not finished, else its worst ending."""
    for status in (Status.RUNNING, Status.QUEUED, Status.ERROR, Status.CANCELLED):
        if status in statuses:
            return status
    return Status.DONE


@router.get("/v1/usage")
async def usage(
    request: Request,
    who: Caller,
    start_date: Annotated[str | None, Query(pattern=DATE)] = None,
    end_date: Annotated[str | None, Query(pattern=DATE)] = None,
) -> dict[str, Any]:
    """The caller's tenant's usage per day and key (UTC days, inclusive; default: today)."""
    today = day_of(time.time())
    first, last = start_date or end_date or today, end_date or start_date or today
    try:
        span = (date.fromisoformat(last) - date.fromisoformat(first)).days
    except ValueError:
        raise APIError(
            400, "start_date and end_date must be dates (YYYY-MM-DD)", param="start_date"
        ) from None
    if not 0 <= span < MAX_USAGE_DAYS:  # the span counts days after the first: at most 366 in all
        raise APIError(
            400, f"end_date must be from start_date to {MAX_USAGE_DAYS - 1} days after it", param="end_date"
        )
    rows = await service(request).broker.ledger.usage(who.tenant, first, last)
    return {"object": "list", "tenant": who.tenant, "data": [usage_row(row) for row in rows]}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> Response:
    status = await service(request).ready()
    return JSONBody({"status": status}, status_code=200 if status == "ready" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    svc = service(request)
    if not svc.settings.public_metrics:  # it has its own listener (metrics_port), or none
        raise APIError(404, "Not Found", code="not_found")
    return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def usage_row(row: UsageRow) -> dict[str, Any]:
    c = row.counts
    return {
        "date": row.day,
        "key_id": row.key_id or None,
        "requests": {name: c[name] for name in ("completed", "error", "cancelled", "rejected")},
        "prompt_tokens": c["prompt_tokens"],
        "completion_tokens": c["completion_tokens"],
        "total_tokens": c["prompt_tokens"] + c["completion_tokens"],
    }
