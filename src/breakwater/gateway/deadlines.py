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

from breakwater.broker import Broker
from breakwater.broker.admission import Waiting
from breakwater.broker.errors import TRANSIENT
from breakwater.broker.record import Status
from breakwater.broker.types import NOT_DUE
from breakwater.gateway.autoscale import AutoscaleSignals
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.keys import LANES

log = logging.getLogger(__name__)
REAP_BATCH = 256  # requests ended per lane and tick at most (the rest at the next tick)


async def end_queued(broker: Broker, rid: str, ttl_s: int) -> int:
    """End a request still queued past its deadline with the ``timeout`` error a worker would give
    it when it took the job (``Broker.expire``: on Redis's clock), and meter it: its key's
    concurrency and budget hold are given back now (the worker that reads its job finds it metered).
    Returns ``Broker.expire``'s answer (> 0: ended here; ``NOT_DUE``: not queued, or not yet due)."""
    expired = await broker.expire(rid, ttl_s, queued_only=True)
    if expired > 0:
        record = await broker.get_record(rid)
        if record is not None and record.status.terminal:
            await broker.ledger.meter(record, rid)
    return expired


class QueueReaper:
    """Ends the requests of every known model's lanes that are past their deadline with no worker."""

    def __init__(
        self, broker: Broker, signals: AutoscaleSignals, metrics: GatewayMetrics, ttl_s: int
    ) -> None:
        self.broker = broker
        self.signals = signals
        self.metrics = metrics
        self.ttl_s = ttl_s  # an ended request's retention

    async def tick(self) -> int:
        """One pass over the models live workers serve, those declared or aliased, and those served
        lately; returns how many requests it ended."""
        models = set(await self.signals.registry.models()) | set(self.signals.load)
        ended = 0
        for model in sorted(models):
            for queue in self.signals.partitions.queues(model):
                for lane in LANES:
                    try:
                        ended += await self._reap(model, queue, lane)
                    except TRANSIENT as exc:  # its shard is down: the other queues still go on
                        fields = {"queue": queue, "error": str(exc)}
                        log.warning("deadline reaper: a queue unreachable", extra={"fields": fields})
        return ended

    async def _reap(self, model: str, queue: str, lane: str) -> int:
        due = await self.broker.past_deadline(queue, lane, REAP_BATCH)
        if not due:
            return 0
        answers = await asyncio.gather(*(end_queued(self.broker, w.rid, self.ttl_s) for w in due))
        settled: list[Waiting] = []
        ended = 0
        for waiting, answer in zip(due, answers, strict=True):
            if answer == NOT_DUE and await self._queued(waiting.rid):
                continue  # not yet due on Redis's clock (behind this host's): the next tick
            settled.append(waiting)  # ended now, or before (cancelled, by its follower), or started
            if answer > 0:
                ended += 1
                self.metrics.queue_timeouts.labels(model).inc()
        await self.broker.unqueue(queue, lane, settled)
        return ended

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
