"""An upstream's failures as the `openai` engine meets them, and when it tries a request again:
after a failed try (a 5xx, a 429, a lost or stalled connection, a malformed answer) up to
``retries`` more times, 0.5 s x n apart; while the upstream cannot be reached at all (down: a
sidecar restarting, loading its model) once a second for up to ``wait_s``, as the queue behind the
request waits for it (the worker pulls no more than it runs). Failing those fast turned an
upstream's restart into every queued request's 500."""

from __future__ import annotations

import time
from typing import Any

import orjson

DOWN_RETRY_S = 1.0  # between tries to reach an upstream that is down


class Attempts:
    """One request's tries at the upstream."""

    def __init__(self, retries: int, wait_s: float) -> None:
        self.retries = retries
        self.wait_s = wait_s
        self.failures = 0  # failed tries that count toward ``retries``
        self.down_since: float | None = None  # unreachable since (None: reached at the last try)
        self.waited = False  # a try has found the upstream down (said once in the log)

    def give_up(self, unreachable: bool) -> bool:
        """After a failed try (``unreachable``: no connection could be made): whether to stop."""
        if unreachable:
            now = time.monotonic()
            self.down_since = self.down_since or now
            if now - self.down_since < self.wait_s:
                return False
        else:
            self.down_since = None
        self.failures += 1
        return self.failures > self.retries

    def first_wait(self) -> bool:
        """Whether this is the first try to find the upstream down (to say so once)."""
        first = self.down_since is not None and not self.waited
        self.waited = self.waited or self.down_since is not None
        return first

    def delay_s(self) -> float:
        return DOWN_RETRY_S if self.down_since is not None else 0.5 * self.failures


class UpstreamError(Exception):
    """The upstream answered with an error (``status``: its HTTP status; 0: none, such as a stream
    that ended without a finish)."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500

    @property
    def operators(self) -> bool:
        """The upstream refused Breakwater itself (its key, its model name, a route it lacks): the
        operator's to fix, a server error to the client, not a fault of the client's request."""
        return self.status in (401, 403, 404)


def upstream_chunk(data: bytes) -> dict[str, Any] | None:
    """A ``data:`` line's chunk; None for an empty one (some servers' keepalive). Raises
    ``ValueError`` for one that is not a JSON object, :class:`UpstreamError` for an error event."""
    if not data:
        return None
    chunk = orjson.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError(f"the upstream sent a chunk that is not an object: {data[:100]!r}")
    if "error" in chunk or chunk.get("object") == "error":  # (vLLM's older shape: the error's own fields)
        error = chunk.get("error", chunk)
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        raise UpstreamError(error_message(data, status), status=status)
    return chunk


def error_message(raw: bytes, status: int) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return f"upstream HTTP {status}: {raw[:300].decode(errors='replace')}"
    err = body.get("error", body) if isinstance(body, dict) else body
    message = err.get("message") if isinstance(err, dict) else None
    if message is None and isinstance(body, dict):
        message = body.get("detail")
    return f"upstream HTTP {status}: {message if message is not None else str(body)[:300]}"


def error_code(message: str) -> str:
    lowered = message.lower()
    if "context" in lowered and ("length" in lowered or "window" in lowered):
        return "context_length_exceeded"
    return "upstream_rejected"
