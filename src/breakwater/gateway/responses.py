"""The Responses API's routes: create (whole, streamed, or in the background), retrieve (and resume
its stream), cancel. Each response is one chat request underneath (protocol.responses), so it is
queued, continued after a worker's crash and resumed on any gateway like any other; its id is the
request's, and ``GET /v1/requests/{id}`` works on it too."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError

from breakwater.broker.fanin import GatewayDraining
from breakwater.broker.record import RequestRecord, Status
from breakwater.gateway.autotools import auto_message
from breakwater.gateway.body import OrjsonRoute
from breakwater.gateway.errors import APIError, JSONBody
from breakwater.gateway.following import Submission
from breakwater.gateway.routes import HEADER_MAX, SSE_HEADERS, Caller, request_id, restarting, service
from breakwater.gateway.service import GatewayService
from breakwater.gateway.sse import collect_response, error_chunk, one_line, renderer
from breakwater.gateway.streaming import LastChunk, SSEResponse
from breakwater.protocol.events import TokenEvent
from breakwater.protocol.openai import MAX_SEQ, ChatCompletionRequest, chat_response
from breakwater.protocol.response_output import (
    STATUS,
    OutputEvents,
    assistant_message,
    output_items,
    response_object,
)
from breakwater.protocol.responses import InputError, ResponsesRequest, Stored, new_response_id, to_chat
from breakwater.protocol.toolformats import single_call
from breakwater.tenancy import Principal

router = APIRouter(route_class=OrjsonRoute)

# A chat parameter's name as the Responses API calls it (in a 400's `param`).
_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponsesRequest,
    request: Request,
    who: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=HEADER_MAX)] = None,
) -> Response:
    svc = service(request)
    sub, stored = await _admit(svc, body, request_id(request), who, idempotency_key)
    headers = {"X-Breakwater-Request-Id": sub.rid, "X-Breakwater-Model": sub.model, **sub.headers}
    if body.background:  # it runs on without a client (still counted as followed: never detached)
        if sub.subscription is not None:
            await svc.fanin.unsubscribe(sub.subscription)
        queued = response_object(
            sub.rid, stored, model=sub.model, created=sub.created, status="queued", output=[]
        )
        return JSONBody(queued, headers=headers)
    if body.stream:
        return SSEResponse(_stream(svc, sub, stored, -1), headers={**SSE_HEADERS, **headers})
    try:
        chat_body = await collect_response(
            svc.requests.events(sub),
            rid=sub.rid,
            model=sub.model,
            created=sub.created,
            chat=True,
            tool=sub.tool,
            tool_format=sub.tool_format,
            logprobs=sub.logprobs,
        )
    except GatewayDraining:
        svc.requests.detach_later(sub.rid, shared=sub.cached)
        raise restarting(sub.rid, headers) from None
    except APIError as exc:
        svc.requests.detach_later(sub.rid, shared=sub.cached)
        exc.headers = {**headers, **exc.headers}
        raise
    except BaseException:
        svc.requests.detach_later(sub.rid, shared=sub.cached)
        raise
    return JSONBody(_from_chat(sub, stored, chat_body), headers=headers)


def _refusal(body: ResponsesRequest) -> APIError | None:
    unsupported = body.unsupported_parameter()
    if unsupported is not None:
        return APIError(
            400,
            f"`{unsupported}` is not supported by this server; remove it from the request",
            code="unsupported_parameter",
            param=unsupported,
        )
    if body.background and body.store is False:
        return APIError(400, "a background response is stored: `store` cannot be false", param="store")
    if body.background and body.stream:
        return APIError(
            400, "stream a background response with GET /v1/responses/{id}?stream=true", param="stream"
        )
    return None


async def _admit(
    svc: GatewayService, body: ResponsesRequest, xrid: str, who: Principal, idempotency_key: str | None
) -> tuple[Submission, Stored]:
    """The response's chat request, queued (after the conversation of its previous response)."""
    svc.refuse_if_draining()
    refused = _refusal(body)
    if refused is not None:
        raise refused
    history = await _history(svc, body.previous_response_id, who) if body.previous_response_id else []
    try:
        chat, stored = to_chat(body, history)
        sub = await svc.submit(
            ChatCompletionRequest.model_validate(chat),
            request_id=xrid,
            idempotency_key=idempotency_key,
            principal=who,
            rid=new_response_id(),
            response=stored.to_json(),
        )
    except InputError as exc:
        raise APIError(400, str(exc), code=exc.code, param=exc.param) from None
    except ValidationError as exc:
        raise _invalid(exc) from None
    except APIError as exc:
        raise _renamed(exc) from None
    return sub, stored


@router.get("/v1/responses/{response_id}", response_model=None)
async def retrieve_response(
    response_id: str,
    request: Request,
    who: Caller,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
) -> Response:
    """The response as it stands; ``stream=true``: its events (after ``starting_after``), live
    while it runs: a client that lost its stream resumes it here, on any gateway."""
    svc = service(request)
    record, stored = await _stored(svc, response_id, who)
    if stream:
        svc.refuse_if_draining()
        sub = await svc.requests.resume(response_id, who)
        after = -1 if starting_after is None else starting_after
        headers = {**SSE_HEADERS, "X-Breakwater-Request-Id": response_id}
        return SSEResponse(_stream(svc, sub, stored, after), headers=headers)
    return JSONBody(await _snapshot(svc, response_id, record, stored))


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request, who: Caller) -> Response:
    svc = service(request)
    await _stored(svc, response_id, who)
    record = await svc.requests.cancel(response_id, who)
    return JSONBody(await _snapshot(svc, response_id, record, Stored.from_json(record.spec.response)))


