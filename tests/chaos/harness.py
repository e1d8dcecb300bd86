"""A resuming streaming client and the books of a chaos run.

Each request is a streaming completion (every other one a chat completion) of the sim model with a
known seed, so its undisturbed text is known. The client behaves as a production client should, and
no more leniently: it submits with an ``Idempotency-Key`` (a retried submission never enqueues
twice); it retries refused connections, broken streams and 503s that carry ``Retry-After`` (waiting
that long), on the next gateway; when a stream ends without ``[DONE]`` (a draining gateway, a cut
connection) it resumes from the last ``id`` it saw (``Last-Event-ID``). A 429 is a final rejection;
any other status (a 500, a 503 without ``Retry-After``, a 404 on resume) is a failure that fails the
scenario. Every received ``(seq, text)`` is kept, so gaps and duplicates are visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import expected_sim

RESULTS = Path(__file__).resolve().parents[2] / "results" / "chaos"
T = TypeVar("T")


class Final(StrEnum):
    DONE = "done"  # [DONE] after the text
    ERROR = "error"  # an error event ended the stream
    REJECTED = "rejected"  # 429: the lane was full
    FAILED = "failed"  # a response no client could act on (a 5xx without Retry-After, a 404 on resume)
    LOST = "lost"  # the client's deadline passed without an ending


@dataclass(frozen=True)
class Refusal:
    """A response that did not open a stream, as a client sees it."""

    status: int
    retry_after: float | None
    reason: str | None  # X-Breakwater-Reason
    code: str | None  # the OpenAI error body's code
    message: str

    @classmethod
    def of(cls, resp: httpx.Response) -> Refusal:
        try:
            error = orjson.loads(resp.content).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            error = {}
        return cls(
            status=resp.status_code,
            retry_after=_seconds(resp.headers.get("retry-after")),
            reason=resp.headers.get("x-breakwater-reason"),
            code=error.get("code"),
            message=str(error.get("message") or resp.text[:200]),
        )

    def __str__(self) -> str:
        return f"{self.status} {self.code or '-'} ({self.reason or 'no reason'})"


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


@dataclass
class Outcome:
    index: int
    final: Final = Final.LOST
    rid: str = ""
    gateway: str = ""  # the gateway of the latest attempt
    events: list[tuple[int, str]] = field(default_factory=list)  # (seq, text) of token events, as received
    token_times: list[float] = field(default_factory=list)
    error: dict[str, Any] | None = None
    last_seq: int = 0  # the last event id received: where a resume starts
    resumes: int = 0
    submits: int = 0
    statuses: list[int] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.events)

    @property
    def streaming(self) -> bool:
        """Tokens have arrived and the stream has not ended: a fault now hits it mid-stream."""
        return bool(self.events) and self.final is Final.LOST

    @property
    def duplicates(self) -> int:
        seqs = [s for s, _ in self.events]
        return len(seqs) - len(set(seqs))

    @property
    def gaps(self) -> bool:
        seqs = [s for s, _ in self.events]
        return seqs != list(range(1, len(seqs) + 1))

    def tokens_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.token_times)


@dataclass
class Spec:
    prompt: str
    seed: int
    max_tokens: int
    chat: bool = False
    model: str = "sim"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        if self.chat:
            return {**body, "messages": [{"role": "user", "content": self.prompt}]}
        return {**body, "prompt": self.prompt}

    def expected(self) -> str:
        if self.chat:
            messages = [{"role": "user", "content": self.prompt}]
            return expected_sim(
                messages=messages, seed=self.seed, max_tokens=self.max_tokens, ignore_eos=True
            )[0]
        return expected_sim(prompt=self.prompt, seed=self.seed, max_tokens=self.max_tokens, ignore_eos=True)[
            0
        ]


class ResumingClient:
    def __init__(
        self, gateways: list[str], *, deadline_s: float = 90.0, read_timeout_s: float = 10.0
    ) -> None:
        self.gateways = gateways  # the list may change while running (restarts)
        self.deadline_s = deadline_s
        self._next = itertools.count()
        # No pool bound: a burst is fired at once, not queued inside the client.
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, read=read_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=50),
        )
        self.outcomes: list[Outcome] = []  # every request so far, live: tests poll them to time faults
        self._loads: list[asyncio.Task[list[Outcome]]] = []

    def gateway(self) -> str:
        return self.gateways[next(self._next) % len(self.gateways)]

    def streaming(self, gateway: str | None = None) -> list[Outcome]:
        """Requests mid-stream now (on ``gateway``, if given)."""
        return [o for o in self.outcomes if o.streaming and gateway in (None, o.gateway)]

    def start(
        self, specs: list[Spec], *, rate: float | None, tag: str, until: asyncio.Event | None = None
    ) -> asyncio.Task[list[Outcome]]:
        """Run :func:`load` in the background; :meth:`close` cancels it if it is still running."""
        task = asyncio.create_task(load(self, specs, rate=rate, tag=tag, until=until))
        self._loads.append(task)
        return task

    async def close(self) -> None:
        for task in self._loads:
            task.cancel()
        await asyncio.gather(*self._loads, return_exceptions=True)
        await self.http.aclose()

    async def run(self, index: int, spec: Spec, key: str) -> Outcome:
        out = Outcome(index)
        self.outcomes.append(out)
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline and out.final is Final.LOST:
            wait_s = 0.0
            out.gateway = url = self.gateway()
            try:
                async with self._open(url, spec, key, out) as resp:
                    out.statuses.append(resp.status_code)
                    if resp.status_code == 200:
                        out.rid = out.rid or resp.headers["x-breakwater-request-id"]
                        # Returns at [DONE] or an error event; otherwise the stream was cut: resume.
                        await self._read(resp, out)
                        continue
                    await resp.aread()
                    refusal = Refusal.of(resp)
                    out.refusals.append(refusal)
                    if refusal.status == 429:
                        out.final = Final.REJECTED
                    elif refusal.status == 503 and refusal.retry_after is not None:
                        wait_s = refusal.retry_after  # unavailable for now, and it says when to come back
                    else:
                        out.final = Final.FAILED
            except (httpx.HTTPError, OSError):
                wait_s = 0.1  # the gateway went away (or the stream broke): go on at the next one
            await asyncio.sleep(wait_s)
        return out

    def _open(
        self, url: str, spec: Spec, key: str, out: Outcome
    ) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        if not out.rid:
            out.submits += 1
            return self.http.stream(
                "POST", f"{url}{spec.path}", json=spec.body(), headers={"Idempotency-Key": key}
            )
        out.resumes += 1
        return self.http.stream(
            "GET", f"{url}/v1/requests/{out.rid}/events", headers={"Last-Event-ID": str(out.last_seq)}
        )

    async def _read(self, resp: httpx.Response, out: Outcome) -> None:
        seq = out.last_seq
        async for line in resp.aiter_lines():
            if line.startswith("id: "):
                seq = int(line[4:])
            elif line == "data: [DONE]":
                out.final = Final.DONE
                return
            elif line.startswith("data: "):
                data = orjson.loads(line[6:])
                if "error" in data:
                    out.final, out.error = Final.ERROR, data["error"]
                    return
                for choice in data.get("choices") or []:
                    text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                    if text:
                        out.events.append((seq, text))
                        out.token_times.append(time.monotonic())
                out.last_seq = seq  # only once the event's data is in: a cut mid-event resumes before it


@dataclass
class Books:
    scenario: str
    submitted: int
    completed: int
    errored: int
    rejected: int
    failed: int
    lost: int
    wrong_text: int
    duplicated_tokens: int
    gaps: int
    recovery_s: float  # the longest pause any client saw between two tokens
    errors: dict[str, int]  # error events by code
    failures: dict[str, int]  # responses that failed a request, by status and code
    refused: dict[str, int]  # every non-200 answer (retried or final), by status, code and reason

    def balanced(self) -> bool:
        return self.submitted == self.completed + self.errored + self.rejected

    def save(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{self.scenario}.json").write_bytes(orjson.dumps(self.__dict__))


def _count(keys: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return counts


def books(scenario: str, specs: list[Spec], outcomes: list[Outcome]) -> Books:
    wrong = sum(
        o.final is Final.DONE and o.text != spec.expected() for spec, o in zip(specs, outcomes, strict=True)
    )
    pauses = [b - a for o in outcomes for a, b in itertools.pairwise(o.token_times)]
    result = Books(
        scenario=scenario,
        submitted=len(outcomes),
        completed=sum(o.final is Final.DONE for o in outcomes),
        errored=sum(o.final is Final.ERROR for o in outcomes),
        rejected=sum(o.final is Final.REJECTED for o in outcomes),
        failed=sum(o.final is Final.FAILED for o in outcomes),
        lost=sum(o.final is Final.LOST for o in outcomes),
        wrong_text=wrong,
        duplicated_tokens=sum(o.duplicates for o in outcomes),
        gaps=sum(o.gaps for o in outcomes if o.final is Final.DONE),
        recovery_s=round(max(pauses, default=0.0), 2),
        errors=_count(str((o.error or {}).get("code")) for o in outcomes if o.final is Final.ERROR),
        failures=_count(str(o.refusals[-1]) for o in outcomes if o.final is Final.FAILED),
        refused=_count(str(r) for o in outcomes for r in o.refusals),
    )
    result.save()
    return result


async def load(
    client: ResumingClient,
    specs: list[Spec],
    *,
    rate: float | None,
    tag: str,
    until: asyncio.Event | None = None,
) -> list[Outcome]:
    """Start one request every ``1/rate`` s (open loop; ``None``: all at once), stopping early once
    ``until`` is set, and wait for all that started. Cancelling it cancels every request it started."""
    async with asyncio.TaskGroup() as group:
        tasks = []
        for i, spec in enumerate(specs):
            if until is not None and until.is_set():
                break
            tasks.append(group.create_task(client.run(i, spec, f"{tag}-{i}")))
            if rate is not None:
                await asyncio.sleep(1.0 / rate)
    return [task.result() for task in tasks]


def make_specs(tag: str, n: int, max_tokens: int = 30) -> list[Spec]:
    """``n`` requests, every other one a chat completion."""
    return [Spec(f"chaos {tag} {i}", 1000 + i, max_tokens, chat=i % 2 == 1) for i in range(n)]


async def poll_for(find: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    """Poll ``find`` until it returns something, with a deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = await find()
        if found is not None:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def metric_sum(urls: list[str], name: str, **labels: str) -> float:
    """The sum over ``urls`` (their /metrics) of the samples called ``name`` with ``labels``."""
    total = 0.0
    async with httpx.AsyncClient(timeout=5) as http:
        for url in urls:
            text = (await http.get(f"{url}/metrics")).text
            total += sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == name and labels.items() <= sample.labels.items()
            )
    return total
