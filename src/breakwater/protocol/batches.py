"""The Files and Batch APIs' shapes: a batch's input lines (checked as a whole before it runs), its
record and the OpenAI objects rendered from it, and its output lines."""

from __future__ import annotations

import codecs
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from breakwater.protocol.embeddings import EmbeddingRequest
from breakwater.protocol.formats import FormatError, parse_response_format
from breakwater.protocol.openai import ChatCompletionRequest, CompletionRequest
from breakwater.protocol.responses import ResponsesRequest
from breakwater.protocol.validation import described

LineBody = ChatCompletionRequest | CompletionRequest | EmbeddingRequest | ResponsesRequest
ENDPOINTS: dict[str, type[LineBody]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/v1/responses": ResponsesRequest,
}
MAX_LINES = 50_000  # OpenAI's bound on one batch
MAX_ERRORS = 100  # a failed input lists at most this many of its lines' errors
COMPLETION_WINDOW = "24h"
WINDOW_S = 86_400
Status = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class CreateBatch(BaseModel):
    """``POST /v1/batches``; any other parameter (``output_expires_after``) is refused by name."""

    model_config = ConfigDict(extra="allow", strict=True)

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Line:
    """One request of a batch: its index in the file (from 0), the caller's id for it, its body."""

    index: int
    custom_id: str
    body: LineBody


@dataclass(frozen=True, slots=True)
class LineError:
    code: str
    message: str
    line: int  # from 1, as OpenAI counts
    param: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Parsed:
    lines: list[Line]  # the lines that can run
    errors: list[LineError]  # why the others cannot (the first MAX_ERRORS)
    count: int  # the requests in the file (its lines that are not blank)

    def model(self) -> str:
        """The model its lines name ('' when they name several, or none can run)."""
        models = {line.body.model for line in self.lines}
        return models.pop() if len(models) == 1 else ""


def parse_input(data: bytes, endpoint: str, *, formats: bool = False) -> Parsed:
    """The batch's lines, or why they cannot run: every line a JSON object with a unique
    ``custom_id``, ``method`` POST, ``url`` the batch's endpoint and a ``body`` that endpoint takes
    (not streamed, no parameter the engine refuses; with ``formats``, at create, a
    ``response_format`` the grammar can enforce: a run never drops a line the create accepted, a
    gateway of another version may judge it otherwise). Lines are numbered from 1 as in the file
    (blank ones counted, never run); a line's index (from 0) counts only those that are not."""
    model = ENDPOINTS[endpoint]
    lines: list[Line] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    data = data.removeprefix(codecs.BOM_UTF8)  # as some editors save UTF-8 (Windows Notepad)
    rows = [(number, row) for number, row in enumerate(data.split(b"\n"), 1) if row.strip()]
    if not rows:
        return Parsed([], [LineError("empty_file", "the input file has no requests", 1)], 0)
    if len(rows) > MAX_LINES:
        errors = [
            LineError("too_many_requests", f"a batch holds at most {MAX_LINES} requests", MAX_LINES + 1)
        ]
        return Parsed([], errors, len(rows))
    for index, (number, row) in enumerate(rows):
        line = _line(index, number, row, endpoint, model, seen, formats)
        if isinstance(line, Line):
            lines.append(line)
        elif len(errors) < MAX_ERRORS:
            errors.append(line)
    return Parsed(lines, errors, len(rows))


