"""``breakwater cache stats|purge``: the response cache's entries (gateway.cache), by model and tenant.

Entries are references to requests, so what an entry holds in Redis is its request's record and token
stream, which live ``result_ttl_s`` after the request ends whether or not it is cached; purging
removes the entries (the next identical request is a miss), not those requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from breakwater.broker import Broker, Status

SCAN_COUNT = 1000


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int  # every entry of the model and tenant asked for
    answers: int  # entries whose request finished successfully: the next identical request hits
    in_flight: int  # entries whose request is queued or generating: the next one attaches to it
    stale: int  # entries whose request failed, was cancelled or expired: the next one takes it over
    entry_bytes: int  # Redis memory of the entries themselves
    answer_bytes: int  # Redis memory of the records and token streams the live entries refer to

    def to_json(self) -> dict[str, int]:
        return {
            "entries": self.entries,
            "answers": self.answers,
            "in_flight": self.in_flight,
            "stale": self.stale,
            "entry_bytes": self.entry_bytes,
            "answer_bytes": self.answer_bytes,
        }


async def stats(index: Broker, broker: Broker, model: str = "", tenant: str = "") -> CacheStats:
    """Count and size the entries of ``model`` and ``tenant`` ('' for any; ``*``: shared models) in
    ``index`` (the cache's Redis), and the requests they refer to in ``broker`` (the queue's)."""
    counts = {"answers": 0, "in_flight": 0, "stale": 0}
    entry_bytes = answer_bytes = entries = 0
    entry_redis: Any = index.redis
    redis: Any = broker.redis
    async for key in entry_redis.scan_iter(match=index.keys.cache_pattern(model, tenant), count=SCAN_COUNT):
        value = await entry_redis.get(key)
        if value is None:  # expired meanwhile
            continue
        rid = value.partition(" ")[0]  # "<rid> <claimed at>"
        entries += 1
        entry_bytes += int(await entry_redis.memory_usage(key) or 0)
        status = await redis.hget(broker.keys.request(rid), "status")
        if status == Status.DONE.value:
            counts["answers"] += 1
        elif status in (Status.QUEUED.value, Status.RUNNING.value):
            counts["in_flight"] += 1
        else:
            counts["stale"] += 1
            continue
        for held in (broker.keys.request(rid), broker.keys.tokens(rid), broker.keys.emitted(rid)):
            answer_bytes += int(await redis.memory_usage(held) or 0)
    return CacheStats(entries, entry_bytes=entry_bytes, answer_bytes=answer_bytes, **counts)


async def purge(index: Broker, model: str = "", tenant: str = "") -> int:
    """Delete the entries of ``model`` and ``tenant`` ('' for any); how many were deleted."""
    deleted = 0
    batch: list[str] = []
    redis: Any = index.redis
    async for key in redis.scan_iter(match=index.keys.cache_pattern(model, tenant), count=SCAN_COUNT):
        batch.append(key)
        if len(batch) >= SCAN_COUNT:
            deleted += int(await redis.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(await redis.unlink(*batch))
    return deleted
