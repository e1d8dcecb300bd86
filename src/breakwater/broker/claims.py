"""Claiming jobs in fair order (DESIGN §3, docs/tenants.md): consumer-group reads and reclaims,
bound to requests by ``bind.lua``, and a full worker's preemption claims. Part of
:class:`~breakwater.broker.Broker`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from breakwater.broker.cluster import Fast
from breakwater.broker.record import RequestRecord
from breakwater.broker.scripts import Script
from breakwater.broker.types import Fence, Job, StartOutcome, StartResult
from breakwater.keys import GROUP, LANES, Keys

RID_MARK = "\x01"  # stands for the request id in a key's template (never in a prefix or an id)


@functools.cache
def _rid_templates(keys: Keys) -> tuple[str, ...]:
    """The request record's, emitted text's and token stream's keys, each as the text before and
    after the request id (``bind_start.lua`` builds them): once per key layout."""
    return tuple(
        part for key in (keys.request, keys.emitted, keys.tokens) for part in key(RID_MARK).split(RID_MARK)
    )


def _jobs(stream: str, rows: Any) -> list[Job]:
    return [
        Job(stream, str(i), str(rid), str(xrid), str(tenant), float(cost or 0), float(weight or 1))
        for i, rid, xrid, tenant, cost, weight in rows
    ]


def start_result(reply: Any) -> StartResult:
    """``start.lua``'s reply: {outcome, attempt} or {'run', attempt, emitted, record as a flat hash}."""
    outcome, attempt = StartOutcome(str(reply[0])), int(reply[1])
    if outcome is not StartOutcome.RUN:
        return StartResult(outcome, attempt)
    flat = reply[3]
    fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
    return StartResult(outcome, attempt, RequestRecord.from_hash(fields, emitted=str(reply[2])))


def grace_arg(grace_s: float | None) -> str:
    """``start.lua``'s detach grace argument: milliseconds, '' for none."""
    return "" if grace_s is None else str(int(grace_s * 1000))


def _pairs(flat: list[str] | None) -> dict[str, str] | None:
    """A raw ``[k1, v1, k2, v2, ...]`` reply as a dict (None: the entry was deleted while pending)."""
    return None if flat is None else dict(zip(flat[::2], flat[1::2], strict=True))


def _unblocked(exc: ResponseError) -> bool:
    """A blocking read ended because its stream moved away (a Redis Cluster slot migration) or
    was deleted: nothing was read; the next read goes where the stream is now."""
    return str(exc).startswith("UNBLOCKED")


