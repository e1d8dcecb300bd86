"""The Files and Batch APIs: ``/v1/files`` (batch input files in, output files out) and
``/v1/batches`` (create, retrieve, list, cancel). A batch's input is checked whole when it is
created; the gateways' batch runners (gateway.batch_runner) run it. Only the owner tenant sees a
file or a batch: another's is "not found"."""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import UploadFile

from breakwater.broker.batches import BatchStore
from breakwater.broker.errors import TRANSIENT
from breakwater.gateway.auth import caller
from breakwater.gateway.body import OrjsonRoute
from breakwater.gateway.errors import APIError, JSONBody, unsupported
from breakwater.gateway.routes import Caller, service
from breakwater.protocol.batches import (
    COMPLETION_WINDOW,
    ENDPOINTS,
    WINDOW_S,
    BatchRecord,
    CreateBatch,
    FileRecord,
    new_id,
    parse_input,
)
from breakwater.tenancy import Principal

router = APIRouter(route_class=OrjsonRoute)
LIST_MAX = 100


def _store(request: Request) -> BatchStore:
    store: BatchStore = request.app.state.batches
    return store


def _not_found(kind: str, name: str, param: str) -> APIError:
    return APIError(404, f"No such {kind}: {name}", code=f"{kind}_not_found", param=param)


async def _file(store: BatchStore, file_id: str, who: Principal) -> FileRecord:
    record = await store.file(file_id)
    if record is None or record.tenant != who.tenant:
        raise _not_found("file", file_id, "file_id")
    return record


async def _batch(store: BatchStore, batch_id: str, who: Principal) -> BatchRecord:
    record = await store.get(batch_id)
    if record is None or record.tenant != who.tenant:
        raise _not_found("batch", batch_id, "batch_id")
    return record


def _after(ids: list[str], after: str | None) -> list[str]:
    """The ids after ``after`` (a cursor: the last id of the previous page); all without one."""
    if after is None:
        return ids
    return ids[ids.index(after) + 1 :] if after in ids else []


def _page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """OpenAI's cursor page of the first ``limit`` items (``items`` holds one more if there are)."""
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


# The upload's form, described for the schema (the route reads it itself, after authenticating).
_UPLOAD = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string"}},
            }
        }
    },
}


@router.post("/v1/files", response_model=None, openapi_extra={"requestBody": _UPLOAD})
async def upload_file(request: Request) -> Response:
    """``multipart/form-data`` with ``file`` and ``purpose``. The caller is known before the body is
    read: an unauthenticated upload is refused before any of it is spooled."""
    who = await caller(request)
    settings = service(request).settings
    async with request.form(max_files=1, max_fields=4) as form:
        other = next((name for name in form if name not in ("file", "purpose")), None)
        if other is not None:  # expires_after[...]: files here live files_ttl_s
            raise unsupported(other.split("[", 1)[0])  # the SDK's form key for expires_after.anchor
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(purpose, str):
            raise APIError(
                400, "`purpose` is required: `batch`", code="missing_required_parameter", param="purpose"
            )
        if purpose != "batch":
            raise APIError(
                400, f"purpose {purpose!r} is not served here: only `batch` files", param="purpose"
            )
        if not isinstance(upload, UploadFile):
            raise APIError(
                400, "`file` is required: a JSON Lines file", code="missing_required_parameter", param="file"
            )
        data = await upload.read(settings.files_max_bytes + 1)
        filename = upload.filename or "upload.jsonl"
    if len(data) > settings.files_max_bytes:
        raise APIError(413, f"a file holds at most {settings.files_max_bytes} bytes", code="file_too_large")
    try:
        data.decode()
    except UnicodeDecodeError:
        raise APIError(
            400, "a batch file is JSON Lines: UTF-8 text", code="invalid_file", param="file"
        ) from None
    store = _store(request)
    file_id = new_id("file-")
    held, used = await store.hold_quota(who.tenant, file_id, len(data), settings.files_quota_bytes)
    if not held:
        raise APIError(
            413,
            f"this upload would take your files past their quota ({used} of {settings.files_quota_bytes} "
            "bytes stored or being uploaded): delete files you no longer need",
            code="storage_limit_exceeded",
            param="file",
        )
    now = int(time.time())
    ttl_s = settings.files_ttl_s
    record = FileRecord(file_id, who.tenant, filename, purpose, len(data), now, now + ttl_s)
    try:
        await store.put_file(record, data, ttl_s)
    finally:
        with contextlib.suppress(*TRANSIENT):  # Redis away: the hold lapses; the first error is the answer
            await store.give_quota(who.tenant, file_id, len(data))
    return JSONBody(record.to_object())


