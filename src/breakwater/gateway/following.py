"""Follow one request's events in seq order: live from the fan-in, gaps and backlog from the stream.

Every reader drops a seq it has already delivered and fills any gap from the durable stream, so the
client sees each event exactly once, in order, whatever Pub/Sub dropped or duplicated. Events that
were trimmed from the stream (``token_stream_maxlen``) cannot be replayed: the reader ends with an
``events_trimmed`` error instead of waiting for them forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from breakwater.broker import Broker, RequestRecord
from breakwater.broker.errors import TRANSIENT, Backoff, reason
from breakwater.broker.fanin import FanIn, GatewayDraining, Subscription
from breakwater.broker.record import Status
from breakwater.broker.types import NOT_DUE
from breakwater.gateway.deadlines import end_queued
from breakwater.gateway.errors import APIError
from breakwater.protocol.events import IDLE, TokenEvent

_SOON_S = 0.05  # the shortest idle spell before a deadline
T = TypeVar("T")
RIDE_OUT_S = 15.0  # a read of a followed request retried this long while Redis is away (a failover)
_PAST_S = 0.02  # how long after a deadline it is asked for (Redis's clock rounds to milliseconds)
_AGAIN_S = 0.25  # a deadline not yet passed on Redis's clock is tried again after this long


class RequestGone(Exception):
    """The request record and its stream no longer exist (never existed or expired)."""


class RedisAway(APIError):
    """Redis stayed unreachable while a request was followed (:func:`_riding_out`): a 503
    ``redis_unavailable`` the stream sends as its last event; the request itself goes on (it is
    detached, as for a client gone), and a batch line is taken up again as after any Redis outage."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(
            503,
            f"the queue became unavailable mid-stream ({reason(exc)}); resume this request shortly",
            type="service_unavailable",
            code="redis_unavailable",
            headers={"Retry-After": "1"},
        )


class RequestEnded(Exception):
    """The request ended with an event its follower had delivered already (a resume from its last
    event, or past it): nothing more will come. ``done``: it ended with its answer, not an error."""

    def __init__(self, rid: str, done: bool) -> None:
        super().__init__(rid)
        self.done = done


@dataclass(slots=True)
class Submission:
    """A request being followed, with its live events already subscribed to."""

    rid: str
    model: str
    chat: bool
    created: int
    include_usage: bool
    subscription: Subscription | None
    started: float = field(default_factory=time.perf_counter)
    duplicate: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* of its admission
    tool: str = ""  # the answer is a call to this function (protocol.tools)
    tool_format: str = ""  # the model chooses its calls, in this format (gateway.autotools)
    cached: bool = False  # an identical request's answer (gateway.cache)
    logprobs: bool = False  # the client asked for logprobs (a whole answer has a list, maybe empty)
    deadline: float = 0.0  # unix s: the end of its queue wait (its ``timeout``); 0: none known

    @classmethod
    def of(cls, rid: str, record: RequestRecord, sub: Subscription | None) -> Submission:
        """A second follower of an existing request (resume, Idempotency-Key replay)."""
        spec = record.spec
        return cls(
            rid,
            spec.model,
            record.chat,
            record.created,
            spec.include_usage,
            sub,
            duplicate=True,
            tool=spec.tool_call,
            tool_format=spec.tool_format,
            logprobs=spec.logprobs >= 0,
            deadline=record.deadline_ms / 1000,
        )


async def record_when_admitted(broker: Broker, rid: str, until: float) -> RequestRecord | None:
    """``rid``'s record, waiting for it until ``until`` (unix s): a request whose id was just bound
    (Idempotency-Key, response cache) may be between its binding and its enqueue for a few ms."""
    while True:
        record = await broker.get_record(rid)
        if record is not None or time.time() > until:
            return record
        await asyncio.sleep(0.02)


def trimmed_event(seq: int, first_kept: int) -> TokenEvent:
    return TokenEvent(
        seq=seq,
        kind="error",
        error={
            "message": f"events {seq}..{first_kept - 1} were trimmed from the stream and cannot be "
            "replayed; read the result with GET /v1/requests/{id}",
            "type": "invalid_request_error",
            "code": "events_trimmed",
        },
    )


