"""Following requests for clients: events with latency metrics, resume, status, cancel, detach."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from prometheus_client import Histogram

from breakwater.broker import Broker, RequestRecord, Status
from breakwater.broker.errors import TRANSIENT
from breakwater.broker.fanin import FanIn
from breakwater.config import GatewaySettings
from breakwater.gateway.errors import APIError
from breakwater.gateway.following import Quiet, RequestGone, Submission, follow_events
from breakwater.gateway.histogram import LoopHistogramChild
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.rollback import Outcomes
from breakwater.protocol.events import TokenEvent
from breakwater.tenancy import Principal

log = logging.getLogger(__name__)
SHOWN_ID = 128  # an id named in an error message is cut to this many characters


def owns(principal: Principal, record: RequestRecord) -> bool:
    """With auth off there is one tenant, and every request is its own."""
    return principal.key is None or record.spec.tenant == principal.tenant


def _not_found(rid: str) -> APIError:
    shown = rid if len(rid) <= SHOWN_ID else f"{rid[:SHOWN_ID]}…"  # (a WebSocket's cancel may be long)
    return APIError(404, f"request `{shown}` not found or expired", code="request_not_found", param="id")


class Handoff(Protocol):
    """Where a stream's live tokens can go straight from the fan-in (gateway.streaming)."""

    def ready(self) -> bool:
        """It would take a token now (the client's connection would write it at once)."""
        ...

    def send(self, event: TokenEvent) -> None: ...


@dataclass(slots=True)
class _Pace:
    """A stream's token times and its TTFT and ITL metrics, kept by its reader and its handoff."""

    last_t: float  # the last token's time (at first, the request's start)
    first: bool  # the first token (its TTFT) is still to come
    model: str
    ttft: Histogram  # by model: its series is made by a first token
    itl: LoopHistogramChild  # the model's
    first_t: float | None = None

    def token(self, now: float) -> None:
        """A token with text went to the client at ``now``."""
        if self.first:
            self.ttft.labels(self.model).observe(now - self.last_t)
            self.first, self.first_t = False, now
        else:
            self.itl.observe(now - self.last_t)
        self.last_t = now


def _hand_on(handoff: Handoff, pace: _Pace, event: TokenEvent) -> bool:
    """A subscription's sink: a token goes to ``handoff`` when it is ready."""
    if event.kind != "token" or not handoff.ready():
        return False
    handoff.send(event)
    if event.text:  # once it is written: a send that fails leaves the event to the reader, uncounted
        pace.token(time.perf_counter())
    return True


