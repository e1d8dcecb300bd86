"""Which jobs a worker pulls next: lapsed leases, then new jobs, from every partition of its model's
queue in turn (mixed into :class:`~breakwater.worker.worker.Worker`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from breakwater.broker import Broker, Fence, Job
from breakwater.broker.errors import TRANSIENT
from breakwater.config import WorkerSettings
from breakwater.keys import LANES

log = logging.getLogger(__name__)


class PullingMixin:
    broker: Broker
    settings: WorkerSettings
    queues: tuple[str, ...]
    _rotor: int
    _unreachable: dict[str, tuple[float, float]]
    _last_reclaim: float

    async def _next_jobs(self, free: int) -> list[Job]:
        """Up to ``free`` jobs: lapsed leases (every heartbeat), then new jobs, interactive before
        batch, from the partitions in turn (each pull starts from the next one); when there are none,
        a short blocking read on one interactive queue, the next one each time (``block_ms`` shared
        out, so a job on another partition waits at most that share)."""
        jobs: list[Job] = []
        self._rotor = (self._rotor + 1) % len(self.queues)
        turn = self._reachable(self.queues[self._rotor :] + self.queues[: self._rotor])
        worker_id = self.settings.worker_id
        failed: list[BaseException] = []
        if time.monotonic() - self._last_reclaim >= self.settings.heartbeat_s:
            self._last_reclaim = time.monotonic()
            idle_ms = int(self.settings.lease_s * 1000)
            for lane, queue in ((lane, queue) for lane in LANES for queue in turn):
                if len(jobs) < free:
                    want = free - len(jobs)
                    jobs += await self._from(
                        failed, self.broker.reclaim, queue, lane, worker_id, idle_ms, want, keep=bool(jobs)
                    )
        for lane, queue in ((lane, queue) for lane in LANES for queue in turn):
            if len(jobs) < free:
                want, fence, keep = free - len(jobs), self._fence(jobs), bool(jobs)
                jobs += await self._from(
                    failed, self.broker.claim, queue, lane, worker_id, want, None, fence, keep=keep
                )
        if not jobs and len(failed) < len(turn) * len(LANES):
            block_ms = max(1, self.settings.block_ms // len(self.queues))
            head = turn[0]
            jobs = await self._from(
                failed, self.broker.claim, head, LANES[0], worker_id, free, block_ms, self._fence(jobs)
            )
        if failed and not jobs and all(q in self._unreachable for q in turn):
            raise failed[-1]  # no partition answered: the pull loop backs off
        for job in jobs:
            if not job.rid:  # an entry no request was waiting for: only acknowledged
                try:
                    await self.broker.ack(job)
                except TRANSIENT as exc:  # it stays pending: reclaimed, found empty and acked later
                    log.warning("ack failed", extra={"fields": {"entry": job.entry_id, "error": str(exc)}})
        return [job for job in jobs if job.rid]

    def _fence(self, pulled: list[Job]) -> Fence | None:
        """Let a claim fence the first request it binds (one round trip less to its first token):
        only the pull's first job, which the pull loop starts before any other, so nothing it holds
        back (a suspect running alone) can be fenced early."""
        if pulled:
            return None
        settings = self.settings
        return Fence(
            settings.worker_id,
            settings.max_attempts,
            settings.result_ttl_s,
            alone=self._idle(),
            detach_grace_s=settings.detach_grace_s,
        )

    def _idle(self) -> bool:
        raise NotImplementedError

    def _reachable(self, queues: tuple[str, ...]) -> tuple[str, ...]:
        """The partitions not marked unreachable (all of them when every one is)."""
        now = time.monotonic()
        up = tuple(q for q in queues if self._unreachable.get(q, (0.0, 0.0))[0] <= now)
        return up or queues

    async def _from(
        self,
        failed: list[BaseException],
        claim: Callable[..., Awaitable[list[Job]]],
        queue: str,
        *args: Any,
        keep: bool = False,
    ) -> list[Job]:
        """One partition's ``claim(queue, *args)``. With several partitions, one whose shard fails
        (after the client's own retries) is skipped for a while, longer each time, and the jobs the
        others gave are kept; a model's only queue raises, for the pull loop's backoff, unless this
        pull already holds jobs (``keep``): they are started, not left to lapse (one of them may
        be fenced already, whose lapse would count against it as an attempt without progress)."""
        try:
            got = await claim(queue, *args)
        except TRANSIENT as exc:
            if keep:
                failed.append(exc)
                log.warning("claim failed; starting the jobs pulled", extra={"fields": {"error": str(exc)}})
                return []
            if len(self.queues) == 1:
                raise
            failed.append(exc)
            wait = min(60.0, 2 * self._unreachable.get(queue, (0.0, 2.5))[1])
            self._unreachable[queue] = (time.monotonic() + wait, wait)
            log.warning(
                "a partition's queue is unreachable; skipping it",
                extra={"fields": {"queue": queue, "for_s": wait, "error": str(exc)}},
            )
            return []
        self._unreachable.pop(queue, None)
        return got
