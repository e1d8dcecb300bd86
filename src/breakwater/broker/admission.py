"""Admission: a request's record and its job, atomically on one Redis, record then job on a Redis
Cluster (docs/architecture.md, "Redis Cluster"), and the optional wait for replicas. Part of
:class:`~breakwater.broker.Broker`."""

from __future__ import annotations

import asyncio
import math

from breakwater.broker.cluster import Fast
from breakwater.broker.errors import ReplicaAckError
from breakwater.broker.record import RequestSpec
from breakwater.broker.scripts import Script
from breakwater.broker.types import Admission, EnqueueResult
from breakwater.broker.wire import Arg
from breakwater.keys import GROUP, Keys


class Admissions:
    """Part of :class:`~breakwater.broker.Broker`."""

    fast: Fast
    keys: Keys
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
        queue: str = "",
    ) -> EnqueueResult:
        """Create the request record and queue its job atomically, unless the lane is full. Safe to
        retry: a second call for the same rid reports it queued without queueing it again. ``cost``
        (estimated tokens) and ``weight`` place it in its tenant's fair share of the lane. ``queue``:
        one of the model's partitions (:func:`~breakwater.keys.queues`; default: the model's own)."""
        flat: list[str] = []
        for key, value in spec.to_hash().items():
            flat += [key, value]
        model, lane = queue or spec.model, spec.lane
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
            self.keys.waiting_prefix(model, lane),
        ]
        lane_keys = [
            self.keys.fair(model, lane),
            self.keys.backlog(model, lane),
            self.keys.joins(model, lane),
        ]
        record = self.keys.request(rid)
        if not self.fast.cluster:  # one server: record and job in one atomic script
            res = await self._enqueue(
                keys=[self.keys.jobs(model, lane), record, *lane_keys], args=["whole", *args, *flat]
            )
        else:  # the record first, then its job; see enqueue.lua
            created = await self._enqueue(keys=[record], args=["record", *args, *flat])
            # An error here leaves the record: the job may have been queued (a lost reply). A retry
            # of the same rid queues it once; without one, the record ends at its deadline.
            res = await self._enqueue(
                keys=[self.keys.jobs(model, lane), self.keys.admitted(model, lane), *lane_keys],
                args=["job", *args],
            )
            if int(res[0]) == 0:
                await self._forget(record, args)
            elif int(res[0]) == 2 and int(created[0]) == 1:
                res = [1, res[1]]  # queued by a call whose reply was lost; its record had expired
        code, waiting = int(res[0]), int(res[1])
        admission = {1: Admission.QUEUED, 0: Admission.LANE_FULL, 2: Admission.ALREADY_QUEUED}[code]
        if self.replica_ack and admission is not Admission.LANE_FULL:
            await self.wait_replicas([record, self.keys.jobs(model, lane)])
        return EnqueueResult(admission, rid, waiting)

    async def _forget(self, record: str, args: list[Arg]) -> None:
        """Delete a record whose job was not queued, unless a worker started it meanwhile."""
        await self._enqueue(keys=[record], args=["forget", *args])

    async def wait_replicas(self, keys: list[str]) -> None:
        """``WAIT`` until a replica of each key's server acknowledged the writes so far (``replica_ack``
        replicas, ``replica_ack_ms`` at most): an accepted request survives a primary's failover.
        Raises :class:`ReplicaAckError` when too few replicas answered in time."""
        targets = keys if self._admit.cluster else keys[:1]
        acked = await asyncio.gather(
            *(self._admit.execute_at(k, "WAIT", self.replica_ack, self.replica_ack_ms) for k in targets)
        )
        if any(int(n) < self.replica_ack for n in acked):
            rid = keys[0][keys[0].index("{") + 1 : -1]
            await self.cancel(rid, ttl_s=60, reason="too few replicas acknowledged its admission")
            raise ReplicaAckError(f"{min(int(n) for n in acked)} of {self.replica_ack} replicas acknowledged")