async def follow_events(
    broker: Broker,
    fanin: FanIn,
    rid: str,
    after: int,
    *,
    idle_poll_s: float,
    subscription: Subscription | None = None,
    fresh: bool = False,
    quiet: Quiet | None = None,
) -> AsyncGenerator[TokenEvent, None]:
    """Yield events with seq > ``after`` until the terminal one (inclusive); :class:`RequestEnded`
    when the request has ended with an event at or before ``after``. ``fresh``: the subscription
    was made before the request was queued, so nothing is stored that it will not deliver, and the
    first read of the durable stream (two round trips) is skipped. ``quiet``: what to do while
    nothing comes (:class:`Quiet`: keepalives, the queue deadline)."""
    sub = subscription or await fanin.subscribe(rid)
    # The reader's position: the last seq handed on, by it or (live, while it waits) by its sink.
    sub.delivered = max(sub.delivered, after)
    catch_up = not fresh
    quiet = quiet or Quiet()
    quiet.start(sub.delivered)
    try:
        while True:
            _stop_if_draining(fanin, rid)
            if catch_up:  # from the durable stream: at start, after an overflow, a gap or an idle spell
                # Cleared before the read, so a wake-up (overflow, reconnect) during it is not lost;
                # live events buffered meanwhile are deduplicated by seq.
                sub.overflowed = False
                sub.drain()
                progressed = False
                async with aclosing(_backlog(broker, rid, sub.delivered)) as backlog:
                    async for event in backlog:
                        sub.delivered, progressed = event.seq, True
                        yield event
                        if event.terminal:
                            return
                if not progressed and await quiet.spell(broker, rid, sub.delivered):
                    yield IDLE
            catch_up = True
            async with aclosing(_live(sub, quiet.wait(idle_poll_s))) as live:
                async for event in live:
                    if event.seq <= sub.delivered:
                        if event.terminal:  # (never a sink's) it ended where a resume from past it is
                            raise RequestEnded(rid, done=event.kind == "done")
                        continue
                    if event.seq > sub.delivered + 1:
                        break  # gap: re-read the stream
                    sub.delivered = event.seq
                    yield event
                    if event.terminal:
                        return
    finally:
        if subscription is None:
            await fanin.unsubscribe(sub)


@dataclass(slots=True)
class Quiet:
    """What a follower does after each idle spell that found nothing new (so never per event):
    checks the request goes on (:class:`RequestGone`, :class:`RequestEnded`); every ``keepalive_s``
    (0: never) with nothing handed on, an :data:`IDLE`; and at ``deadline`` (unix s, 0: none), if the
    request is still queued, ends it with the ``timeout`` error a worker would give it when it took
    the job (``Broker.expire``: on Redis's clock) and meters it, so that its client does not wait
    past its ``timeout`` for a worker to take it, nor its key's limits hold it until then."""

    keepalive_s: float = 0.0
    deadline: float = 0.0
    ttl_s: int = 3600  # the ended request's retention
    expired: Callable[[], object] | None = None  # called when it ended one (a metric)
    seen: int = -1  # the position at the last spell
    since: float = field(default_factory=time.monotonic)  # nothing handed on since (at least)
    began: float = field(default_factory=time.monotonic)  # the current idle spell's start

    def start(self, delivered: int) -> None:
        self.seen, self.since = delivered, time.monotonic()

    def wait(self, idle_poll_s: float) -> float:
        """The next idle spell (it begins now): no longer than a keepalive's period, nor than the
        deadline (a little past it: Redis's clock decides, in whole milliseconds)."""
        self.began = time.monotonic()
        out = min(idle_poll_s, self.keepalive_s) if self.keepalive_s > 0 else idle_poll_s
        if self.deadline > 0:
            out = min(out, max(self.deadline + _PAST_S - time.time(), _SOON_S))
        return out

    async def spell(self, broker: Broker, rid: str, delivered: int) -> bool:
        """After an idle spell: whether an :data:`IDLE` is due."""
        status = await _check_going(broker, rid, delivered)
        if self.deadline > 0 and status is not Status.QUEUED:
            self.deadline = 0.0  # it started: it runs to its end (the deadline is the queue's)
        elif self.deadline > 0 and time.time() >= self.deadline + _PAST_S:
            await self._expire(broker, rid)
        return self._due(delivered)

    async def _expire(self, broker: Broker, rid: str) -> None:
        try:
            expired = await end_queued(broker, rid, self.ttl_s)
        except TRANSIENT:  # Redis away: asked again shortly (the spell's read rides it out)
            expired = NOT_DUE
        if expired == NOT_DUE:  # not yet on Redis's clock (behind this host's): asked again shortly
            self.deadline = time.time() + _AGAIN_S
            return
        self.deadline = 0.0
        if expired > 0 and self.expired is not None:  # else it had ended, or has no record
            self.expired()

    def _due(self, delivered: int) -> bool:
        if self.keepalive_s <= 0:
            return False
        now = time.monotonic()
        if delivered != self.seen:  # handed on during this spell: so no earlier than its start
            self.seen, self.since = delivered, self.began
        if now - self.since >= self.keepalive_s:
            self.since = now
            return True
        return False


