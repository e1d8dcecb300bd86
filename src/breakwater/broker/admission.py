"""Admission: a request's record and its job, atomically on one Redis, record then job on a Redis
Cluster (docs/architecture.md, "Redis Cluster"), and the optional wait for replicas. Part of
:class:`~breakwater.broker.Broker`."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from redis.asyncio import Redis

from breakwater.broker.cluster import Fast
from breakwater.broker.errors import TRANSIENT, ReplicaAckError
from breakwater.broker.ledger import Ledger
from breakwater.broker.record import RequestSpec
from breakwater.broker.scripts import Script
from breakwater.broker.types import ENDED, Admission, EnqueueResult
from breakwater.broker.wire import Arg
from breakwater.keys import GROUP, Keys

LANE_NOTE_S = 600.0


class Lane(NamedTuple):
    model: str
    queue: str  # the model's, or one of its partitions' (keys.queues)
    lane: str


@dataclass(frozen=True, slots=True)
class Waiting:
    """A request on a lane's deadlines (enqueue.lua): not yet bound to a worker when last seen."""

    rid: str
    member: str  # its entry: the waiting-list item and the tenant

    @classmethod
    def of(cls, member: str) -> Waiting:
        return cls(member.split("\t", 1)[0], member)


class Admissions:
    """Part of :class:`~breakwater.broker.Broker`."""

    fast: Fast
    keys: Keys
    redis: Redis
    ledger: Ledger
    replica_ack: int
    replica_ack_ms: int
    _admit: Fast
    _enqueue: Script

    async def cancel(self, rid: str, ttl_s: int, reason: str = "cancelled by client") -> int:
        raise NotImplementedError

    async def enqueue(
        self,
        *,
        rid: str,
        spec: RequestSpec,
        max_queued: int,
        result_ttl_s: int,
        cost: int = 0,
        weight: float = 1.0,
        queues: Sequence[str] = (),
    ) -> EnqueueResult:
        """Create the request record and queue its job atomically, unless the lane is full. Safe to
        retry: a second call for the same rid reports it queued without queueing it again. ``cost``
        (estimated tokens) and ``weight`` place it in its tenant's fair share of the lane.
        ``queues``: the model's partitions to try in turn (:func:`~breakwater.keys.queues`; default:
        the model's own queue); a full one passes the job on, and the request is refused (its
        ``waiting``: their total) only when every one is full. The record is written once."""
        flat: list[str] = []
        for key, value in spec.to_hash().items():
            flat += [key, value]
        lane = spec.lane
        targets = list(queues) or [spec.model]
        args: list[Arg] = [
            rid,
            max_queued,
            GROUP,
            spec.request_id,
            result_ttl_s,
            max(1, math.ceil(spec.timeout_s * 1000)),  # a sub-millisecond timeout is 1 ms
            spec.tenant or "anonymous",
            cost,
            repr(weight),
            "",  # the waiting-list key prefix of the queue tried (below)
        ]
        record = self.keys.request(rid)
        created: list[int] = []
        if self.fast.cluster:  # the record first, then its job; see enqueue.lua
            created = [int(x) for x in await self._enqueue(keys=[record], args=["record", *args, *flat])]
        waiting = 0
        for queue in targets:
            args[-1] = self.keys.waiting_prefix(queue, lane)
            lane_keys = [
                self.keys.fair(queue, lane),
                self.keys.backlog(queue, lane),
                self.keys.joins(queue, lane),
                self.keys.deadlines(queue, lane),
            ]
            if not self.fast.cluster:  # one server: record and job in one atomic script
                res = await self._enqueue(
                    keys=[self.keys.jobs(queue, lane), record, *lane_keys], args=["whole", *args, *flat]
                )
            else:
                # An error here leaves the record: the job may have been queued (a lost reply). A
                # retry of the same rid queues it once; without one, the record ends at its deadline.
                res = await self._enqueue(
                    keys=[self.keys.jobs(queue, lane), self.keys.admitted(queue, lane), *lane_keys],
                    args=["job", *args, created[2]],
                )
                if int(res[0]) == 2 and created and created[0] == 1:
                    res = [1, res[1]]  # queued by a call whose reply was lost; its record had expired
            code = int(res[0])
            if code != 0:
                admission = Admission.QUEUED if code == 1 else Admission.ALREADY_QUEUED
                await self._note_lane(spec.model, queue, lane)
                if self.replica_ack:
                    await self.wait_replicas([record, self.keys.jobs(queue, lane)])
                return EnqueueResult(admission, rid, int(res[1]), queue)
            waiting += int(res[1])
        if self.fast.cluster:
            await self._forget(record, args)
        return EnqueueResult(Admission.LANE_FULL, rid, waiting, targets[0] if len(targets) == 1 else "")

    async def _note_lane(self, model: str, queue: str, lane: str) -> None:
        """List the lane among :meth:`lanes` (again every ``LANE_NOTE_S``: a Redis that lost it).
        Its request is queued: a failure here (the set's shard away) is tried again next time."""
        noted = self._lanes_noted.get((queue, lane))
        now = time.monotonic()
        if noted is None or now - noted > LANE_NOTE_S:
            try:
                await self.redis.sadd(self.keys.lanes(), f"{model}\t{queue}\t{lane}")
            except TRANSIENT:
                return
            self._lanes_noted[(queue, lane)] = now

    @functools.cached_property
    def _lanes_noted(self) -> dict[tuple[str, str], float]:
        return {}

    async def lanes(self) -> list[Lane]:
        """Every lane requests were queued on (by any process), for the deadline reaper."""
        members: Any = await self.redis.smembers(self.keys.lanes())
        return sorted(Lane(*str(m).split("\t")) for m in members if str(m).count("\t") == 2)

    async def past_deadline(self, queue: str, lane: str, limit: int) -> list[Waiting]:
        """Requests of a lane that no worker has taken and whose deadline has passed (this host's
        clock: :meth:`~breakwater.broker.Broker.expire` asks Redis's), oldest first."""
        now_ms = int(time.time() * 1000)
        found: Any = await self.redis.zrangebyscore(
            self.keys.deadlines(queue, lane), "-inf", now_ms, start=0, num=limit
        )
        return [Waiting.of(str(m)) for m in found]

    async def unqueue(self, queue: str, lane: str, ended: Sequence[Waiting]) -> list[str]:
        """Take requests that ended while they waited (past their deadline, cancelled) out of their
        lane (``unqueue.lua``): no worker binds them, and their places count toward ``max_queued``
        no more. Returns the rids of those still waiting (no worker had bound them)."""
        if not ended:
            return []
        keys = [self.keys.backlog(queue, lane), self.keys.deadlines(queue, lane), self.keys.fair(queue, lane)]
        args = [self.keys.waiting_prefix(queue, lane), *(w.member for w in ended)]
        return [str(rid) for rid in await self._unqueue(keys=keys, args=args)]

    async def withdraw(self, rid: str, lane: str, deadline_ms: int, queues: Sequence[str]) -> bool:
        """A request cancelled while it waited, out of its lane now (on one of ``queues``, its
        model's) and metered (its key's concurrency and budget hold back): no worker will read it.
        False when no worker-free entry of it was found (a worker had bound it: it settles it)."""
        for queue in queues:
            key = self.keys.deadlines(queue, lane)
            found: Any = await self.redis.zrangebyscore(key, deadline_ms, deadline_ms)
            mine = [w for w in (Waiting.of(str(m)) for m in found) if w.rid == rid]
            if mine:
                await self.ledger.meter_ended(rid)  # first: a crash in between, the reaper unqueues it
                return bool(await self.unqueue(queue, lane, mine))
        return False

    @functools.cached_property
    def _unqueue(self) -> Script:
        return Script(self.fast, "unqueue")

    async def _forget(self, record: str, args: list[Arg]) -> None:
        """Delete a record whose job was not queued, unless a worker started it meanwhile."""
        await self._enqueue(keys=[record], args=["forget", *args])

    async def wait_replicas(self, keys: list[str]) -> None:
        """``WAIT`` until a replica of each key's server acknowledged the writes so far (``replica_ack``
        replicas, ``replica_ack_ms`` at most): an accepted request survives a primary's failover.
        Raises :class:`ReplicaAckError` when too few replicas answered in time and the request was
        cancelled; one a worker had already ended meanwhile (its job is visible during the wait)
        stands: its answer is written, and a client told to retry would have it generated twice."""
        targets = keys if self._admit.cluster else keys[:1]
        acked = await asyncio.gather(
            *(self._admit.execute_at(k, "WAIT", self.replica_ack, self.replica_ack_ms) for k in targets)
        )
        if any(int(n) < self.replica_ack for n in acked):
            rid = keys[0][keys[0].index("{") + 1 : -1]
            reason = "too few replicas acknowledged its admission"
            if await self.cancel(rid, ttl_s=60, reason=reason) == ENDED:
                return
            raise ReplicaAckError(f"{min(int(n) for n in acked)} of {self.replica_ack} replicas acknowledged")