def _line(
    index: int,
    number: int,
    row: bytes,
    endpoint: str,
    model: type[LineBody],
    seen: set[str],
    formats: bool = False,
) -> Line | LineError:
    try:
        item = orjson.loads(row)
    except orjson.JSONDecodeError:
        return LineError("invalid_json_line", "this line is not valid JSON", number)
    if not isinstance(item, dict):
        return LineError("invalid_json_line", "each line must be a JSON object", number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(
            "missing_required_parameter", "`custom_id` must be a non-empty string", number, "custom_id"
        )
    if custom_id in seen:
        return LineError(
            "duplicate_custom_id", f"`custom_id` {custom_id!r} is used twice", number, "custom_id"
        )
    seen.add(custom_id)
    if item.get("method") != "POST":
        return LineError("invalid_method", "`method` must be POST", number, "method")
    if item.get("url") != endpoint:
        return LineError(
            "mismatched_endpoint", f"`url` must be the batch's endpoint, {endpoint}", number, "url"
        )
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError("missing_required_parameter", "`body` must be a JSON object", number, "body")
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        param, msg, _ = described(exc.errors()[0])
        where = f"body.{param}" if param else "body"
        return LineError("invalid_body", f"{where}: {msg}", number, where)
    refused = _not_served(parsed, number, formats)
    return refused if refused is not None else Line(index, custom_id, parsed)


def _not_served(parsed: LineBody, number: int, formats: bool) -> LineError | None:
    """What a valid body asks that a batch line does not serve."""
    name = parsed.unsupported_parameter()
    if name is not None:
        return LineError(
            "unsupported_parameter", f"`{name}` is not supported by this server", number, f"body.{name}"
        )
    if formats and isinstance(parsed, ChatCompletionRequest):  # a schema the grammar cannot keep
        try:
            parse_response_format(parsed.response_format)
        except FormatError as exc:
            code = exc.code or "invalid_response_format"
            return LineError(code, f"body.{exc.param}: {exc}", number, f"body.{exc.param}")
    if getattr(parsed, "stream", False):
        return LineError("invalid_body", "a batch's requests are not streamed", number, "body.stream")
    if getattr(parsed, "background", False):
        return LineError(
            "invalid_body", "a batch's responses are not background ones", number, "body.background"
        )
    return None


@dataclass(slots=True)
class BatchRecord:
    """A batch as stored (one Redis hash; every value a string there)."""

    id: str
    tenant: str
    key_id: str
    endpoint: str
    input_file_id: str
    status: Status
    created_at: int
    expires_at: int
    total: int = 0
    completed: int = 0
    failed: int = 0
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str = ""
    error_file_id: str = ""
    in_progress_at: int = 0
    finalizing_at: int = 0
    completed_at: int = 0
    failed_at: int = 0
    expired_at: int = 0
    cancelling_at: int = 0
    cancelled_at: int = 0
    model: str = ""  # its lines' model ('' when they name several)
    # usage: the answered lines' tokens, counted once the batch is finished (-1: not counted, as by
    # a version before these fields; its usage is null, not zero)
    input_tokens: int = -1
    output_tokens: int = -1

    def to_hash(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = orjson.dumps(value).decode() if f.name in ("metadata", "errors") else str(value)
        return out

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> BatchRecord:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            if f.name in ("metadata", "errors"):
                kwargs[f.name] = orjson.loads(value)
            elif f.type == "int":
                kwargs[f.name] = int(value)
            else:
                kwargs[f.name] = value
        return cls(**kwargs)

    def moved(self, status: Status, at: int) -> BatchRecord:
        """The record in ``status`` since ``at`` (its ``<status>_at`` time)."""
        moved = replace(self, status=status)
        if hasattr(moved, f"{status}_at"):
            setattr(moved, f"{status}_at", at)
        return moved

    def to_object(self) -> dict[str, Any]:
        """OpenAI's Batch object."""

        def at(value: int) -> int | None:
            return value or None

        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": COMPLETION_WINDOW,
            "status": self.status,
            "output_file_id": self.output_file_id or None,
            "error_file_id": self.error_file_id or None,
            "created_at": self.created_at,
            "in_progress_at": at(self.in_progress_at),
            "expires_at": self.expires_at,
            "finalizing_at": at(self.finalizing_at),
            "completed_at": at(self.completed_at),
            "failed_at": at(self.failed_at),
            "expired_at": at(self.expired_at),
            "cancelling_at": at(self.cancelling_at),
            "cancelled_at": at(self.cancelled_at),
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
            "model": self.model or None,
            "usage": self.usage(),
        }

    def usage(self) -> dict[str, Any] | None:
        """OpenAI's batch usage: the tokens of its answered lines, once it has ended (None before)."""
        if self.status not in ("completed", "expired", "cancelled", "failed") or self.input_tokens < 0:
            return None
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def count(self, answer: dict[str, Any]) -> None:
        """Add an answered line's usage (chat and text completions', embeddings', a response's)."""
        body = (answer.get("response") or {}).get("body")
        used = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(used, dict):
            return
        self.input_tokens += int(used.get("prompt_tokens", used.get("input_tokens", 0)) or 0)
        self.output_tokens += int(used.get("completion_tokens", used.get("output_tokens", 0)) or 0)


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A stored file's fields (its bytes are kept beside them)."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int

    def to_hash(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> FileRecord:
        return cls(
            id=raw["id"],
            tenant=raw["tenant"],
            filename=raw["filename"],
            purpose=raw["purpose"],
            bytes=int(raw["bytes"]),
            created_at=int(raw["created_at"]),
            expires_at=int(raw["expires_at"]),
        )

    def to_object(self) -> dict[str, Any]:
        """OpenAI's File object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


def output_line(line: Line, rid: str, status_code: int, body: dict[str, Any]) -> bytes:
    """One answer in the output (2xx) or error file: OpenAI's batch output line."""
    response = {"status_code": status_code, "request_id": rid or None, "body": body}
    return orjson.dumps(
        {
            "id": f"batch_req_{secrets.token_hex(12)}",
            "custom_id": line.custom_id,
            "response": response,
            "error": None,
        }
    )


def expired_line(line: Line) -> bytes:
    """A request the batch did not get to before its window closed (or it was cancelled)."""
    error = {
        "code": "batch_expired",
        "message": "This request could not be executed before the completion window expired.",
    }
    return orjson.dumps(
        {
            "id": f"batch_req_{secrets.token_hex(12)}",
            "custom_id": line.custom_id,
            "response": None,
            "error": error,
        }
    )