class FairClaims:
    """Part of :class:`~breakwater.broker.Broker`."""

    redis: Redis
    fast: Fast
    keys: Keys
    _bind_script: Script
    _bind_start: Script | None
    _blocking: Fast

    async def ensure_groups(self, model: str) -> None:
        for lane in LANES:
            try:
                await self.redis.xgroup_create(self.keys.jobs(model, lane), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _fair_keys(self, model: str, lane: str) -> list[str]:
        """``bind.lua``'s keys: the lane's stream, bound entries, counters, backlog and deadlines
        (one slot)."""
        keys = self.keys
        return [
            keys.jobs(model, lane),
            keys.bound(model, lane),
            keys.fair(model, lane),
            keys.backlog(model, lane),
            keys.deadlines(model, lane),
        ]

    async def claim(
        self,
        model: str,
        lane: str,
        worker_id: str,
        count: int,
        block_ms: int | None,
        fence: Fence | None = None,
    ) -> list[Job]:
        """New jobs for this consumer (``XREADGROUP >``), at most ``count``. With ``fence`` (and a
        single Redis) the first request bound is also fenced if it never ran (``Job.started``): one
        round trip less before its first token."""
        stream = self.keys.jobs(model, lane)
        if block_ms is None:  # the common, non-blocking pull: on the hot path's connection
            raw: Any = await self.fast.execute(
                "XREADGROUP", "GROUP", GROUP, worker_id, "COUNT", count, "STREAMS", stream, ">"
            )
        else:
            raw = await self._blocking_read(stream, worker_id, count, block_ms)
        entries = [(i, _pairs(f)) for i, f in raw[0][1]] if raw else []
        return await self._bind(model, lane, entries, fence)

    async def _blocking_read(self, stream: str, worker_id: str, count: int, block_ms: int) -> Any:
        """``XREADGROUP … BLOCK`` on a raw connection of its own (a blocking read would stall every
        command behind it), never longer than half the time after which an unanswered connection
        counts as lost; None when nothing came (or the stream moved away)."""
        timeout_s = self._blocking.timeout_s
        block_ms = block_ms if timeout_s is None else max(1, min(block_ms, int(timeout_s * 500)))
        try:
            return await self._blocking.execute(
                "XREADGROUP",
                "GROUP",
                GROUP,
                worker_id,
                "COUNT",
                count,
                "BLOCK",
                block_ms,
                "STREAMS",
                stream,
                ">",
            )
        except ResponseError as exc:
            if not _unblocked(exc):
                raise
            return None
        except asyncio.CancelledError:
            # The read stays armed in Redis until its connection goes: a job arriving meanwhile
            # would be delivered to this read and wait a lease for its reclaim. Close it (the next
            # read opens another), as redis-py did.
            await self._blocking.aclose()
            raise

    async def reclaim(self, model: str, lane: str, worker_id: str, min_idle_ms: int, count: int) -> list[Job]:
        """Jobs whose lease lapsed (their worker stopped refreshing them). ``XPENDING … IDLE`` finds
        them anywhere in the pending list, reading the list alone (``XAUTOCLAIM`` also looks every
        scanned entry up in the stream: ~7 ms of Redis per call at 10,000 pending); ``XCLAIM`` with
        the same idle time then takes only those still idle (another worker may have taken one
        since) and drops those deleted from the stream."""
        stream = self.keys.jobs(model, lane)
        lapsed: Any = await self.redis.xpending_range(stream, GROUP, "-", "+", count, idle=min_idle_ms)
        if not lapsed:
            return []
        ids = [p["message_id"] for p in lapsed]
        entries: Any = await self.redis.xclaim(stream, GROUP, worker_id, min_idle_ms, ids)
        return await self._bind(model, lane, entries)

    async def _bind(self, model: str, lane: str, entries: list[Any], fence: Fence | None = None) -> list[Job]:
        """The requests these entries stand for, bound in fair order (``bind.lua``; an entry bound
        before, e.g. a reclaimed one, keeps its request); see :meth:`claim` for ``fence``."""
        ids = [entry_id for entry_id, fields in entries if fields is not None]  # None: deleted while pending
        if not ids:
            return []
        if fence is not None and self._bind_start is not None:
            return await self._bind_and_start(model, lane, ids, fence)
        stream = self.keys.jobs(model, lane)
        rows: Any = await self._bind_script(
            keys=self._fair_keys(model, lane),
            args=[self.keys.waiting_prefix(model, lane), "ids", *ids],
        )
        return _jobs(stream, rows)

    async def _bind_and_start(self, model: str, lane: str, ids: list[str], fence: Fence) -> list[Job]:
        assert self._bind_start is not None
        alone = "1" if fence.alone else "0"
        rows, rid, started = await self._bind_start(
            keys=self._fair_keys(model, lane),
            args=[
                self.keys.waiting_prefix(model, lane),
                *_rid_templates(self.keys),
                *(fence.worker_id, fence.max_attempts, alone, fence.result_ttl_s),
                grace_arg(fence.detach_grace_s),
                *ids,
            ],
        )
        jobs = _jobs(self.keys.jobs(model, lane), rows)
        if rid:
            jobs = [replace(j, started=start_result(started)) if j.rid == rid else j for j in jobs]
        return jobs

    async def claim_preempting(
        self, model: str, lane: str, worker_id: str, running: Mapping[str, int]
    ) -> tuple[Job, str] | None:
        """For a full worker: one more job, if a tenant that has received more service than the
        least-served backlogged one runs at least two more sequences here (``bind.lua``'s 'preempt').
        Returns the job and that tenant, which gives up a sequence for it; None: nothing to do."""
        stream = self.keys.jobs(model, lane)
        pairs = [str(v) for tenant, n in running.items() for v in (tenant, n)]
        reply: Any = await self._bind_script(
            keys=self._fair_keys(model, lane),
            args=[self.keys.waiting_prefix(model, lane), "preempt", GROUP, worker_id, *pairs],
        )
        if not reply:
            return None
        victim, rows = reply
        jobs = [job for job in _jobs(stream, rows) if job.rid]
        return (jobs[0], str(victim)) if jobs else None

    async def wait_joins(self, model: str, after: dict[str, str], block_ms: int) -> list[str]:
        """Block until a tenant joins the backlog of a lane of ``model`` (or ``block_ms`` passes);
        returns those lanes. ``after`` (lane -> last entry id seen, ``$`` at first) is updated."""
        lane_of = {self.keys.joins(model, lane): lane for lane in after}
        streams: dict[Any, Any] = {key: after[lane] for key, lane in lane_of.items()}
        try:
            reply: Any = await self.redis.xread(streams, block=block_ms)
        except ResponseError as exc:
            if not _unblocked(exc):
                raise
            return []
        lanes: list[str] = []
        for key, entries in reply or []:
            lane = lane_of[str(key)]
            if entries:
                after[lane] = str(entries[-1][0])
                lanes.append(lane)
        return lanes

    async def tenant_backlog(self, model: str, lane: str) -> dict[str, int]:
        """Requests waiting per tenant (not yet bound to a worker's entry)."""
        tenants: Any = await self.redis.zrange(self.keys.backlog(model, lane), 0, -1)
        if not tenants:
            return {}
        prefix = self.keys.waiting_prefix(model, lane)
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.llen(prefix + tenant)
            counts = await pipe.execute()
        return {str(t): int(n) for t, n in zip(tenants, counts, strict=True)}