@router.get("/v1/files", response_model=None)
async def list_files(
    request: Request,
    who: Caller,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    store = _store(request)
    ids = await store.files(who.tenant)
    if order == "asc":
        ids.reverse()
    found, gone = [], []
    for file_id in _after(ids, after):
        record = await store.file(file_id)
        if record is None:
            gone.append(file_id)
        elif purpose in (None, record.purpose):
            found.append(record.to_object())
            if len(found) > limit:
                break
    await store.forget_files(who.tenant, gone)
    return JSONBody(_page(found, limit))


@router.get("/v1/files/{file_id}", response_model=None)
async def retrieve_file(file_id: str, request: Request, who: Caller) -> Response:
    return JSONBody((await _file(_store(request), file_id, who)).to_object())


@router.get("/v1/files/{file_id}/content", response_model=None)
async def file_content(file_id: str, request: Request, who: Caller) -> Response:
    """The file's bytes, streamed part by part as stored (a delete meanwhile lets them end whole)."""
    store = _store(request)
    await store.begin_read(file_id)
    try:
        record = await _file(store, file_id, who)
    except BaseException:
        await store.end_read(file_id)
        raise
    headers = {"Content-Length": str(record.bytes)}
    return StreamingResponse(
        store.file_parts(file_id, reading=True), media_type="application/octet-stream", headers=headers
    )


@router.delete("/v1/files/{file_id}", response_model=None)
async def delete_file(file_id: str, request: Request, who: Caller) -> Response:
    store = _store(request)
    record = await _file(store, file_id, who)
    for batch_id in await store.active():
        batch = await store.get(batch_id)
        if batch is not None and batch.input_file_id == file_id:
            raise APIError(
                409,
                f"file {file_id} is the input of batch {batch_id}, which is still running; cancel it first",
                code="file_in_use",
                param="file_id",
            )
    await store.delete_file(record)
    return JSONBody({"id": file_id, "object": "file", "deleted": True})


@router.post("/v1/batches", response_model=None)
async def create_batch(body: CreateBatch, request: Request, who: Caller) -> Response:
    service(request).refuse_if_draining()
    store = _store(request)
    if body.model_extra:
        raise unsupported(next(iter(body.model_extra)))
    if body.endpoint not in ENDPOINTS:
        served = ", ".join(ENDPOINTS)
        raise APIError(
            400, f"endpoint {body.endpoint!r} is not served in a batch: {served}", param="endpoint"
        )
    if body.completion_window != COMPLETION_WINDOW:
        raise APIError(400, "completion_window must be `24h`", param="completion_window")
    if body.metadata is not None and (
        len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())
    ):
        raise APIError(
            400, "metadata holds at most 16 pairs: keys of 64 characters, values of 512", param="metadata"
        )
    file = await _file(store, body.input_file_id, who)
    if file.purpose != "batch":
        raise APIError(
            400, f"file {file.id} is not a batch input file (purpose `batch`)", param="input_file_id"
        )
    data = await store.file_data(file.id)
    if data is None:
        raise _not_found("file", file.id, "input_file_id")
    parsed = await asyncio.to_thread(partial(parse_input, formats=True), data, body.endpoint)  # (its size)
    now = int(time.time())
    record = BatchRecord(
        id=new_id("batch_"),
        tenant=who.tenant,
        key_id=who.key_id,
        endpoint=body.endpoint,
        input_file_id=file.id,
        status="in_progress",
        created_at=now,
        expires_at=now + WINDOW_S,
        total=parsed.count,
        metadata=body.metadata,
        model=parsed.model(),
    )
    record = record.moved("failed", now) if parsed.errors else record.moved("in_progress", now)
    record.errors = [e.to_dict() for e in parsed.errors]
    ttl_s = service(request).settings.files_ttl_s
    # The input outlives the batch: a runner that takes it over reads it again.
    if not parsed.errors and not await store.keep_file(file.id, WINDOW_S + ttl_s):
        raise _not_found("file", file.id, "input_file_id")  # deleted while it was read
    await store.create(record, ttl_s)
    if record.status == "in_progress":
        request.app.state.batch_runner.poke()
    return JSONBody(record.to_object())


@router.get("/v1/batches", response_model=None)
async def list_batches(
    request: Request,
    who: Caller,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = 20,
) -> Response:
    store = _store(request)
    found, gone = [], []
    for batch_id in _after(await store.batches(who.tenant), after):
        record = await store.get(batch_id)
        (gone.append(batch_id) if record is None else found.append(record.to_object()))
        if len(found) > limit:
            break
    await store.forget(who.tenant, gone)
    return JSONBody(_page(found, limit))


@router.get("/v1/batches/{batch_id}", response_model=None)
async def retrieve_batch(batch_id: str, request: Request, who: Caller) -> Response:
    return JSONBody((await _batch(_store(request), batch_id, who)).to_object())


@router.post("/v1/batches/{batch_id}/cancel", response_model=None)
async def cancel_batch(batch_id: str, request: Request, who: Caller) -> Response:
    """A running batch stops: its requests still open are let go, what was answered is kept
    (``cancelling``, then ``cancelled`` with its files)."""
    store = _store(request)
    record = await _batch(store, batch_id, who)
    moved = await store.move(batch_id, ("validating", "in_progress"), "cancelling", int(time.time()))
    if not moved and record.status not in ("cancelling", "cancelled"):
        record = await _batch(store, batch_id, who)
        if record.status not in ("cancelling", "cancelled"):
            raise APIError(
                409,
                f"batch {batch_id} is {record.status}: it can no longer be cancelled",
                code="batch_not_cancellable",
                param="batch_id",
            )
    return JSONBody((await _batch(store, batch_id, who)).to_object())
