"""Pull loop, step loop and heartbeat: leases, reclaim with continuation, drain (DESIGN §2-§3)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import replace

from breakwater.broker import Append, Billing, Broker, Job, StartOutcome, Status
from breakwater.broker.errors import TRANSIENT, Backoff, until_redis
from breakwater.broker.record import RequestRecord
from breakwater.broker.types import BEHIND
from breakwater.config import WorkerSettings
from breakwater.engines.base import (
    Engine,
    EngineRequestError,
    GenerationRequest,
    SequenceDelta,
)
from breakwater.engines.stepcost import Rating
from breakwater.keys import queues
from breakwater.logs import caller_fields
from breakwater.rollout.aliases import served_name
from breakwater.runtime import settle_heap
from breakwater.stopping import report_stuck, stop_loops
from breakwater.worker.finishing import FinishingMixin
from breakwater.worker.jobs import InFlight, generation_request, refusal, refused_write
from breakwater.worker.liveness import LivenessMixin
from breakwater.worker.metrics import WorkerMetrics
from breakwater.worker.preempting import PreemptingMixin
from breakwater.worker.preemption import Preemption
from breakwater.worker.pulling import PullingMixin
from breakwater.worker.repair import RepairMixin

log = logging.getLogger(__name__)


class Worker(LivenessMixin, PreemptingMixin, PullingMixin, RepairMixin, FinishingMixin):
    def __init__(
        self, settings: WorkerSettings, engine: Engine, broker: Broker, metrics: WorkerMetrics | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.broker = broker
        # A version (issue 19) is a model name of its own: its queue, its registration, its metrics.
        self.model = served_name(engine.info.model, settings.model_version)
        # Its job queues: the model's, or the partitions of a hot model (gateway.partitions).
        self.queues = queues(self.model, settings.partitions_of(self.model))
        self._rotor = 0  # which partition the next pull starts from (round robin)
        self._unreachable: dict[str, tuple[float, float]] = {}  # queue -> (skipped until, for how long)
        self.metrics = metrics or WorkerMetrics()
        self.metrics.hourly_cost.labels(self.model).set(settings.hourly_cost_usd)
        # Series exist from the start (at 0), so rate() and increase() in alerts see a baseline.
        self.metrics.dead_letters.labels(self.model)
        self.metrics.retries.labels(self.model)
        # Resolved once: labels() on every step or token costs a lock and a dict lookup each time.
        self._tokens = self.metrics.tokens.labels(self.model)
        self._step_seconds = self.metrics.step_seconds.labels(self.model)
        self._busy = self.metrics.engine_busy.labels(self.model)
        self._running = self.metrics.running.labels(self.model)
        self._occupancy = self.metrics.batch_occupancy.labels(self.model)
        self.inflight: dict[str, InFlight] = {}
        # Jobs waiting (leases kept) for an empty engine: (job, whether Redis called it a suspect).
        self.held: list[tuple[Job, bool]] = []
        self.draining = False
        self._stop = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._last_reclaim = 0.0
        # When the running engine step began (None between steps): a step that never returns is a
        # hung worker, which must stop renewing its leases so another worker takes its jobs.
        self._step_started: float | None = None
        self.hung = False
        self._suspects = 0  # in-flight jobs whose last attempt made no progress
        self.preemption = Preemption(broker, self.queues)
        self._steps = 0  # engine steps published
        self._stepped = 0  # engine steps returned (published, being published or waiting to be)
        self._stepping = False  # whether the engine runs a step now
        # A step's finished requests are finished here while the batch goes on (_finish_later), and
        # an engine that overlaps_publish steps while the last step is published; such a task that
        # fails other than transiently stops the step loop with its error.
        self._background: set[asyncio.Task[None]] = set()
        self._background_failed: BaseException | None = None
        self._step_task: asyncio.Task[None] | None = None
        # Its own capacity for the autoscaler (heartbeat `rated`): step cost fitted from its steps.
        self.rating = Rating(engine.info.capacity)

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, *, burst: bool = False) -> None:
        """Serve until :meth:`drain` (or, with ``burst``, until the queue is empty and nothing runs)."""
        for queue in self.queues:
            await self.broker.ensure_groups(queue)
        await self._heartbeat_once()
        settle_heap()
        self._step_task = asyncio.create_task(self._step_loop(), name="step")
        tasks = [
            self._step_task,
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        ]
        if self.settings.preempt:
            tasks.append(asyncio.create_task(self.preemption.watch(self._slot_freed), name="joins"))
        pull = asyncio.create_task(self._pull_loop(burst), name="pull")
        try:
            done, _ = await asyncio.wait([pull, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # an engine crash propagates: the process dies, its jobs are reclaimed
            await self._finish_in_flight()
            if self._background_failed is not None:  # while draining: its jobs were released, now stop
                raise self._background_failed
            log.info("drained", extra={"fields": {"in_flight": len(self.inflight)}})
        finally:
            # Bounded: a loop that does not stop must not keep the process from exiting; say which.
            stuck = await stop_loops([pull, *tasks, *self._background], within_s=5.0)
            # A publish or finish that a step running on started meanwhile.
            stuck |= await stop_loops(self._background - stuck, within_s=1.0)
            report_stuck(log, stuck)
            with contextlib.suppress(*TRANSIENT):
                await self.broker.deregister(self.settings.worker_id)
            log.info("stopped")

    def drain(self) -> None:
        """Stop pulling; in-flight work finishes within the drain grace period."""
        if not self.draining:
            log.info("draining", extra={"fields": {"in_flight": len(self.inflight)}})
        self.draining = True
        self._stop.set()
        self._slot_freed.set()

    async def _finish_in_flight(self) -> None:
        deadline = time.monotonic() + self.settings.drain_grace_s
        with contextlib.suppress(*TRANSIENT):
            await self._heartbeat_once()
        while self.inflight and time.monotonic() < deadline and self._background_failed is None:
            self._slot_freed.clear()
            if self._can_resume():
                await self._resume_paused()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), max(0.01, deadline - time.monotonic()))
        if self.inflight or self.held:
            # Release what is left for immediate reclaim instead of letting its lease time out.
            flights = list(self.inflight.values())
            for flight in flights:
                self.engine.cancel(flight.job.rid)
            with contextlib.suppress(*TRANSIENT):
                held = [job for job, _ in self.held]
                await self.broker.release([f.job for f in flights] + held, self.settings.worker_id)
            self.held.clear()
            log.warning(
                "drain grace over; released jobs for reclaim", extra={"fields": {"rids": list(self.inflight)}}
            )
            self.inflight.clear()
            self._suspects = 0

    # -- pulling ---------------------------------------------------------------------------------
    async def _pull_loop(self, burst: bool) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            if self.held and not self._isolating() and (not self.held[0][1] or not self.inflight):
                await self._start_held()
                continue
            if self._can_resume():  # a preempted sequence goes before any new job
                await self._resume_paused()
                continue
            # The engine may free a slot before the worker has acked that job: count both.
            free = min(self.engine.free_slots(), self.engine.info.capacity - len(self.inflight))
            if self.held or self._isolating():
                free = 0  # a suspect waits for an empty engine, then runs alone until it makes progress
            if self.step_hung():
                free = 0  # a stuck engine takes nothing more; other workers continue what it holds
            if free <= 0:
                await self._wait_for_room()
                continue
            self.preemption.full.clear()
            try:
                jobs = await self._next_jobs(free)
            except TRANSIENT as exc:
                delay = backoff.next_delay()
                log.warning(
                    "claim failed; retrying", extra={"fields": {"error": str(exc), "retry_in_s": delay}}
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            for job in jobs:
                try:
                    await self._start(job)
                except TRANSIENT as exc:  # the job stays pending; its lease lapses and it is reclaimed
                    log.warning("start failed", extra={"rid": job.rid, "fields": {"error": str(exc)}})
            if burst and not jobs and not self.inflight:
                return

    def _forget(self, flight: InFlight) -> None:
        """Forget ``flight`` (not a later start of its request, which may have replaced it)."""
        rid = flight.job.rid
        if self.inflight.get(rid) is not flight:
            return
        del self.inflight[rid]
        if flight.suspect:
            self._suspects -= 1
        if flight.paused:
            self.preemption.paused.remove(flight)

    def _idle(self) -> bool:
        """Nothing runs or waits here: a suspect may run."""
        return not self.inflight and not self.held

    def _isolating(self) -> bool:
        """A suspect is running and has not produced a token yet: nothing else may join its batch."""
        if not self._suspects:  # the common case, checked on every pull without a scan
            return False
        return any(f.suspect and not f.progressed for f in self.inflight.values())

    async def _start_held(self) -> None:
        job, _ = self.held.pop(0)
        try:
            await self._start(job, alone=not self.inflight)
        except TRANSIENT as exc:
            self.held.insert(0, (job, False))
            log.warning("start failed", extra={"rid": job.rid, "fields": {"error": str(exc)}})
            await asyncio.sleep(0.2)

    def _add(self, request: GenerationRequest) -> None:
        """Admit a sequence into the engine; raises :class:`EngineRequestError`."""
        refused = refusal(self.engine, request)
        if refused is not None:
            raise refused
        self.engine.add(request)

    async def _start(self, job: Job, *, alone: bool | None = None) -> None:
        extra = {"rid": job.rid, "request_id": job.xrid}
        if job.rid in self.inflight or any(job == held for held, _ in self.held):
            return  # our own lease lapsed and we reclaimed it: keep it
        if self._isolating():
            self.held.append((job, False))  # not even fenced yet: started once the suspect progresses
            return
        result = job.started or await self.broker.start_job(
            job.rid,
            self.settings.worker_id,
            self.settings.max_attempts,
            result_ttl_s=self.settings.result_ttl_s,
            alone=self._idle() if alone is None else alone,
            detach_grace_s=self.settings.detach_grace_s,
        )
        if result.outcome is StartOutcome.SUSPECT:
            # Its last attempt crashed before any progress: hold it (lease kept) until it can run alone.
            log.warning(
                "holding suspect job to run it alone", extra={**extra, "fields": {"attempt": result.attempt}}
            )
            self.held.append((job, True))
            return
        ttl = self.settings.result_ttl_s
        if result.outcome is not StartOutcome.RUN:
            await self._not_run(job, result.outcome, result.attempt)
            return
        record = result.record
        if record is None:  # RUN always carries its record
            raise RuntimeError(f"start_job returned no record for {job.rid}")
        request = generation_request(job.rid, record)
        if result.attempt > 1:
            self.metrics.retries.labels(self.model).inc()
        if record.created_ms:
            waited_ms = int(time.time() * 1000) - record.created_ms  # cross-host clocks: a metric only
            self.metrics.queue_wait.labels(self.model).observe(max(0, waited_ms) / 1000)
        idle = not self.busy()
        try:
            self._add(request)
        except EngineRequestError as exc:
            await self.broker.fail(
                job.rid,
                attempt=result.attempt,
                code=exc.code,
                message=str(exc),
                ttl_s=ttl,
                error_type=exc.error_type,
                param=exc.param,
            )
            await self._settle(job)
            return
        if self._step_started is None or idle:  # the next step runs this (or the idle one waiting
            self._step_started = time.monotonic()  # for work does): time it from now
        suspect = record.failures > 0
        self.inflight[job.rid] = InFlight(
            job=replace(job, started=None),  # not the record with its prompt, for the whole run
            attempt=result.attempt,
            model=self.model,
            billing=Billing.of(record),
            suspect=suspect,
            # Penalties too: an engine that continues by prompting with the text so far (vLLM, an
            # upstream) would count only the tokens after a pause; llama.cpp's continues them.
            constrained=request.output_format is not None
            or bool(request.presence_penalty or request.frequency_penalty),
            tools=request.tools is not None,
            position=record.tokens,
        )
        self._suspects += suspect
        log.info(
            "job started",
            extra={
                **extra,
                "fields": {
                    "attempt": result.attempt,
                    "continued_tokens": request.emitted_tokens,
                    **caller_fields(record.spec.tenant, record.spec.key_id),
                },
            },
        )

    async def _not_run(self, job: Job, outcome: StartOutcome, attempt: int) -> None:
        """A job the start found not to run (not a suspect): end its request as ``outcome`` says
        (unless it has ended), then acknowledge it."""
        extra = {"rid": job.rid, "request_id": job.xrid}
        ttl = self.settings.result_ttl_s
        if outcome is StartOutcome.DETACHED:  # its client left while it was queued
            await self.broker.cancel(job.rid, ttl, reason="no client reattached within the grace period")
        elif outcome is StartOutcome.EXPIRED:
            await self.broker.expire(job.rid, ttl)
            self.metrics.jobs.labels(self.model, "expired").inc()
        elif outcome is StartOutcome.POISON:
            reason = f"gave up after {attempt} attempts"
            await self.broker.fail(
                job.rid, attempt=None, code="max_attempts_exceeded", message=reason, ttl_s=ttl
            )
            await self.broker.dead_letter(self.model, job.rid, reason, attempt)
            self.metrics.dead_letters.labels(self.model).inc()
            log.error("dead-lettered job", extra={**extra, "fields": {"attempts": attempt}})
        if outcome in (StartOutcome.MISSING, StartOutcome.TERMINAL, StartOutcome.DETACHED):
            log.info("skipping job", extra={**extra, "fields": {"outcome": outcome.value}})
        await self._settle(job)

    # -- stepping and publishing -----------------------------------------------------------------
    async def _step_loop(self) -> None:
        try:
            await self._steps_forever()
        except asyncio.CancelledError:
            if self._background_failed is not None:  # cancelled by a failed publish or finish: its error
                raise self._background_failed from None
            raise

    async def _steps_forever(self) -> None:
        overlap = self.engine.overlaps_publish
        publishing: asyncio.Task[None] | None = None
        while True:
            busy_since = self._step_started = time.monotonic() if self.busy() else None
            self._stepping = True
            deltas = await self.engine.step()
            self._stepping = False
            self._stepped += 1
            self._step_started = None
            if busy_since is not None:
                self._busy.inc(time.monotonic() - busy_since)
            shape = self.engine.last_step()
            # Each delta's sequence as of now: while the last step is published, a sequence may be
            # dropped and its request started again here; this step's token is not the new one's.
            owned = self._owned(deltas)
            if publishing is not None:
                await publishing  # the last step's writes first: each request's tokens stay in order
            if overlap:  # the engine's next step runs while this one is published
                publishing = self._in_background(self._publish_step(owned), "publish")
            else:
                await self._publish_step(owned)
            if busy_since is not None and shape is not None:
                # The whole cycle, until the engine may step again (the step before published; the
                # engine that does not overlap waits for this one's too): what a full worker's
                # steps take. A step that began idle waited for work first: not fitted.
                self.rating.fit.add(time.monotonic() - busy_since, *shape)

    def _owned(self, deltas: list[SequenceDelta]) -> list[tuple[InFlight, SequenceDelta]]:
        """A step's deltas with the sequences that made them (those of dropped sequences left out)."""
        inflight = self.inflight
        return [(flight, d) for d in deltas if (flight := inflight.get(d.request_id)) is not None]

    async def _publish_step(self, owned: list[tuple[InFlight, SequenceDelta]]) -> None:
        started = time.perf_counter()
        await self._publish(owned)
        self._steps += 1
        if self.preemption.paused:
            self._slot_freed.set()  # a paused sequence may continue now
        self._step_seconds.observe(time.perf_counter() - started)
        running = self.engine.running()
        self._running.set(running)
        self._occupancy.set(running / self.engine.info.capacity)

    async def _publish(self, owned: list[tuple[InFlight, SequenceDelta]]) -> None:
        """All of one step's deltas in one pipeline; finished sequences are finished and acked."""
        appends: list[tuple[InFlight, Append]] = []
        finishes: list[tuple[InFlight, SequenceDelta]] = []
        produced = 0
        inflight = self.inflight
        for flight, delta in owned:
            if inflight.get(delta.request_id) is not flight:  # dropped since its step (maybe restarted)
                continue
            produced += delta.tokens
            if delta.finished:
                flight.finishing = True
                if flight.paused:  # it ended in the step it was paused in: nothing to continue
                    self.preemption.paused.remove(flight)
                    flight.paused_at = -1
                finishes.append((flight, delta))
            elif delta.text:
                tokens = delta.tokens + flight.held_tokens
                lp = flight.logprobs_with(delta.logprobs) if delta.logprobs or flight.held_logprobs else ""
                wseq, at = flight.next_write(), flight.position
                append = Append(delta.request_id, flight.attempt, wseq, delta.text, tokens, lp, at)
                flight.position += tokens
                appends.append((flight, append))
                flight.sent.append(append)
                flight.held_tokens = 0
            else:
                flight.held_tokens += delta.tokens
                if delta.logprobs:
                    flight.held_logprobs += delta.logprobs
        self._tokens.inc(produced)
        # Keep the generation; retry the same step's writes until Redis is back (they are idempotent).
        results = await until_redis(lambda: self.broker.append_step([a for _, a in appends]), "publish")
        behind = [
            (flight, BEHIND - seq) for (flight, _), seq in zip(appends, results, strict=True) if seq <= BEHIND
        ]
        if behind:
            await self._repair(behind, self.settings.result_ttl_s)
        for (flight, _), seq in zip(appends, results, strict=True):
            if seq <= BEHIND:
                continue
            if seq > 0 and flight.suspect and not flight.progressed:
                flight.progressed = True
                self._slot_freed.set()  # others may join the batch again
            if seq < 0:
                fenced, why = refused_write(seq, flight.job.rid)
                await until_redis(functools.partial(self._drop, flight, fenced=fenced, why=why), "drop")
        self._finish_later(finishes)

    async def _settle(self, job: Job, record: RequestRecord | None = None) -> None:
        """Acknowledge a job whose request this worker ended (or found ended): its usage is metered
        first, so a crash between the two leaves the job to be reclaimed, metered (once) and acked."""
        metered = await self.broker.settle(job, record)
        if metered is not None:
            usage = metered.usage or {}
            prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", metered.tokens)
            self._count_usage(metered.spec.tenant, metered.status, prompt, completion)

    def _count_usage(self, tenant: str, status: Status, prompt: int, completion: int) -> None:
        """A request metered now, in this worker's per-tenant counters."""
        label = self.settings.tenant_label(tenant)
        self.metrics.tenant_requests.labels(label, status.value).inc()
        self.metrics.tenant_tokens.labels(label, "prompt").inc(prompt)
        self.metrics.tenant_tokens.labels(label, "completion").inc(completion)

    async def _drop(self, flight: InFlight, *, fenced: bool, why: str) -> None:
        """Stop a sequence whose request was cancelled, finished or taken over elsewhere."""
        rid = flight.job.rid
        if self.inflight.get(rid) is not flight:  # dropped already, maybe started again since: not ours
            return
        self.engine.cancel(rid)
        if not fenced:
            await self._settle(flight.job)
        self._forget(flight)
        self.metrics.jobs.labels(self.model, "dropped").inc()
        log.info("sequence dropped", extra={"rid": rid, "fields": {"why": why}})
        self._slot_freed.set()
