"""The worker registry: heartbeats with a liveness key per worker, and the live set (DESIGN §4)."""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from breakwater.broker.cluster import Fast
from breakwater.broker.wire import Arg, raise_errors
from breakwater.keys import Keys


class WorkerRegistry:
    """Part of :class:`~breakwater.broker.Broker`."""

    redis: Redis
    fast: Fast
    keys: Keys

    async def heartbeat(self, worker_id: str, info: dict[str, Any], ttl_s: float) -> None:
        """On the raw pipeline: one write (one per node on a cluster), failovers retried there."""
        commands: list[tuple[Arg, ...]] = [
            ("SET", self.keys.worker_alive(worker_id), "1", "PX", int(ttl_s * 1000)),
            ("HSET", self.keys.workers(), worker_id, orjson.dumps(info).decode()),
        ]
        raise_errors(await self.fast.pipeline(commands))

    async def deregister(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.worker_alive(worker_id))
            pipe.hdel(self.keys.workers(), worker_id)
            await pipe.execute()

    async def live_workers(self) -> dict[str, dict[str, Any]]:
        """Registered workers whose liveness key is present; stale entries are removed."""
        raw: Any = await self.redis.hgetall(self.keys.workers())
        if not raw:
            return {}
        ids = list(raw)
        # Not MGET: on a cluster the keys span slots.
        alive = raise_errors(await self.fast.pipeline([("GET", self.keys.worker_alive(i)) for i in ids]))
        live: dict[str, dict[str, Any]] = {}
        dead: list[str] = []
        for worker_id, flag in zip(ids, alive, strict=True):
            if flag is None:
                dead.append(worker_id)
            else:
                live[worker_id] = orjson.loads(raw[worker_id])
        if dead:
            await self.redis.hdel(self.keys.workers(), *dead)
        return live
