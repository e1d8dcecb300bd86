"""The Responses API's routes: create (whole, streamed, or in the background), retrieve (and resume
its stream), cancel. Each response is one chat request underneath (protocol.responses), so it is
queued, continued after a worker's crash and resumed on any gateway like any other; its id is the
request's, and ``GET /v1/requests/{id}`` works on it too."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from functools import partial
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.types import Receive

from breakwater.broker.fanin import GatewayDraining
from breakwater.broker.record import RequestRecord, Status
from breakwater.gateway.body import OrjsonRoute
from breakwater.gateway.cache import NO_CACHE
from breakwater.gateway.errors import APIError, JSONBody, unsupported
from breakwater.gateway.following import RedisAway, Submission
from breakwater.gateway.routes import HEADER_MAX, SSE_HEADERS, Caller, request_id, service
from breakwater.gateway.service import GatewayService
from breakwater.gateway.sse import KEEPALIVE, Silence, error_chunk, event_error, one_line, renderer
from breakwater.gateway.streaming import LastChunk, SSEResponse
from breakwater.gateway.whole import answered
from breakwater.protocol.events import TokenEvent
from breakwater.protocol.openai import MAX_SEQ, ChatCompletionRequest
from breakwater.protocol.response_output import STATUS, OutputEvents, assistant_message
from breakwater.protocol.responses import (
    InputError,
    ResponsesRequest,
    Stored,
    input_items,
    message_places,
    new_response_id,
    to_chat,
)
from breakwater.protocol.validation import described
from breakwater.tenancy import Principal

router = APIRouter(route_class=OrjsonRoute)

# A chat parameter's name as the Responses API calls it (in a 400's `param`).
_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "include",  # (`include: ["message.output_text.logprobs"]` asks for them)
}
_SAID = {"logprobs": '`include: ["message.output_text.logprobs"]`'}  # in a message, not `include`
# A chat error's words as the Responses API says them (its format is flat: ``text.format.schema``).
_WORDS = (
    ("`max_tokens`", "`max_output_tokens`"),  # (a context error names it beside another param)
    ("`response_format.json_schema.", "`text.format."),
    ("`response_format", "`text.format"),
    ("`json_schema.", "`text.format."),
    ('`{"type": "function", "function": {"name": ...}}`', '`{"type": "function", "name": ...}`'),
    ("a `tool` message must answer the `tool_calls` of the assistant message before it", "a "
     "`function_call_output` must answer a `function_call` item before it"),
    ("is not among the `tool_calls` of the assistant message before it", "is the `call_id` of no "
     "`function_call` item before it"),
    ("each of an assistant message's `tool_calls` needs a `tool` message answering it", "each "
     "`function_call` item needs a `function_call_output` answering it"),
)  # fmt: skip


def _worded(message: str) -> str:
    for chat, responses in _WORDS:
        message = message.replace(chat, responses)
    return message


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponsesRequest,
    request: Request,
    who: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=HEADER_MAX)] = None,
) -> Response:
    svc = service(request)
    # A background response runs on without a client: still counted as followed, never detached;
    # answered at once unless streamed, so not subscribed to.
    keep = bool(body.background)
    if not body.stream and not keep:
        xrid = request_id(request)
        headers, result = await whole_response(svc, body, xrid, who, idempotency_key, request.receive)
        return JSONBody(result, headers=headers)
    sub, stored = await _admit(svc, body, request_id(request), who, idempotency_key, bool(body.stream))
    headers = {"X-Breakwater-Request-Id": sub.rid, "X-Breakwater-Model": sub.model, **sub.headers}
    if body.stream:
        return SSEResponse(
            _stream(svc, sub, stored, -1, keep=keep),
            headers={**SSE_HEADERS, **headers},
            unstarted=partial(svc.requests.release_later, sub, detach=not keep),
        )
    if sub.duplicate:  # a replay: the response as it stands now
        return JSONBody(
            await _snapshot(svc, sub.rid, await svc.requests.record(sub.rid, who), stored), headers=headers
        )
    return JSONBody(_Output.of(sub, stored).snapshot("queued"), headers=headers)


async def whole_response(
    svc: GatewayService,
    body: ResponsesRequest,
    xrid: str,
    who: Principal,
    idempotency_key: str | None,
    receive: Receive | None = None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """A response answered whole (its headers and the response object); a failed one raises.
    ``receive``: its client's, watched for a disconnect (whole.py)."""
    sub, stored = await _admit(svc, body, xrid, who, idempotency_key, True)
    headers = {"X-Breakwater-Request-Id": sub.rid, "X-Breakwater-Model": sub.model, **sub.headers}
    return headers, await answered(svc, sub, headers, _whole(svc, sub, stored), receive)