class Requests:
    def __init__(
        self,
        settings: GatewaySettings,
        broker: Broker,
        fanin: FanIn,
        metrics: GatewayMetrics,
        outcomes: Outcomes | None = None,
        queues: Callable[[str], Sequence[str]] = lambda model: (model,),
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.fanin = fanin
        self.metrics = metrics
        self.outcomes = outcomes or Outcomes()
        self.queues = queues  # a model's job queues (its partitions: gateway.partitions)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def record(self, rid: str, principal: Principal) -> RequestRecord:
        """The request's record, if ``principal``'s tenant owns it: another tenant's request is "not
        found" (404, not 403), so an id reveals nothing about requests that are not the caller's."""
        record = await self.broker.get_record(rid)
        if record is None or not owns(principal, record):
            raise _not_found(rid)
        return record

    async def resume(self, rid: str, principal: Principal) -> Submission:
        """Follow an existing request again (another connection, gateway or socket)."""
        record = await self.record(rid, principal)
        if not await self.broker.attach(rid):
            raise _not_found(rid)
        return Submission.of(rid, record, await self.fanin.subscribe(rid))

    async def cancel(self, rid: str, principal: Principal) -> RequestRecord:
        record = await self.record(rid, principal)
        if record.shared > 0 and not record.status.terminal:
            # Clients that came through the response cache follow it: it runs on for them.
            raise APIError(
                409,
                f"request `{rid}` is the answer to {record.shared} client(s) that came through the "
                "response cache and keeps running for them; close your stream to stop receiving it "
                "(a request nobody follows is cancelled after the detach grace period)",
                code="request_shared",
                param="id",
            )
        cancelled = await self.broker.cancel(rid, self.settings.result_ttl_s)
        if cancelled > 0 and record.status is Status.QUEUED:
            await self.withdraw(rid, record)
        return await self.record(rid, principal)

    async def withdraw(self, rid: str, record: RequestRecord | None = None) -> None:
        """A request cancelled while it waited for a worker: out of its lane and metered now, so
        that its key's concurrency and its place in the queue come back at once, not when a worker
        reads its job (or at its deadline: gateway.deadlines, which also does it if this fails)."""
        record = record or await self.broker.get_record(rid)
        if record is None or not record.deadline_ms:
            return
        spec = record.spec
        try:
            await self.broker.withdraw(rid, spec.lane, record.deadline_ms, self.queues(spec.model))
        except TRANSIENT as exc:
            fields = {"rid": rid, "error": str(exc)}
            log.warning("a cancelled request stays queued", extra={"fields": fields})

    async def events(
        self,
        submission: Submission,
        after: int = 0,
        handoff: Handoff | None = None,
        *,
        keepalive: bool = False,
    ) -> AsyncGenerator[TokenEvent, None]:
        """The request's events after ``after``, with latency metrics; the caller detaches on exit.
        ``handoff``: a live token that finds the reader waiting goes to it from the fan-in's
        callback instead (no task woken per token). ``keepalive``: also :data:`IDLE` events while
        nothing comes for ``sse_keepalive_s`` (a stream's comments)."""
        self.metrics.active_streams.inc()
        model = submission.model
        pace = _Pace(submission.started, after == 0, model, self.metrics.ttft, self.metrics.itl.labels(model))
        live = submission.subscription
        if handoff is not None and live is not None:
            live.sink = partial(_hand_on, handoff, pace)
        following = follow_events(
            self.broker,
            self.fanin,
            submission.rid,
            after,
            idle_poll_s=self.settings.idle_poll_s,
            subscription=submission.subscription,
            fresh=after == 0 and not submission.duplicate and submission.subscription is not None,
            quiet=Quiet(
                keepalive_s=self.settings.sse_keepalive_s if keepalive else 0.0,
                deadline=submission.deadline,
                ttl_s=self.settings.result_ttl_s,
                expired=lambda: self.metrics.queue_timeouts.labels(model).inc(),
            ),
        )
        try:
            # Closed here, not by the event loop's async-generator finalizer hook (a thread-safe
            # wake-up of the loop and a task of its own for each generator left suspended).
            async with aclosing(following):
                async for event in following:
                    now = time.perf_counter()
                    if event.kind == "token" and event.text:
                        pace.token(now)
                    if event.terminal:
                        self._record_final(submission, event, now, pace.first_t)
                    yield event
        except RequestGone:
            raise _not_found(submission.rid) from None
        finally:
            self.metrics.active_streams.dec()
            if live is not None:
                live.sink = None
                await self.fanin.unsubscribe(live)

    def _record_final(
        self, submission: Submission, event: TokenEvent, now: float, first_t: float | None
    ) -> None:
        model = submission.model
        if event.kind == "done":
            status = "completed"
        else:
            status = "cancelled" if (event.error or {}).get("code") == "cancelled" else "error"
        self.metrics.requests.labels(model, status).inc()
        if submission.cached and event.usage:
            self.metrics.cache_tokens_saved.labels(model).inc(event.usage.get("completion_tokens", 0))
        if submission.duplicate:
            return
        if not submission.cached:  # the rollback guard's evidence: what this version did
            self.outcomes.add(model, status, None if first_t is None else first_t - submission.started)
        self.metrics.e2e.labels(model).observe(now - submission.started)
        if event.usage:
            self.metrics.tokens.labels(model, "in").inc(event.usage.get("prompt_tokens", 0))
            self.metrics.tokens.labels(model, "out").inc(event.usage.get("completion_tokens", 0))
            out = event.usage.get("completion_tokens", 0)
            if out > 1 and first_t is not None:
                self.metrics.tpot.labels(model).observe((now - first_t) / (out - 1))

    async def release(self, submission: Submission) -> None:
        """Stop following a request before reading any of it."""
        if submission.subscription is not None:
            await self.fanin.unsubscribe(submission.subscription)
        await self.broker.detach(submission.rid, shared=submission.cached)

    def release_later(self, submission: Submission, *, detach: bool = True) -> None:
        """A stream closed before it read any event (its client left at the first write): stop
        following the request, in the background (a closing generator may not wait)."""
        task = asyncio.create_task(self._release(submission, detach))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, submission: Submission, detach: bool) -> None:
        if submission.subscription is not None:
            await self.fanin.unsubscribe(submission.subscription)
        if detach:
            await self._detach(submission.rid, submission.cached)

    def detach_later(self, rid: str, *, shared: bool = False) -> None:
        """The client went away mid-stream: count it out; the worker cancels after the grace period.
        ``shared``: the client came through the response cache."""
        task = asyncio.create_task(self._detach(rid, shared))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _detach(self, rid: str, shared: bool) -> None:
        try:
            await self.broker.detach(rid, shared=shared)
        except TRANSIENT as exc:
            log.warning("detach failed", extra={"rid": rid, "fields": {"error": str(exc)}})
