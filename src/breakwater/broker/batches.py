"""Files and batches in Redis (records of :mod:`breakwater.protocol.batches`), and the lease that
lets one gateway at a time run a batch."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from breakwater.broker.cluster import Fast
from breakwater.broker.scripts import Script
from breakwater.broker.wire import text
from breakwater.keys import Keys
from breakwater.protocol.batches import TERMINAL, BatchRecord, FileRecord

_FILE_FIELDS = ("id", "tenant", "filename", "purpose", "bytes", "created_at", "expires_at")


def _texts(raw: Any) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


class BatchStore:
    def __init__(self, redis: Redis, fast: Fast, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._lease = Script(fast, "rollout_lease")  # take or renew: any single-key lease
        self._release = Script(fast, "lease_release")
        self._answer = Script(fast, "batch_answer")
        self._move = Script(fast, "batch_move")

    # Files
    async def put_file(self, record: FileRecord, data: bytes, ttl_s: int) -> None:
        """The file whole, then listed: a listed file always has its bytes."""
        key = self.keys.file(record.id)
        mapping: dict[Any, Any] = {**record.to_hash(), "data": data}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, ttl_s)
            await pipe.execute()
        await self.redis.zadd(self.keys.files(record.tenant), {record.id: record.created_at})

    async def file(self, file_id: str) -> FileRecord | None:
        raw = await self.redis.hmget(self.keys.file(file_id), list(_FILE_FIELDS))
        if raw[0] is None:
            return None
        return FileRecord.from_hash({k: text(v) for k, v in zip(_FILE_FIELDS, raw, strict=True)})

    async def file_data(self, file_id: str) -> bytes | None:
        data = await self.redis.hget(self.keys.file(file_id), "data")
        return data.encode() if isinstance(data, str) else data

    async def files(self, tenant: str) -> list[FileRecord]:
        """The tenant's files, newest first; ones that expired leave the list here."""
        ids = [text(i) for i in await self.redis.zrevrange(self.keys.files(tenant), 0, -1)]
        found, gone = [], []
        for file_id in ids:
            record = await self.file(file_id)
            (gone.append(file_id) if record is None else found.append(record))
        if gone:
            await self.redis.zrem(self.keys.files(tenant), *gone)
        return found

    async def delete_file(self, record: FileRecord) -> None:
        await self.redis.delete(self.keys.file(record.id))
        await self.redis.zrem(self.keys.files(record.tenant), record.id)

    # Batches
    async def create(self, record: BatchRecord) -> None:
        """The record, then listed (and, unless it failed at once, offered to the runners)."""
        mapping: dict[Any, Any] = record.to_hash()
        await self.redis.hset(self.keys.batch(record.id), mapping=mapping)
        await self.redis.zadd(self.keys.batches(record.tenant), {record.id: record.created_at})
        if record.status not in TERMINAL:
            await self.redis.sadd(self.keys.batches_active(), record.id)

    async def get(self, batch_id: str) -> BatchRecord | None:
        raw = _texts(await self.redis.hgetall(self.keys.batch(batch_id)))
        return BatchRecord.from_hash(raw) if raw else None

    async def put(self, record: BatchRecord, *names: str) -> None:
        """Write the record's fields ``names`` (its status and times, its files)."""
        whole = record.to_hash()
        mapping: dict[Any, Any] = {n: whole[n] for n in names}
        await self.redis.hset(self.keys.batch(record.id), mapping=mapping)

    async def move(self, batch_id: str, from_: tuple[str, ...], to: str, at: int) -> bool:
        """The batch moved to status ``to`` if it is in one of ``from_`` (atomically)."""
        return bool(int(await self._move([self.keys.batch(batch_id)], [" ".join(from_), to, at])))

    async def status(self, batch_id: str) -> str | None:
        value = await self.redis.hget(self.keys.batch(batch_id), "status")
        return None if value is None else text(value)

    async def batches(self, tenant: str) -> list[str]:
        """The tenant's batch ids, newest first."""
        return [text(i) for i in await self.redis.zrevrange(self.keys.batches(tenant), 0, -1)]

    async def forget(self, tenant: str, batch_ids: list[str]) -> None:
        if batch_ids:
            await self.redis.zrem(self.keys.batches(tenant), *batch_ids)

    async def active(self) -> list[str]:
        return sorted(text(i) for i in await self.redis.smembers(self.keys.batches_active()))

    async def answer(self, batch_id: str, index: int, line: bytes, ok: bool) -> bool:
        """Keep the answer to line ``index`` and count it, once (False: it had one)."""
        keys = [self.keys.batch_out(batch_id), self.keys.batch(batch_id)]
        return bool(int(await self._answer(keys, [index, line.decode(), "completed" if ok else "failed"])))

    async def answers(self, batch_id: str) -> dict[int, bytes]:
        raw = await self.redis.hgetall(self.keys.batch_out(batch_id))
        return {int(text(k)): v if isinstance(v, bytes) else str(v).encode() for k, v in raw.items()}

    async def answered(self, batch_id: str) -> set[int]:
        return {int(text(k)) for k in await self.redis.hkeys(self.keys.batch_out(batch_id))}

    async def close(self, record: BatchRecord, ttl_s: int) -> None:
        """A finished batch: its record kept ``ttl_s``, its answers (now in its files) dropped."""
        await self.redis.expire(self.keys.batch(record.id), ttl_s)
        await self.redis.delete(self.keys.batch_out(record.id))
        await self.redis.srem(self.keys.batches_active(), record.id)

    async def drop(self, batch_id: str) -> None:
        """An active batch whose record is gone (expired or deleted by hand)."""
        await self.redis.srem(self.keys.batches_active(), batch_id)

    # Leases
    async def lease(self, batch_id: str, owner: str, ttl_ms: int) -> bool:
        """Take or renew the batch's lease: True while ``owner`` holds it."""
        return bool(int(await self._lease([self.keys.batch_lease(batch_id)], [owner, ttl_ms])))

    async def release(self, batch_id: str, owner: str) -> None:
        await self._release([self.keys.batch_lease(batch_id)], [owner])