def responses_key(idempotency_key: str) -> str:
    """A Responses request's Idempotency-Key, apart from chat's: after a NUL, which no header value
    holds, so no key a client sends is it."""
    return f"responses\x00{idempotency_key}"


def _refusal(body: ResponsesRequest) -> APIError | None:
    name = body.unsupported_parameter()
    if name is not None:
        return unsupported(name)
    if body.background and body.store is False:
        return APIError(400, "a background response is stored: `store` cannot be false", param="store")
    return None


async def _admit(
    svc: GatewayService,
    body: ResponsesRequest,
    xrid: str,
    who: Principal,
    idempotency_key: str | None,
    subscribe: bool,
) -> tuple[Submission, Stored]:
    """The response's chat request, queued (after the conversation of its previous response). Never
    an identical request's answer (the response cache): a response's id is its own, and so are its
    cancel and retrieve. Its Idempotency-Key is the Responses API's own (not a chat's)."""
    svc.refuse_if_draining()
    refused = _refusal(body)
    if refused is not None:
        raise refused
    history = await _history(svc, body.previous_response_id, who) if body.previous_response_id else []
    try:
        chat, stored = to_chat(body, history)
        try:
            request = ChatCompletionRequest.model_validate(chat)
        except ValidationError as exc:
            raise _invalid(exc, message_places(body, len(history))) from None
        sub = await svc.submit(
            request,
            request_id=xrid,
            idempotency_key=responses_key(idempotency_key) if idempotency_key else None,
            principal=who,
            subscribe=subscribe,
            cache=NO_CACHE,
            rid=new_response_id(),
            response=stored.to_json(),
            digest_of=body,  # stream, background and store too: a replay asks for the same response
        )
    except InputError as exc:
        raise APIError(400, str(exc), code=exc.code, param=exc.param) from None
    except APIError as exc:
        raise _renamed(exc) from None
    if sub.duplicate:  # an Idempotency-Key's replay: the response it first made, as it was made
        record = await svc.requests.record(sub.rid, who)
        stored = (Stored.from_json(record.spec.response) if record.spec.response else None) or stored
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
        return SSEResponse(
            _stream(svc, sub, stored, after, keep=stored.background),
            headers=headers,
            unstarted=partial(svc.requests.release_later, sub, detach=not stored.background),
        )
    return JSONBody(await _snapshot(svc, response_id, record, stored))


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request, who: Caller) -> Response:
    svc = service(request)
    _, stored = await _stored(svc, response_id, who)
    if not stored.background:  # as OpenAI: its client is the one to stop it (DELETE /v1/requests/{id})
        raise APIError(
            400,
            f"only a response created with `background: true` can be cancelled; '{response_id}' was not",
            param="response_id",
        )
    record = await svc.requests.cancel(response_id, who)
    return JSONBody(await _snapshot(svc, response_id, record, stored))


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    who: Caller,
    after: Annotated[str | None, Query(max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    """The response's own input (not its earlier turns', nor its instructions), a page at a time."""
    _, stored = await _stored(service(request), response_id, who)
    items = input_items(response_id, stored.messages[stored.history :])
    if order == "desc":
        items.reverse()
    if after is not None:
        at = next((k for k, item in enumerate(items) if item["id"] == after), None)
        if at is None:
            raise APIError(400, f"no input item `{after}` in response '{response_id}'", param="after")
        items = items[at + 1 :]
    page = items[:limit]
    return JSONBody(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


async def _stored(svc: GatewayService, rid: str, who: Principal) -> tuple[RequestRecord, Stored]:
    """The caller's stored response (404 otherwise: another tenant's, expired, a plain chat's, or
    one asked not to be stored)."""
    missing = APIError(404, f"Response with id '{rid}' not found.", code="response_not_found", param="id")
    try:
        record = await svc.requests.record(rid, who)
    except APIError as exc:  # no such request (or another tenant's): the same answer as any other
        raise missing if exc.status == 404 else exc from None
    stored = Stored.from_json(record.spec.response) if record.spec.response else None
    if stored is None or not stored.store:
        raise missing
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
    answer = await _snapshot(svc, previous, record, stored)
    return [*stored.messages, assistant_message(answer["output"])]


class _Output:
    """A response's events from its request's events: the chat renderer (gateway.sse; it parses
    the model's own tool calls) and :class:`OutputEvents` over its chunks."""

    def __init__(
        self, rid: str, stored: Stored, *, model: str, tool: str, tool_format: str, created: int
    ) -> None:
        self.out = OutputEvents(rid, stored, model=model, created=stored.created_at or created)
        self.render = renderer(
            rid=rid, model=model, created=0, chat=True, after=0, tool=tool, tool_format=tool_format
        )
        self.pending = self.out.start()  # sent first (feed_start), else with the first event's

    @classmethod
    def of(cls, sub: Submission, stored: Stored) -> _Output:
        return cls(
            sub.rid, stored, model=sub.model, tool=sub.tool, tool_format=sub.tool_format, created=sub.created
        )

    def feed_start(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress`` (once)."""
        out, self.pending = self.pending, []
        return out

    def feed(self, event: TokenEvent) -> list[dict[str, Any]]:
        out, self.pending = self.pending, []
        if event.kind == "token":
            return out + [e for c in self.render.chunks(event) for e in self.out.chunk(c)]
        if event.kind == "done":
            finals = [e for c in self.render.finals(event) for e in self.out.chunk(c)]
            return out + finals + self.out.finish(event.finish_reason, event.usage, event.at_ms)
        return out + self.out.fail(error_chunk(event)["error"])

    def snapshot(self, status: str) -> dict[str, Any]:
        return self.out.snapshot(status)


async def _whole(svc: GatewayService, sub: Submission, stored: Stored) -> dict[str, Any]:
    """A non-streamed response: its stream's last event's (so the two always agree)."""
    output = _Output.of(sub, stored)
    events = svc.requests.events(sub)
    async with aclosing(events):
        async for event in events:
            last = output.feed(event)
            if event.kind == "error":
                raise _renamed(event_error(event))
            if event.terminal:
                response: dict[str, Any] = last[-1]["response"]
                return response
    raise APIError(500, "the request's stream ended without a final event", type="server_error")


async def _snapshot(svc: GatewayService, rid: str, record: RequestRecord, stored: Stored) -> dict[str, Any]:
    """The response as its record stands: its text so far rendered as its stream renders it."""
    spec = record.spec
    output = _Output(
        rid,
        stored,
        model=spec.model,
        tool=spec.tool_call,
        tool_format=spec.tool_format,
        created=record.created,
    )
    if record.status is Status.QUEUED:
        return output.snapshot("queued")
    events = [TokenEvent(1, "token", text=record.emitted)] if record.emitted else []
    if record.status is Status.DONE:
        reason, usage, at_ms = record.finish_reason, record.usage, record.finished_ms
        events.append(TokenEvent(2, "done", finish_reason=reason, usage=usage, at_ms=at_ms))
    elif record.status in (Status.ERROR, Status.CANCELLED):
        found = await svc.broker.read_events(rid, max(record.seq - 2, 0))
        error = next((e.error or {} for e in reversed(found) if e.kind == "error"), {})
        code = "cancelled" if record.status is Status.CANCELLED else error.get("code")
        events.append(TokenEvent(2, "error", error={**error, "code": code}))
    last: list[dict[str, Any]] = []
    for event in events:
        last = output.feed(event)
    if events and events[-1].terminal:
        response: dict[str, Any] = last[-1]["response"]
        return response
    return output.snapshot("in_progress")


async def _stream(
    svc: GatewayService, sub: Submission, stored: Stored, after: int, *, keep: bool = False
) -> AsyncGenerator[bytes, None]:
    """The response's events numbered after ``after``: rendered from the request's first event
    every time, so a resumed stream numbers and names everything as the first did.
    ``response.created`` goes out at once. ``keep``: a background response: a client that leaves
    does not detach it."""
    output = _Output.of(sub, stored)
    finished = started = False
    events = svc.requests.events(sub, 0, keepalive=True)
    silence = Silence(svc.settings.sse_keepalive_s)  # while a function call is parsed whole
    try:
        if data := _sse(output.feed_start(), after):
            yield data
        started = True  # from here the events' own cleanup unsubscribes (aclosing)
        async with aclosing(events):
            async for event in events:
                if event.kind == "idle":
                    yield KEEPALIVE
                    continue
                produced = output.feed(event)
                if event.terminal:
                    finished = True
                    yield LastChunk(_sse(produced, after))
                    return
                if data := _sse(produced, after):
                    silence.heard()
                    yield data
                elif data := silence.quiet():
                    yield data
    except GatewayDraining:
        pass  # ended without response.completed: the client resumes elsewhere (starting_after)
    except APIError as exc:  # the status line is sent: say it as the stream's last event
        finished = not isinstance(exc, RedisAway)  # that request goes on: let go of it
        error = {"code": exc.code, "message": exc.message, "param": exc.param}
        yield LastChunk(_sse([{"type": "error", "sequence_number": output.out.number + 1, **error}], -1))
    finally:
        if not started:  # closed at its first write: the events never began, nor their cleanup
            svc.requests.release_later(sub, detach=not keep)
        elif not finished and not keep:
            svc.requests.detach_later(sub.rid, shared=sub.cached)


def _sse(events: list[dict[str, Any]], after: int) -> bytes:
    return b"".join(
        b"event: %b\ndata: %b\n\n" % (e["type"].encode(), one_line(orjson.dumps(e)))
        for e in events
        if e["sequence_number"] > after
    )


def _invalid(exc: ValidationError, places: list[int | str]) -> APIError:
    """The chat request's validation error as the Responses API names it: a message's error names
    the input item it came from (``places``: :func:`message_places`; a call's, of a message of
    consecutive calls, its own item)."""
    param, message, code = described(exc.errors()[0])
    parts = (param or "").split(".")
    if parts[0] == "messages" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < len(places):
        place = places[int(parts[1])]
        call = parts[3] if len(parts) > 3 and parts[2] == "tool_calls" else ""
        param = f"input[{place + (int(call) if call.isdigit() else 0)}]" if isinstance(place, int) else place
    elif param:
        param = _param(param)
    message = _worded(message)
    return APIError(400, f"{param}: {message}" if param else message, code=code, param=param)


def _param(param: str) -> str:
    """A chat parameter's name in the Responses API (``response_format.json_schema.schema``:
    ``text.format.schema``)."""
    head, dot, rest = param.partition(".")
    if head == "response_format":
        rest = rest.removeprefix("json_schema.") if rest != "json_schema" else ""
        return "text.format" + ("." + rest if rest else "")
    return _PARAMS.get(head, head) + dot + rest


def _renamed(exc: APIError) -> APIError:
    """A chat parameter named in an error as the Responses API calls it (its function tools are
    flat: ``tools[0].name``, not ``tools[0].function.name``)."""
    if exc.param is not None:
        head, _, rest = exc.param.partition(".")
        if head in _PARAMS:
            exc.param = _param(exc.param)
            said = _SAID.get(head, f"`{_PARAMS[head]}`")
            exc.message = _worded(exc.message.replace(f"`{head}`", said))
        elif head.startswith("tools[") and rest.startswith("function."):
            exc.param = f"{head}.{rest.removeprefix('function.')}"
    exc.message = _worded(exc.message)
    return exc