async def _check_going(broker: Broker, rid: str, delivered: int) -> Status:
    """The request's status; :class:`RequestGone` when it has no record (expired, or never
    existed); :class:`RequestEnded` when it ended with an event at or before ``delivered``."""
    found = await _riding_out(partial(broker.progress, rid))
    if found is None:
        raise RequestGone(rid)
    status, last = found
    if status.terminal and last <= delivered:
        raise RequestEnded(rid, done=status is Status.DONE)
    return status


async def _backlog(broker: Broker, rid: str, last: int) -> AsyncGenerator[TokenEvent, None]:
    """The stream's events after ``last``, in order, to the end of what is stored."""
    backlog = await _riding_out(partial(broker.read_events, rid, last))
    while backlog:
        if backlog[0].seq > last + 1:  # seqs are contiguous: the missing ones were trimmed
            yield trimmed_event(last + 1, backlog[0].seq)
            return
        for event in backlog:
            if event.seq != last + 1:
                continue
            last = event.seq
            yield event
            if event.terminal:
                return
        backlog = await _riding_out(partial(broker.read_events, rid, last))


def _stop_if_draining(fanin: FanIn, rid: str) -> None:
    if fanin.draining:
        raise GatewayDraining(rid)


async def _live(sub: Subscription, idle_poll_s: float) -> AsyncGenerator[TokenEvent, None]:
    """Live events until the buffer overflows or nothing arrives for ``idle_poll_s``. While it
    waits, everything it yielded has been handed on: the subscription's sink may take the next."""
    events = sub.events
    while not sub.overflowed:
        if not events:
            handed = sub.delivered
            sub.parked = True
            try:
                await sub.wait(idle_poll_s)
            finally:
                sub.parked = False
            if not events:
                if sub.delivered != handed and not sub.overflowed:
                    continue  # not idle: its sink handed events on meanwhile
                return  # idle (or woken): the caller re-reads the durable stream
            continue
        yield events.popleft()
    sub.drain()


async def _riding_out(read: Callable[[], Awaitable[T]]) -> T:
    """``read()``, retried while Redis is unreachable, read-only or loading for up to
    :data:`RIDE_OUT_S` (a failover longer than the client's own retries: a stream broke mid-body
    with an unhandled error); then a 503 ``redis_unavailable``, which a stream sends as its last
    event (resume it with ``Last-Event-ID`` once Redis is back)."""
    deadline, backoff = time.monotonic() + RIDE_OUT_S, Backoff(base_s=0.05, cap_s=1.0)
    while True:
        try:
            return await read()
        except TRANSIENT as exc:
            delay = backoff.next_delay()  # (jittered: streams that failed together retry apart)
            if time.monotonic() + delay > deadline:
                raise RedisAway(exc) from exc
            await asyncio.sleep(delay)
