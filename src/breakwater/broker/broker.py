"""Broker: enqueue, claim, fenced token appends, finish, leases, reclaim, registry (DESIGN §2-§4)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from breakwater.keys import GROUP, LANES, Keys
from breakwater.protocol.events import TokenEvent

TERMINAL_STATUSES = frozenset({"done", "error", "cancelled"})
READ_PAGE = 512


def now_ms() -> int:
    return int(time.time() * 1000)


def _script(redis: Redis, name: str) -> AsyncScript:
    source = resources.files("breakwater.broker").joinpath("lua", f"{name}.lua").read_text()
    return redis.register_script(source)


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    accepted: bool
    rid: str
    waiting: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed queue entry."""

    stream: str
    entry_id: str
    rid: str
    request_id: str


@dataclass(frozen=True, slots=True)
class StartResult:
    """Outcome of :meth:`Broker.start_job`: ``run`` with the record, or why not."""

    outcome: str
    attempt: int
    record: dict[str, str]


@dataclass(frozen=True, slots=True)
class Append:
    """One sequence's delta in a step, fenced by ``attempt``."""

    rid: str
    attempt: int
    text: str
    tokens: int


class Broker:
    """All Redis operations; one per process, built around a pooled client."""

    def __init__(self, redis: Redis, keys: Keys, *, token_stream_maxlen: int = 100_000) -> None:
        self.redis = redis
        self.keys = keys
        self.token_stream_maxlen = token_stream_maxlen
        self._enqueue = _script(redis, "enqueue")
        self._start = _script(redis, "start")
        self._append = _script(redis, "append")
        self._finish = _script(redis, "finish")

    # -- admission -------------------------------------------------------------------------------
    async def enqueue(
        self,
        *,
        rid: str,
        model: str,
        lane: str,
        record: dict[str, str],
        max_queued: int,
        request_id: str,
        ttl_s: int,
    ) -> EnqueueResult:
        """Create the request record and queue its job atomically, unless the lane is full."""
        flat: list[str] = []
        for key, value in record.items():
            flat += [key, value]
        res = await self._enqueue(
            keys=[self.keys.jobs(model, lane), self.keys.request(rid)],
            args=[rid, max_queued, GROUP, request_id, ttl_s, *flat],
        )
        code, waiting = int(res[0]), int(res[1])
        if code == -1:
            return EnqueueResult(accepted=False, rid=rid, waiting=0, duplicate=True)
        return EnqueueResult(accepted=code == 1, rid=rid, waiting=waiting)

    async def claim_idempotency_key(self, key: str, rid: str, ttl_s: int) -> str | None:
        """Bind ``key`` to ``rid``; returns the rid it was already bound to, or None if it is new."""
        name = self.keys.idempotency(key)
        if await self.redis.set(name, rid, nx=True, ex=ttl_s):
            return None
        existing: Any = await self.redis.get(name)
        return str(existing) if existing is not None else None

    async def release_idempotency_key(self, key: str, rid: str) -> None:
        name = self.keys.idempotency(key)
        if await self.redis.get(name) == rid:
            await self.redis.delete(name)

    async def jobs_counts(self, model: str, lane: str) -> tuple[int, int]:
        """(jobs ever admitted, jobs ever finished) on a lane: acknowledged entries are deleted, so
        finished = entries-added - length. Global, so every gateway computes the same rates."""
        try:
            info: Any = await self.redis.xinfo_stream(self.keys.jobs(model, lane))
        except Exception as exc:  # no stream yet
            if "no such key" in str(exc).lower():
                return 0, 0
            raise
        added = int(info.get("entries-added", 0))
        return added, added - int(info.get("length", 0))

    async def queue_depth(self, model: str, lane: str) -> tuple[int, int]:
        """(waiting, in flight) for one model and lane; exact: acknowledged entries are deleted."""
        stream = self.keys.jobs(model, lane)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(stream)
            pipe.xpending(stream, GROUP)
            try:
                length, pending = await pipe.execute()
            except Exception as exc:  # no group yet (no worker ever ran): all of it waits
                if "NOGROUP" in str(exc):
                    return int(await self.redis.xlen(stream)), 0
                raise
        in_flight = int(pending["pending"]) if pending else 0
        return max(0, int(length) - in_flight), in_flight

    # -- claiming --------------------------------------------------------------------------------
    async def ensure_groups(self, model: str) -> None:
        for lane in LANES:
            try:
                await self.redis.xgroup_create(self.keys.jobs(model, lane), GROUP, id="0", mkstream=True)
            except Exception as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def claim(
        self, model: str, lane: str, worker_id: str, count: int, block_ms: int | None
    ) -> list[Job]:
        """New jobs for this consumer (``XREADGROUP >``), at most ``count``."""
        stream = self.keys.jobs(model, lane)
        reply: Any = await self.redis.xreadgroup(GROUP, worker_id, {stream: ">"}, count=count, block=block_ms)
        return self._jobs(stream, reply[0][1] if reply else [])

    async def reclaim(self, model: str, lane: str, worker_id: str, min_idle_ms: int, count: int) -> list[Job]:
        """Jobs whose lease lapsed (their worker stopped refreshing them), via ``XAUTOCLAIM``."""
        stream = self.keys.jobs(model, lane)
        reply: Any = await self.redis.xautoclaim(stream, GROUP, worker_id, min_idle_ms, "0-0", count=count)
        entries = reply[1] if len(reply) > 1 else []
        return self._jobs(stream, entries)

    @staticmethod
    def _jobs(stream: str, entries: list[Any]) -> list[Job]:
        jobs = []
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending
                continue
            jobs.append(Job(stream, entry_id, fields.get("rid", ""), fields.get("xrid", "")))
        return jobs

    async def start_job(
        self, rid: str, worker_id: str, max_attempts: int, *, alone: bool = True
    ) -> StartResult:
        """Fence a new attempt; ``alone``: this worker runs nothing else, so it may take a suspect."""
        res = await self._start(
            keys=[self.keys.request(rid)], args=[worker_id, now_ms(), max_attempts, "1" if alone else "0"]
        )
        outcome, attempt = str(res[0]), int(res[1])
        record: dict[str, str] = {}
        if outcome == "run":
            flat = res[2]
            record = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
        return StartResult(outcome, attempt, record)

    async def ack(self, job: Job) -> None:
        """Acknowledge and delete the entry, which keeps queue memory bounded and XLEN exact."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(job.stream, GROUP, job.entry_id)
            pipe.xdel(job.stream, job.entry_id)
            await pipe.execute()

    async def refresh_leases(self, jobs: list[Job], worker_id: str) -> None:
        """Reset the idle time of in-flight entries (``XCLAIM … JUSTID``) so they are not reclaimed."""
        by_stream: dict[str, list[str]] = {}
        for job in jobs:
            by_stream.setdefault(job.stream, []).append(job.entry_id)
        if not by_stream:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xclaim(stream, GROUP, worker_id, 0, list[Any](ids), justid=True)
            await pipe.execute()

    async def release(self, jobs: list[Job], worker_id: str, idle_ms: int = 86_400_000) -> None:
        """Give jobs back for immediate reclaim (drain deadline): their entries look idle for a day, so
        the next ``XAUTOCLAIM`` by any worker takes them and continues them from the emitted text."""
        if not jobs:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.xclaim(job.stream, GROUP, worker_id, 0, [job.entry_id], idle=idle_ms, justid=True)
            await pipe.execute()

    # -- token streams ---------------------------------------------------------------------------
    async def append_step(self, appends: list[Append]) -> list[int]:
        """One engine step's deltas for all sequences, in one pipeline; each append is fenced."""
        if not appends:
            return []
        ts = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for a in appends:
                await self._append(
                    keys=[self.keys.request(a.rid), self.keys.tokens(a.rid)],
                    args=[
                        a.attempt,
                        self.keys.channel(a.rid),
                        self.token_stream_maxlen,
                        a.text,
                        a.tokens,
                        ts,
                    ],
                    client=pipe,
                )
            return [int(x) for x in await pipe.execute()]

    async def finish(
        self,
        rid: str,
        *,
        attempt: int | None,
        kind: str,
        status: str,
        ttl_s: int,
        text: str = "",
        tokens: int = 0,
        finish_reason: str = "",
        usage: dict[str, int] | None = None,
        error: dict[str, Any] | None = None,
    ) -> int:
        """Append the terminal event and mark the record terminal (fenced unless ``attempt`` is None)."""
        res = await self._finish(
            keys=[self.keys.request(rid), self.keys.tokens(rid)],
            args=[
                "*" if attempt is None else attempt,
                self.keys.channel(rid),
                self.token_stream_maxlen,
                kind,
                text,
                tokens,
                finish_reason,
                orjson.dumps(usage).decode() if usage is not None else "",
                orjson.dumps(error).decode() if error is not None else "",
                ttl_s,
                now_ms(),
                status,
            ],
        )
        return int(res)

    async def fail(
        self,
        rid: str,
        *,
        attempt: int | None,
        code: str,
        message: str,
        ttl_s: int,
        status: str = "error",
        error_type: str = "server_error",
    ) -> int:
        """Terminate a request with an error event the client will see."""
        error = {"message": message, "type": error_type, "code": code}
        return await self.finish(rid, attempt=attempt, kind="error", status=status, ttl_s=ttl_s, error=error)

    async def cancel(self, rid: str, ttl_s: int, reason: str = "cancelled by client") -> int:
        """Cancel at once: terminal event now; the worker sees it at its next append and frees the slot."""
        return await self.fail(
            rid,
            attempt=None,
            code="cancelled",
            message=reason,
            ttl_s=ttl_s,
            status="cancelled",
            error_type="cancelled",
        )

    async def read_events(self, rid: str, after: int, count: int = READ_PAGE) -> list[TokenEvent]:
        """Events with seq > ``after`` from the durable stream (entry ids are ``<seq>-0``)."""
        entries: Any = await self.redis.xrange(
            self.keys.tokens(rid), min=f"{after + 1}-0", max="+", count=count
        )
        return [TokenEvent.from_fields(fields) for _, fields in entries]

    async def get_request(self, rid: str) -> dict[str, str]:
        record: Any = await self.redis.hgetall(self.keys.request(rid))
        return dict(record)

    async def statuses(self, rids: list[str]) -> list[dict[str, str | None]]:
        """Status, cancel flag and watcher info of many requests in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid in rids:
                pipe.hmget(self.keys.request(rid), ["status", "watchers", "detached_ms"])
            rows = await pipe.execute()
        return [{"status": r[0], "watchers": r[1], "detached_ms": r[2]} for r in rows]

    async def attach(self, rid: str) -> None:
        await self.redis.hincrby(self.keys.request(rid), "watchers", 1)

    async def detach(self, rid: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.keys.request(rid), "watchers", -1)
            pipe.hset(self.keys.request(rid), "detached_ms", now_ms())
            await pipe.execute()

    # -- registry --------------------------------------------------------------------------------
    async def heartbeat(self, worker_id: str, info: dict[str, Any], ttl_s: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker_alive(worker_id), "1", px=int(ttl_s * 1000))
            pipe.hset(self.keys.workers(), worker_id, orjson.dumps(info).decode())
            await pipe.execute()

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
        alive = await self.redis.mget([self.keys.worker_alive(i) for i in ids])
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

    async def dead_letter(self, model: str, rid: str, reason: str, attempts: int) -> None:
        await self.redis.xadd(
            self.keys.dlq(model),
            {"rid": rid, "reason": reason, "attempts": attempts, "ts_ms": now_ms()},
            maxlen=10_000,
            approximate=True,
        )
