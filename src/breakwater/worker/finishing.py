"""A step's ended requests, finished while the batch goes on (mixed into
:class:`~breakwater.worker.worker.Worker`): the final event (fenced by attempt, repaired after a
failover), metering and the ack, a few round trips each, in a task per step, so the batch's other
tokens and new requests' first tokens do not wait for them. A slot counts as taken until its job is
acked; a finish that fails other than transiently stops the step loop with its error."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.broker import Broker, Job, Status
from breakwater.broker.broker import Terminal
from breakwater.broker.errors import until_redis
from breakwater.broker.record import RequestRecord
from breakwater.broker.types import BEHIND
from breakwater.config import WorkerSettings
from breakwater.engines.base import SequenceDelta
from breakwater.engines.stepcost import Rating
from breakwater.logs import caller_fields
from breakwater.worker.jobs import InFlight, error_type
from breakwater.worker.metrics import WorkerMetrics

log = logging.getLogger("breakwater.worker.worker")


class FinishingMixin:
    settings: WorkerSettings
    broker: Broker
    metrics: WorkerMetrics
    model: str
    rating: Rating
    inflight: dict[str, InFlight]
    _background: set[asyncio.Task[None]]
    _background_failed: BaseException | None
    _step_task: asyncio.Task[None] | None
    _slot_freed: asyncio.Event

    def _forget(self, flight: InFlight) -> None:
        raise NotImplementedError

    async def _settle(self, job: Job, record: RequestRecord | None = None) -> None:
        raise NotImplementedError

    def _count_usage(self, tenant: str, status: Status, prompt: int, completion: int) -> None:
        raise NotImplementedError

    async def _repair(self, behind: list[tuple[InFlight, int]], ttl_s: int, rounds: int = 3) -> None:
        raise NotImplementedError

    def _finish_later(self, finishes: list[tuple[InFlight, SequenceDelta]]) -> None:
        """Finish a step's ended requests (a few round trips each: the final event, metering, the
        ack) while the batch's next step runs: the others' tokens and first tokens do not wait for
        them. Their slots count as taken until each is acked. One whose text was just dropped in
        the same step (fenced off, no longer running) is not finished too."""
        if not finishes:
            return
        inflight = self.inflight
        finishes = [(flight, delta) for flight, delta in finishes if inflight.get(flight.job.rid) is flight]
        for _, delta in finishes:
            delta.as_openai_finish()
        self._rate(finishes)
        if finishes:
            self._in_background(self._finish_all(finishes), "finish")

    def _in_background(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Work of the step loop's that runs beside it (a step's finishes, its publish); if it fails
        other than transiently, the step loop stops with its error."""
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if self._background_failed is None:
            self._background_failed = task.exception()
            log.error(f"{task.get_name()} failed", extra={"fields": {"error": repr(self._background_failed)}})
            if self._step_task is not None:
                self._step_task.cancel()
            self._slot_freed.set()  # a drain waiting for its slot stops waiting

    async def _finish_all(self, finishes: list[tuple[InFlight, SequenceDelta]]) -> None:
        """A step's finished requests, together (their round trips share the connection). A
        finished generation is kept until Redis takes it, never dropped: each retries on its own."""
        # The held tokens' logprobs are taken once: a retried finish must send them again.
        ending = [
            until_redis(functools.partial(self._finish, f, d, f.logprobs_with(d.logprobs)), "finish")
            for f, d in finishes
        ]
        # Every one runs to its end before an error (not a transient one: those are retried) is
        # raised, so that none is left running unowned while the worker stops.
        for result in await asyncio.gather(*ending, return_exceptions=True):
            if isinstance(result, asyncio.CancelledError):  # not this task's own cancellation
                raise RuntimeError("a request's finish was cancelled") from result
            if isinstance(result, BaseException):
                raise result

    async def _finish_done(
        self, flight: InFlight, end: Terminal
    ) -> tuple[int, RequestRecord | None, bool | None]:
        """The finish of a request that completed: (its result, the terminal record it read, whether
        it settled the job: metered now or not, None when it did not). On one Redis, with the usage
        known, it settles in the same round trip (``finish_settle.lua``); else it reads the terminal
        record with it, for :meth:`_settle`."""
        usage = end.get("usage") or {}
        completion = usage.get("completion_tokens")
        if flight.billing is not None and completion is not None and self.broker.settles_in_finish:
            prompt = usage.get("prompt_tokens", 0)
            job, billing = flight.job, flight.billing
            seq, metered = await self.broker.finish_settle(job, billing, prompt, completion, **end)
            return seq, None, metered
        seq, record = await self.broker.finish_read(flight.job.rid, **end)
        return seq, record, None

    def _rate(self, finishes: list[tuple[InFlight, SequenceDelta]]) -> None:
        """Finished jobs' lengths rate this worker (with its step cost: engines.stepcost)."""
        for _, delta in finishes:
            if delta.error is None and delta.usage:
                self.rating.finished(
                    delta.usage.get("prompt_tokens", 0), delta.usage.get("completion_tokens", 0)
                )

    async def _finish(self, flight: InFlight, delta: SequenceDelta, logprobs: str) -> None:
        rid = flight.job.rid
        ttl = self.settings.result_ttl_s
        record = None  # the terminal record, read with the finish (one round trip less to settle)
        settled: bool | None = None  # settled in the finish's own call: metered now or not
        if delta.error is not None:
            seq = await self.broker.fail(
                rid,
                attempt=flight.attempt,
                code=delta.error_code or "engine_error",
                message=delta.error,
                ttl_s=ttl,
                error_type=error_type(delta.error_code),
            )
        else:
            end: Terminal = {
                "attempt": flight.attempt,
                "kind": "done",
                "status": Status.DONE,
                "ttl_s": ttl,
                "text": delta.text,
                "tokens": delta.tokens + flight.held_tokens,
                "finish_reason": delta.finish_reason or "stop",
                "usage": delta.usage,
                "logprobs": logprobs,
                "written": flight.writes,
            }
            finish = functools.partial(self._finish_done, flight, end)
            seq, record, settled = await finish()
            for _ in range(3):
                if seq > BEHIND:
                    break
                await self._repair([(flight, BEHIND - seq)], ttl)  # a failover lost writes
                if self.inflight.get(rid) is not flight:  # the repair gave up on it (tokens_lost)
                    return
                seq, record, settled = await finish()
            if seq <= BEHIND:  # still behind: retried whole, like a lost connection
                raise RedisConnectionError("the request's record is still behind its writes")
        if seq == -1:  # another attempt owns the request now; its entry is not ours to ack
            log.warning("finish fenced off", extra={"rid": rid})
        else:
            if settled is None:
                await self._settle(flight.job, record)
            elif settled and flight.billing is not None:
                usage = delta.usage or {}
                prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
                self._count_usage(flight.billing.tenant, Status.DONE, prompt, completion)
            self.metrics.jobs.labels(self.model, "done" if delta.error is None else "error").inc()
            error = delta.error
            failed = {"error": error[:300], "error_code": delta.error_code} if error else {}
            (log.warning if failed else log.info)(  # a failed one says why (the client was told)
                "job finished",
                extra={
                    "rid": rid,
                    "request_id": flight.job.xrid,
                    "fields": {
                        "finish_reason": delta.finish_reason,
                        "usage": delta.usage,
                        **failed,
                        **(caller_fields(b.tenant, b.key) if (b := flight.billing) is not None else {}),
                    },
                },
            )
        self._forget(flight)  # only now: the slot counts as taken until its job is acked
        self._slot_freed.set()
