"""A request's ``timeout`` is its queue's deadline: one no worker has taken when it passes ends with
the ``timeout`` error, and its key's limits are given back then, not when a worker at last reads its
job. A request a client follows is ended by its follower (:class:`~breakwater.gateway.following.Quiet`);
one nobody follows (a background response, a stream whose client went away, a batch line) by the
first gateway whose :class:`QueueReaper` finds it past its deadline (every gateway runs one: each
end is one atomic call on Redis's clock, so two gateways never both end one). The reaper also takes
the ended requests out of their lane's queue, with those cancelled while they waited, so that they
no longer count toward ``lane_max_queued`` nor wait for a worker to read them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from breakwater.broker import Broker
from breakwater.broker.admission import Lane, Waiting
from breakwater.broker.record import Status
from breakwater.broker.types import ENDED, NOT_DUE
from breakwater.gateway.metrics import GatewayMetrics

T = TypeVar("T")

log = logging.getLogger(__name__)
REAP_BATCH = 256  # requests ended per lane and tick at most (the rest at the next tick)
AT_ONCE = 32  # calls in flight at once


async def end_queued(broker: Broker, rid: str, ttl_s: int) -> int:
    """End a request still queued past its deadline with the ``timeout`` error a worker would give
    it when it took the job (``Broker.expire``: on Redis's clock), and meter it: its key's
    concurrency and budget hold are given back now (the worker that reads its job finds it metered).
    Returns ``Broker.expire``'s answer (> 0: ended here; ``NOT_DUE``: not queued, or not yet due)."""
    expired = await broker.expire(rid, ttl_s, queued_only=True)
    if expired > 0:
        await broker.ledger.meter_ended(rid)
    return expired


class QueueReaper:
    """Ends the requests of every lane (``Broker.lanes``) that are past their deadline with no worker,
    and takes them out of their lane with those cancelled while they waited."""

    def __init__(self, broker: Broker, metrics: GatewayMetrics, ttl_s: int) -> None:
        self.broker = broker
        self.metrics = metrics
        self.ttl_s = ttl_s  # an ended request's retention

    async def tick(self) -> int:
        """One pass over every lane; returns how many requests it ended. A lane that fails (its shard
        down) is logged and passed: the others go on."""
        ended = 0
        for lane in await self.broker.lanes():
            try:
                ended += await self._reap(lane)
            except Exception as exc:
                fields = {"queue": lane.queue, "lane": lane.lane, "error": str(exc)}
                log.warning("deadline reaper: a lane failed", extra={"fields": fields})
        return ended

    async def _reap(self, lane: Lane) -> int:
        due = await self.broker.past_deadline(lane.queue, lane.lane, REAP_BATCH)
        if not due:
            return 0
        answers = await _at_most(AT_ONCE, [end_queued(self.broker, w.rid, self.ttl_s) for w in due])
        settled: list[Waiting] = []
        ended_before: list[str] = []
        for waiting, answer in zip(due, answers, strict=True):
            if answer == NOT_DUE and await self._queued(waiting.rid):
                continue  # not yet due on Redis's clock (behind this host's): the next tick
            settled.append(waiting)  # ended now, or before (cancelled, by its follower), or started
            if answer == ENDED:
                ended_before.append(waiting.rid)
        # One that ended before (a cancel) and still waits was to be metered by the worker that read
        # its job: none will now. Metered first (once: meter.lua), then taken out of the lane.
        await _at_most(AT_ONCE, [self.broker.ledger.meter_ended(rid) for rid in ended_before])
        await self.broker.unqueue(lane.queue, lane.lane, settled)
        expired = sum(1 for a in answers if a > 0)
        if expired:
            self.metrics.queue_timeouts.labels(lane.model).inc(expired)
        return expired

    async def _queued(self, rid: str) -> bool:
        progress = await self.broker.progress(rid)
        return progress is not None and progress[0] is Status.QUEUED

    async def run(self, interval_s: float) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # Redis down: keep serving, try again next tick
                log.warning("deadline reaper failed", extra={"fields": {"error": str(exc)}})
            await asyncio.sleep(interval_s)


async def _at_most(n: int, calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """The calls' results in order, ``n`` in flight at a time (the client's pool is shared)."""
    room = asyncio.Semaphore(n)

    async def one(call: Coroutine[Any, Any, T]) -> T:
        async with room:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))
