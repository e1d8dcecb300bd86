"""One probe session: a tiny streamed request through the public endpoint, dropped once mid-stream on
purpose and resumed, with every event's sequence number checked (none missing, none twice).

A break the probe did not make (a gateway died, a proxy cut the stream) is resumed on the next URL:
the session then ends ``recovered`` (every token arrived exactly once) or ``failed``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

Outcome = str  # success | recovered | failed


class SessionError(Exception):
    """The session cannot go on; ``kind`` labels the error metric."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class StreamBroken(Exception):
    """The stream ended without its last event (not by the probe's own drop)."""


RETRY_STATUS = frozenset({502, 503, 504})  # a gateway draining or a proxy without one: go elsewhere


@dataclass(slots=True)
class Result:
    transport: str  # websocket | sse
    outcome: Outcome = "failed"
    errors: list[str] = field(default_factory=list)  # kinds, in order (connect, stream_broken, ...)
    connect_s: float | None = None
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between tokens, resumes excluded
    resume_gaps_s: list[float] = field(default_factory=list)  # drop (or break) -> first token after
    tokens: int = 0
    detail: str = ""


@dataclass(slots=True)
class Tracker:
    """Follows one request's sequence numbers and times across drops and resumes."""

    result: Result
    sent_at: float = 0.0
    last_seq: int = 0
    last_at: float | None = None
    resumed_at: float | None = None  # set while a resume waits for its first token
    finished: bool = False

    def token(self, seq: int) -> None:
        """A token event: it must be the next sequence number (resumes replay from ``last_seq``)."""
        if seq != self.last_seq + 1:
            raise SessionError("integrity", f"seq {seq} after {self.last_seq}")
        now = time.monotonic()
        if self.last_seq == 0:
            self.result.ttft_s = now - self.sent_at
        elif self.resumed_at is not None:
            self.result.resume_gaps_s.append(now - self.resumed_at)
        elif self.last_at is not None:
            self.result.gaps_s.append(now - self.last_at)
        self.resumed_at = None
        self.last_seq, self.last_at = seq, now
        self.result.tokens += 1

    def done(self, seq: int, *, shares_last: bool = False) -> None:
        """The finish: its own sequence number, or (SSE, ``shares_last``) that of the text chunk just
        before it, when the final event carried text too."""
        if seq != self.last_seq + 1 and not (shares_last and seq == self.last_seq):
            raise SessionError("integrity", f"done at seq {seq} after {self.last_seq}")
        if self.resumed_at is not None:
            self.result.resume_gaps_s.append(time.monotonic() - self.resumed_at)
        self.last_seq = seq
        self.finished = True

    def dropped(self) -> None:
        self.resumed_at = time.monotonic()


def rotate(urls: Sequence[str], start: int) -> list[str]:
    """``urls`` starting at index ``start`` (wrapping): where to resume after a break."""
    return [urls[(start + i) % len(urls)] for i in range(len(urls))]


async def settle(result: Result, exchange: Awaitable[None], timeout_s: float) -> Result:
    """Run a session's exchange within its deadline and say how it ended: an error the exchange
    named, a timeout, anything unexpected (a proxy's odd answer: failed, not a crash of the probe),
    or done (``recovered`` when errors were met on the way)."""
    try:
        async with asyncio.timeout(timeout_s):
            await exchange
    except SessionError as exc:
        result.errors.append(exc.kind)
        result.detail = str(exc)
    except TimeoutError:
        result.errors.append("timeout")
    except Exception as exc:
        result.errors.append("protocol")
        result.detail = f"{type(exc).__name__}: {exc}"[:200]
    else:
        result.outcome = "success" if not result.errors else "recovered"
    return result
