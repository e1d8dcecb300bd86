"""Files and batches in Redis (records of :mod:`breakwater.protocol.batches`), and the lease that
lets one gateway at a time run a batch."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import anyio
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
        self._hold = Script(fast, "files_hold")
        self._delete = Script(fast, "file_delete")
        self._read_end = Script(fast, "file_read_end")
        self._keep = Script(fast, "file_keep")

    # Files: the fields, and the bytes in parts of CHUNK (``data:<i>``): no Redis value grows past it
    # (Redis refuses one over 512 MB), and a reader streams a file part by part.
    async def put_file(self, record: FileRecord, data: bytes, ttl_s: int) -> None:
        writer = self.writer(record, ttl_s)
        await writer.write(data)
        await writer.close()

    def writer(self, record: FileRecord, ttl_s: int) -> FileWriter:
        """A file written part by part; it exists (is found, listed) once closed."""
        return FileWriter(self, record, ttl_s)

    async def file(self, file_id: str) -> FileRecord | None:
        """The file's record; None once it is gone or deleted."""
        raw = await self.redis.hmget(self.keys.file(file_id), [*_FILE_FIELDS, "deleted"])
        if raw[0] is None or raw[-1] is not None:
            return None
        raw = raw[:-1]
        return FileRecord.from_hash({k: text(v) for k, v in zip(_FILE_FIELDS, raw, strict=True)})

    async def begin_read(self, file_id: str) -> None:
        """A download of the file begins (before it is looked up): a delete from now on keeps its
        bytes until :meth:`file_parts` ends (``reading=True``), or DELETED_KEEP_S."""
        readers = self.keys.file_readers(file_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(readers)
            pipe.expire(readers, DELETED_KEEP_S)
            await pipe.execute()

    async def end_read(self, file_id: str) -> None:
        """A download ended (at most once per :meth:`begin_read`; shielded from the cancellation of
        the response that streamed it, so a client that leaves still ends its count)."""
        with anyio.CancelScope(shield=True):
            await self._read_end([self.keys.file_readers(file_id)], [])

    async def file_parts(self, file_id: str, *, reading: bool = False) -> AsyncIterator[bytes]:
        """The file's bytes, part by part (nothing once it is gone). ``reading``: a download that
        called :meth:`begin_read`, which a delete meanwhile lets end whole if it ends within
        DELETED_KEEP_S of the delete (a slower one ends short of its Content-Length)."""
        key = self.keys.file(file_id)
        try:
            parts = int(await self.redis.hget(key, "parts") or 0)
            for i in range(parts):
                if reading:
                    await self.redis.expire(self.keys.file_readers(file_id), DELETED_KEEP_S)
                part = await self.redis.hget(key, f"data:{i}")
                if part is None:
                    return
                yield part.encode() if isinstance(part, str) else part
        finally:
            if reading:
                await self.end_read(file_id)

    async def file_data(self, file_id: str) -> bytes | None:
        """The file's bytes whole (an input file: at most ``files_max_bytes``)."""
        if await self.file(file_id) is None:
            return None
        return b"".join([part async for part in self.file_parts(file_id)])

    async def keep_file(self, file_id: str, ttl_s: int) -> bool:
        """Keep the file at least ``ttl_s`` from now (a running batch's input outlives the batch);
        False when it is gone or was deleted meanwhile."""
        return bool(int(await self._keep([self.keys.file(file_id)], [ttl_s])))

    async def files(self, tenant: str) -> list[str]:
        """The tenant's file ids, newest first."""
        return [text(i) for i in await self.redis.zrevrange(self.keys.files(tenant), 0, -1)]

    async def stored_bytes(self, tenant: str) -> int:
        """The size of the tenant's files (those that expired or were deleted leave its list here)."""
        ids = await self.files(tenant)
        async with self.redis.pipeline(transaction=False) as pipe:
            for file_id in ids:
                pipe.hmget(self.keys.file(file_id), ["bytes", "deleted"])
            found = await pipe.execute()
        sizes = [size if deleted is None else None for size, deleted in found]
        await self.forget_files(tenant, [i for i, size in zip(ids, sizes, strict=True) if size is None])
        return sum(int(size) for size in sizes if size is not None)

    async def hold_quota(self, tenant: str, upload: str, size: int, quota: int) -> tuple[bool, int]:
        """Hold ``size`` bytes of the tenant's file quota for the upload ``upload`` (an id) about to
        be written, if its stored files and the uploads being written now leave room; and the bytes
        those take. The stored sizes are read after the hold is taken, so an upload written whole
        meanwhile is counted (twice at worst, never not at all). Give the hold back with
        :meth:`give_quota` once the file is written (or not); one never given back lapses after
        PENDING_TTL_S."""
        key, member = self.keys.files_held(tenant), f"{upload}:{size}"
        fits, held = await self._hold([key], ["take", member, quota, PENDING_TTL_S])
        taken = await self.stored_bytes(tenant) + int(held)
        if int(fits) and taken + size <= quota:
            return True, taken
        if int(fits):
            await self.give_quota(tenant, upload, size)
        return False, taken

    async def give_quota(self, tenant: str, upload: str, size: int) -> None:
        await self._hold([self.keys.files_held(tenant)], ["give", f"{upload}:{size}"])

    async def forget_files(self, tenant: str, file_ids: list[str]) -> None:
        if file_ids:
            await self.redis.zrem(self.keys.files(tenant), *file_ids)

    async def delete_file(self, record: FileRecord) -> None:
        """Gone for every lookup and list at once (``file_delete.lua``). With a download under way
        its bytes are kept for it (DELETED_KEEP_S from now) and count against the tenant's quota
        meanwhile, so Redis never holds more than the quota; without one they go at once."""
        # The hold first, given back unless the bytes were kept: counted twice for a moment at
        # worst, never not at all.
        held, member = [self.keys.files_held(record.tenant)], f"deleted-{record.id}:{record.bytes}"
        await self._hold(held, ["take", member, QUOTA_ANY, DELETED_KEEP_S])
        keys = [self.keys.file(record.id), self.keys.file_readers(record.id)]
        if int(await self._delete(keys, [DELETED_KEEP_S, int(time.time())])) != 1:
            await self._hold(held, ["give", member])
        await self.redis.zrem(self.keys.files(record.tenant), record.id)

    # Batches
    async def create(self, record: BatchRecord, ttl_s: int) -> None:
        """The record, offered to the runners unless it failed at once (then kept ``ttl_s``), then
        listed: a batch that runs is always found, one listed always has its record."""
        key = self.keys.batch(record.id)
        mapping: dict[Any, Any] = record.to_hash()
        await self.redis.hset(key, mapping=mapping)
        if record.status in TERMINAL:
            await self.redis.expire(key, ttl_s)
        else:
            await self.redis.sadd(self.keys.batches_active(), record.id)
        await self.redis.zadd(self.keys.batches(record.tenant), {record.id: record.created_at})

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

    async def answers(self, batch_id: str, indices: list[int]) -> list[bytes | None]:
        """The answers to lines ``indices`` (None: none yet)."""
        if not indices:
            return []
        raw = await self.redis.hmget(self.keys.batch_out(batch_id), [str(i) for i in indices])
        return [None if v is None else v.encode() if isinstance(v, str) else v for v in raw]

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


CHUNK = 8 << 20
PENDING_TTL_S = 3600
DELETED_KEEP_S = 600  # a deleted file's bytes, from its deletion, for the downloads reading it
QUOTA_ANY = 1 << 62  # a hold that is taken whatever the quota (a deleted file's bytes)


class FileWriter:
    """A file's bytes (UTF-8 text: files are JSON Lines) written in parts of about CHUNK as they
    come, its fields (which make it exist) last."""

    def __init__(self, store: BatchStore, record: FileRecord, ttl_s: int) -> None:
        self.store, self.record, self.ttl_s = store, record, ttl_s
        self.key = store.keys.file(record.id)
        self.size = 0
        self._parts = 0
        self._pending = bytearray()

    async def write(self, data: bytes) -> None:
        self._pending += data
        self.size += len(data)
        while len(self._pending) > CHUNK:
            # Cut between characters: the client reads each part back as UTF-8 text (at most 3
            # continuation bytes follow a character's first byte).
            cut = CHUNK
            while self._pending[cut] & 0xC0 == 0x80 and cut > CHUNK - 3:
                cut -= 1
            await self._flush(bytes(self._pending[:cut]))
            del self._pending[:cut]

    async def _flush(self, part: bytes) -> None:
        """A part; the first drops what an earlier writer of this file left (it stopped half-way).
        The parts live PENDING_TTL_S until the file is closed: a writer that stops leaves nothing
        for long."""
        async with self.store.redis.pipeline(transaction=False) as pipe:
            if not self._parts:
                pipe.delete(self.key)
            pipe.hset(self.key, f"data:{self._parts}", part)
            pipe.expire(self.key, min(PENDING_TTL_S, self.ttl_s))
            await pipe.execute()
        self._parts += 1

    async def close(self) -> FileRecord:
        if self._pending or not self._parts:
            await self._flush(bytes(self._pending))
            self._pending.clear()
        record = replace(self.record, bytes=self.size)
        mapping: dict[Any, Any] = {**record.to_hash(), "parts": self._parts}
        async with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.key, mapping=mapping)
            pipe.expire(self.key, self.ttl_s)
            await pipe.execute()
        await self.store.redis.zadd(self.store.keys.files(record.tenant), {record.id: record.created_at})
        return record
