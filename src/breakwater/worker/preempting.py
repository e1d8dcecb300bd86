"""The worker's preemption half (mixed into :class:`~breakwater.worker.worker.Worker`): while the
engine is full, hear tenants joining the queue, pause a more-served tenant's sequence for one, and
continue paused sequences before any new job. The policy and its state: :mod:`preemption`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from breakwater.broker import Broker, Job, RequestRecord, Status
from breakwater.broker.errors import TRANSIENT, until_redis
from breakwater.config import WorkerSettings
from breakwater.engines.base import CONSTRAINED_CONTINUATION, Engine, EngineRequestError, GenerationRequest
from breakwater.keys import LANES
from breakwater.worker.jobs import InFlight, generation_request
from breakwater.worker.metrics import WorkerMetrics
from breakwater.worker.preemption import Preemption
from breakwater.worker.repair import RepairMixin

log = logging.getLogger("breakwater.worker.worker")

MAX_REPAIRS = 5  # tries to send a paused sequence's lost writes again before failing its request


class PreemptingMixin(RepairMixin):  # a paused sequence's lost writes are repaired
    # The worker's state and steps this half uses (defined by Worker).
    settings: WorkerSettings
    engine: Engine
    broker: Broker
    model: str
    metrics: WorkerMetrics
    inflight: dict[str, InFlight]
    held: list[tuple[Job, bool]]
    draining: bool
    preemption: Preemption
    _steps: int
    _stepped: int
    _stepping: bool
    _slot_freed: asyncio.Event

    def _isolating(self) -> bool:
        raise NotImplementedError

    def step_hung(self) -> bool:
        raise NotImplementedError

    def _add(self, request: GenerationRequest) -> None:
        raise NotImplementedError

    def _forget(self, flight: InFlight) -> None:
        raise NotImplementedError

    async def _start(self, job: Job, *, alone: bool | None = None) -> None:
        raise NotImplementedError

    async def _drop(self, flight: InFlight, *, fenced: bool, why: str) -> None:
        raise NotImplementedError

    async def _settle(self, job: Job) -> None:
        raise NotImplementedError

    async def _wait_for_room(self) -> None:
        """Room comes back when a sequence ends, or (upstream engines) when the upstream's own metrics
        say it has drained its queue: look again at least every 200 ms. Meanwhile a tenant joining
        the queue may take a more-served tenant's slot (preemption.py)."""
        self._slot_freed.clear()
        preempting = self._may_preempt()
        if preempting and self.preemption.joined:
            await self._preempt()
            return
        if preempting:
            self.preemption.full.set()
        else:
            self.preemption.full.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slot_freed.wait(), 0.2)

    def _may_preempt(self) -> bool:
        return self.settings.preempt and not (
            self.held or self.draining or self._isolating() or self.step_hung() or not self.engine.available()
        )

    async def _preempt(self) -> None:
        """Ask Redis, lane by lane, for a joining tenant's job this worker should make room for."""
        joined, self.preemption.joined = self.preemption.joined, set()
        order = sorted(joined, key=lambda ql: LANES.index(ql[1]))
        for k, (queue, lane) in enumerate(order):
            later = set(order[k + 1 :])  # kept for the next look when this one ends the round
            running = self.preemption.running(self.inflight.values(), lane, self._continues_constrained)
            try:
                got = await self.broker.claim_preempting(queue, lane, self.settings.worker_id, running)
            except TRANSIENT as exc:
                log.warning("preemption check failed", extra={"fields": {"error": str(exc)}})
                self.preemption.joined |= later
                return
            if got is None:
                continue
            job, tenant = got
            if self.engine.free_slots() <= 0:
                victim = self.preemption.victim(
                    self.inflight.values(), tenant, lane, self._continues_constrained
                )
                if victim is None:  # nothing here may be paused after all (it ended meanwhile)
                    await self.broker.release([job], self.settings.worker_id)  # another claim takes it
                    self.preemption.joined |= later
                    return
                self._pause(victim, job)
            try:
                await self._start(job)
            except TRANSIENT as exc:  # the job stays pending; its lease lapses and it is reclaimed
                log.warning("start failed", extra={"rid": job.rid, "fields": {"error": str(exc)}})
            self.preemption.joined |= joined  # look again: another tenant may have joined too
            return

    @property
    def _continues_constrained(self) -> bool:
        return CONSTRAINED_CONTINUATION in self.engine.features

    def _pause(self, flight: InFlight, job: Job) -> None:
        self.engine.cancel(flight.job.rid)
        # Continued once every step that may hold a token of it is published: those the engine has
        # returned (one may be being published, the next waits for it) and the one it runs now.
        flight.paused_at = self._stepped + self._stepping
        self.preemption.paused.append(flight)
        self.metrics.preemptions.labels(self.model).inc()
        log.info(
            "sequence preempted",
            extra={"rid": flight.job.rid, "fields": {"tenant": flight.job.tenant, "for": job.tenant}},
        )

    def _can_resume(self) -> bool:
        paused = self.preemption.paused
        return bool(
            paused
            and paused[0].paused_at <= self._steps
            and self.engine.free_slots() > 0
            and not self._isolating()
            and not self.step_hung()
        )

    async def _resume_paused(self) -> None:
        """Continue the oldest paused sequence from the text it emitted (as a reclaim would)."""
        flight = self.preemption.paused[0]
        rid = flight.job.rid
        try:
            record = await self.broker.get_record(rid)
        except TRANSIENT as exc:
            log.warning("resume failed; retrying", extra={"rid": rid, "fields": {"error": str(exc)}})
            await asyncio.sleep(0.2)
            return
        if self.inflight.get(rid) is not flight:  # dropped meanwhile (_forget took it off the list)
            return
        self.preemption.paused.pop(0)
        flight.paused_at = -1
        if record is not None and record.attempt == flight.attempt and record.wseq < flight.writes:
            record = await self._repaired(flight, record)
            if record is None:  # dropped meanwhile, or the lost writes are not all back yet
                return
        if record is None or record.status is not Status.RUNNING or record.attempt != flight.attempt:
            fenced = record is not None and record.attempt != flight.attempt
            drop = functools.partial(self._drop, flight, fenced=fenced, why="ended while paused")
            await until_redis(drop, "drop")
            return
        # Text the engine held back is generated again from the record. Forgotten only now: a step
        # returned before the pause may still be published after it (the publish overlaps the
        # engine's next step), counting into these.
        flight.held_tokens = 0
        flight.held_logprobs = []
        flight.position = record.tokens  # the engine continues from the record's text
        try:
            self._add(generation_request(rid, record))
        except EngineRequestError as exc:
            await until_redis(functools.partial(self._fail_request, flight, exc), "fail")
            return
        log.info("sequence continued", extra={"rid": rid, "fields": {"continued_tokens": record.tokens}})

    async def _repaired(self, flight: InFlight, record: RequestRecord) -> RequestRecord | None:
        """A failover lost some of a paused sequence's writes (every one was published before it
        may continue): send them again before the engine continues from the record's text, else
        the continuation would start short of what clients saw (its writes are refused as out of
        step). The record as the repair left it; None when the sequence was dropped meanwhile (the
        repair fails a request whose writes were lost beyond those kept; a record gone meanwhile is
        dropped by the next heartbeat), or when its writes are not all back yet: then it waits,
        paused, for another try (``MAX_REPAIRS`` in all, then its request fails: ``tokens_lost``)."""
        await self._repair([(flight, record.wseq)], self.settings.result_ttl_s)
        if self.inflight.get(flight.job.rid) is not flight:
            return None
        again = await until_redis(functools.partial(self.broker.get_record, flight.job.rid), "resume")
        if self.inflight.get(flight.job.rid) is not flight:
            return None
        if again is not None and again.attempt == flight.attempt and again.wseq < flight.writes:
            flight.repairs += 1
            if flight.repairs >= MAX_REPAIRS:  # fail it clearly rather than hold the pull loop
                log.error("lost writes not sent again; failing the request", extra={"rid": flight.job.rid})
                await self._lost(flight, self.settings.result_ttl_s)
                return None
            log.warning("lost writes not all sent again; retrying", extra={"rid": flight.job.rid})
            flight.paused_at = self._steps
            self.preemption.paused.insert(0, flight)
            await asyncio.sleep(0.2)
            return None
        return again

    async def _fail_request(self, flight: InFlight, exc: EngineRequestError) -> None:
        await self.broker.fail(
            flight.job.rid,
            attempt=flight.attempt,
            code=exc.code,
            message=str(exc),
            ttl_s=self.settings.result_ttl_s,
            error_type=exc.error_type,
            param=exc.param,
        )
        await self._settle(flight.job)
        self._forget(flight)
        self._slot_freed.set()