async def _stored(svc: GatewayService, rid: str, who: Principal) -> tuple[RequestRecord, Stored]:
    """The caller's stored response (404 otherwise: another tenant's, expired, a plain chat's, or
    one asked not to be stored)."""
    record = await svc.requests.record(rid, who)
    stored = Stored.from_json(record.spec.response) if record.spec.response else None
    if stored is None or not stored.store:
        raise APIError(404, f"Response with id '{rid}' not found.", code="response_not_found", param="id")
    return record, stored


async def _history(svc: GatewayService, previous: str, who: Principal) -> list[dict[str, Any]]:
    """The conversation a new turn continues: the previous response's, then its answer."""
    try:
        record, stored = await _stored(svc, previous, who)
    except APIError:
        raise APIError(
            404,
            f"Previous response with id '{previous}' not found.",
            code="previous_response_not_found",
            param="previous_response_id",
        ) from None
    if record.status is not Status.DONE:
        raise APIError(
            400,
            f"previous response '{previous}' is {STATUS[record.status.value]}; continue a completed one",
            param="previous_response_id",
        )
    return [*stored.messages, assistant_message(_output(previous, record, "completed"))]


def _output(rid: str, record: RequestRecord, status: str) -> list[dict[str, Any]]:
    """A record's answer so far as output items (its text, its calls)."""
    spec, text = record.spec, record.emitted
    if spec.tool_format:
        message, _ = auto_message(rid, text, single_call(spec.tool_format))
    else:
        body = chat_response(rid, spec.model, 0, text, "stop", None, tool=spec.tool_call)
        message = body["choices"][0]["message"]
    return output_items(rid, message, status)


async def _snapshot(svc: GatewayService, rid: str, record: RequestRecord, stored: Stored) -> dict[str, Any]:
    status = STATUS[record.status.value]
    error = None
    if record.status in (Status.ERROR, Status.CANCELLED):
        events = await svc.broker.read_events(rid, max(record.seq - 2, 0))
        found = next((e.error or {} for e in reversed(events) if e.kind == "error"), {})
        error = {"code": str(found.get("code") or "server_error"), "message": str(found.get("message", ""))}
    return response_object(
        rid,
        stored,
        model=record.spec.model,
        created=record.created,
        status=status,
        output=[] if record.status is Status.QUEUED else _output(rid, record, _item_status(status)),
        chat_usage=record.usage,
        finish_reason=record.finish_reason,
        error=error,
    )


def _item_status(status: str) -> str:
    return {"in_progress": "in_progress", "completed": "completed"}.get(status, "incomplete")


def _from_chat(sub: Submission, stored: Stored, body: dict[str, Any]) -> dict[str, Any]:
    choice = body["choices"][0]
    logprobs = (choice.get("logprobs") or {}).get("content")
    return response_object(
        sub.rid,
        stored,
        model=sub.model,
        created=sub.created,
        status="completed",
        output=output_items(sub.rid, choice["message"], "completed", logprobs),
        chat_usage=body.get("usage"),
        finish_reason=choice["finish_reason"],
    )


async def _stream(
    svc: GatewayService, sub: Submission, stored: Stored, after: int
) -> AsyncGenerator[bytes, None]:
    """The response's events numbered after ``after``: rendered from the request's first event
    every time, so a resumed stream numbers and names everything as the first did."""
    out = OutputEvents(sub.rid, stored, model=sub.model, created=sub.created)
    render = renderer(
        rid=sub.rid,
        model=sub.model,
        created=sub.created,
        chat=True,
        after=0,
        tool=sub.tool,
        tool_format=sub.tool_format,
    )
    finished = False
    events = svc.requests.events(sub, 0)
    try:
        yield _sse(out.start(), after)
        async with aclosing(events):
            async for event in events:
                chunk = _events(out, render, event)
                if event.terminal:
                    finished = True
                    yield LastChunk(_sse(chunk, after))
                    return
                if data := _sse(chunk, after):
                    yield data
    except GatewayDraining:
        pass  # ended without response.completed: the client resumes elsewhere (starting_after)
    except APIError as exc:  # the status line is sent: say it as the stream's last event
        finished = True
        error = {"code": exc.code, "message": exc.message, "param": exc.param}
        yield LastChunk(_sse([{"type": "error", "sequence_number": out.number + 1, **error}], -1))
    finally:
        if not finished:
            svc.requests.detach_later(sub.rid, shared=sub.cached)


def _events(out: OutputEvents, render: Any, event: TokenEvent) -> list[dict[str, Any]]:
    if event.kind == "token":
        return [e for c in render.chunks(event) for e in out.chunk(c)]
    if event.kind == "done":
        return [e for c in render.finals(event) for e in out.chunk(c)] + out.finish(
            event.finish_reason, event.usage
        )
    return out.fail(error_chunk(event)["error"])


def _sse(events: list[dict[str, Any]], after: int) -> bytes:
    return b"".join(
        b"event: %b\ndata: %b\n\n" % (e["type"].encode(), one_line(orjson.dumps(e)))
        for e in events
        if e["sequence_number"] > after
    )


def _invalid(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    param = _PARAMS.get(loc[0], loc[0]) if loc else None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def _renamed(exc: APIError) -> APIError:
    """A chat parameter named in an error as the Responses API calls it (its function tools are
    flat: ``tools[0].name``, not ``tools[0].function.name``)."""
    if exc.param is not None:
        head, dot, rest = exc.param.partition(".")
        if head in _PARAMS:
            exc.param = _PARAMS[head] + dot + rest
            exc.message = exc.message.replace(f"`{head}`", f"`{_PARAMS[head]}`")
        elif head.startswith("tools[") and rest.startswith("function."):
            exc.param = f"{head}.{rest.removeprefix('function.')}"
    return exc
