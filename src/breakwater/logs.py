"""JSON logs carrying the request id (``X-Request-ID``) on every line, end to end, and on a
request's lines once its API key is known, the tenant and the key's id (never the key)."""

from __future__ import annotations

import contextvars
import logging
import sys
import time

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# (tenant, key id) of the request being served, set when its key is accepted.
caller_var: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("caller", default=None)
# (code, param) of the error body the request is being answered with.
refusal_var: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar(
    "refusal", default=(None, None)
)


def caller_fields(tenant: str, key_id: str) -> dict[str, str]:
    """A request's owner as its lines name it where no request context is set (a worker's lines)."""
    out = {"tenant": tenant} if tenant else {}
    if key_id:
        out["key"] = key_id
    return out


def _context(record: logging.LogRecord) -> dict[str, object]:
    """What a line says beside its message: the request's ids and caller, and its own fields."""
    out: dict[str, object] = {}
    request_id = getattr(record, "request_id", None) or request_id_var.get()
    if request_id:
        out["request_id"] = request_id
    who = caller_var.get()
    if who is not None:
        out["tenant"] = who[0]
        if who[1]:
            out["key"] = who[1]
    rid = getattr(record, "rid", None)
    if rid:
        out["rid"] = rid
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        out.update(extra)
    return out


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class PlainFormatter(logging.Formatter):
    """``time component LEVEL message key=value ...``: the JSON line's fields, for a terminal."""

    def __init__(self, component: str) -> None:
        super().__init__(f"%(asctime)s {component} %(levelname)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _context(record).items())
        line = super().formatMessage(record)
        return f"{line} {fields}" if fields else line


def _without_query_strings(record: logging.LogRecord) -> bool:
    """uvicorn's WebSocket lines name the path with its query string, where a client may have put
    its API key (``/v1/ws?api_key=...``): the query is left out."""
    if record.name.startswith("uvicorn") and isinstance(record.args, tuple):
        record.args = tuple(
            a.split("?", 1)[0] + "?..." if isinstance(a, str) and a.startswith("/") and "?" in a else a
            for a in record.args
        )
    return True


def setup_logging(component: str, level: str = "INFO", json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component) if json_logs else PlainFormatter(component))
    handler.addFilter(_without_query_strings)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from breakwater.settings_check import unknown_variables  # it reads the settings classes

    for variable in unknown_variables():  # a typo would otherwise be ignored without a word
        logging.getLogger("breakwater.settings").warning(
            "unknown setting ignored", extra={"fields": {"variable": variable}}
        )
