"""An upstream's failures as the `openai` engine meets them, and when it tries a request again:
after a failed try (a 500, a lost or stalled connection, a malformed answer) up to ``retries`` more
times, 0.5 s x n apart; while the upstream cannot be reached at all (down: a sidecar restarting,
loading its model) or says it is overloaded (429, 503), every 0.5 s, 1 s, 2 s, ... (5 s at most)
for up to ``wait_s``, as the queue behind the request waits (the worker pulls no more than it
runs). Failing those fast turned an upstream's restart or rate limit into every queued request's
500."""

from __future__ import annotations

import time
from typing import Any

import orjson

WAIT_RETRY_S = 0.5, 5.0  # the first and the longest pause between tries at an upstream that is away
OVERLOADED = (429, 503)  # the upstream's own "not now"


class Attempts:
    """One request's tries at the upstream."""

    def __init__(self, retries: int, wait_s: float) -> None:
        self.retries = retries
        self.wait_s = wait_s
        self.failures = 0  # failed tries that count toward ``retries``
        self.away_since: float | None = None  # down or overloaded since (None: not at the last try)
        self.waits = 0  # tries that found it away (the first said in the log)

    def give_up(self, away: bool) -> bool:
        """After a failed try (``away``: no connection could be made, or the upstream said it is
        overloaded): whether to stop."""
        if away:
            now = time.monotonic()
            self.away_since = self.away_since or now
            if now - self.away_since < self.wait_s:
                self.waits += 1
                return False
        else:
            self.away_since = None
        self.failures += 1
        return self.failures > self.retries

    def first_wait(self) -> bool:
        """Whether this try is the first to find the upstream away (to say so once)."""
        return self.away_since is not None and self.waits == 1

    def delay_s(self) -> float:
        if self.away_since is None:
            return 0.5 * self.failures
        first, longest = WAIT_RETRY_S
        return float(min(longest, first * 2.0 ** min(self.waits - 1, 8)))


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
