"""Broker: the only holder of the Redis client. Admission, claiming, leases, fenced token appends,
finish, following, registry and dead letters (DESIGN §2-§4)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Required, TypedDict

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError
from typing_extensions import Unpack

from breakwater.broker.admission import Admissions
from breakwater.broker.api_keys import KeyStore
from breakwater.broker.appends import Appends
from breakwater.broker.claims import FairClaims, grace_arg, start_result
from breakwater.broker.cluster import ClusterPipelinedRedis
from breakwater.broker.connection import connect_with, fast_client
from breakwater.broker.dead_letters import DeadLetters
from breakwater.broker.fanin import FanIn, Fanin
from breakwater.broker.idempotency import Bindings
from breakwater.broker.ledger import Billing, Ledger, settle_read, settle_record
from breakwater.broker.record import RequestRecord, Status, Watch
from breakwater.broker.registry import WorkerRegistry
from breakwater.broker.rollouts import RolloutStore
from breakwater.broker.scripts import Script
from breakwater.broker.sharded_fanin import ShardedFanin
from breakwater.broker.types import (
    Job,
    Lease,
    StartResult,
)
from breakwater.broker.wire import Arg, Endpoint, raise_errors
from breakwater.config import CommonSettings
from breakwater.keys import GROUP, Keys
from breakwater.protocol.events import TokenEvent

READ_PAGE = 512


class Terminal(TypedDict, total=False):
    """How a request ends (``finish.lua``'s arguments)."""

    attempt: Required[int | None]  # None: whoever runs it (a cancel, an expiry)
    kind: Required[str]  # the terminal event: "done" or "error"
    status: Required[Status]
    ttl_s: Required[int]
    text: str  # the last step's text
    tokens: int
    finish_reason: str
    usage: dict[str, int] | None
    error: dict[str, Any] | None
    logprobs: str
    written: int | None  # the attempt's last write number
    queued_only: bool  # only a request still queued past its deadline (else NOT_DUE)


_SETTLING = (3, 14, 7, 9, 4, 4)  # finish_settle.lua's slices: keys and arguments of its three parts


def _model_lane(stream: str) -> tuple[str, str]:
    """``<prefix>:jobs:{<model>}:<lane>`` -> (model, lane)."""
    head, _, lane = stream.rpartition(":")
    return head[head.index("{") + 1 : -1], lane


class Broker(Admissions, Appends, Bindings, FairClaims, WorkerRegistry, DeadLetters):
    """All Redis operations; one per process, built around a pooled client."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        token_stream_maxlen: int = 100_000,
        socket_timeout_s: float | None = 10.0,
        replica_ack: int = 0,
        replica_ack_ms: int = 200,
        sharded_pubsub: bool = True,
    ) -> None:
        self.redis = redis
        # The hot path (every script: admission, start, appends, finish, leases): one raw pipelined
        # connection (one per primary on a cluster), a fraction of redis-py's CPU per command.
        # Everything else uses ``redis``.
        self.fast = fast_client(redis, socket_timeout_s)
        self.replica_ack = replica_ack
        self.replica_ack_ms = replica_ack_ms
        # WAIT blocks the connection it is sent on until replicas answer: admissions that wait for
        # them get connections of their own, so the token path never waits behind a WAIT.
        self._admit = fast_client(redis, socket_timeout_s) if replica_ack else self.fast
        # A worker's blocking reads for new jobs would stall every command behind them on the hot
        # path's connection: they have one of their own (opened by the first one).
        self._blocking = fast_client(redis, socket_timeout_s)
        # Token events: sharded Pub/Sub on a cluster (each on its request's shard), else classic.
        self.sharded = self.fast.cluster and sharded_pubsub
        self.publish = "SPUBLISH" if self.sharded else "PUBLISH"
        self.keys = keys
        self.token_stream_maxlen = token_stream_maxlen
        self._enqueue = Script(self._admit, "enqueue")
        self._start = Script(self.fast, "start")
        self._append = Script(self.fast, "append")
        # On a cluster: one call per node and step, the sequences' keys in ARGV (append.lua)
        self._append_node = Script(self.fast, "append", flags="allow-cross-slot-keys")
        self._finish = Script(self.fast, "finish")
        self._lease = Script(self.fast, "lease")
        self._watch = Script(self.fast, "watch")
        self._idempotency = Script(self.fast, "idempotency")
        self.ledger = Ledger(self.fast, redis, keys)
        self._bind_script = Script(self.fast, "bind")
        # Bind and fence in one call where the request's keys share the model's server (not a cluster)
        self._bind_start = (
            None if self.fast.cluster else Script(self.fast, "bind_start", parts=("bind", "start"))
        )
        self._ack = Script(self.fast, "ack")
        # Meter and acknowledge in one call where the tenant's and the model's keys share a server
        self._settle = None if self.fast.cluster else Script(self.fast, "settle", parts=("meter", "ack"))
        # ... and a completed request's finish with them
        parts = ("finish", "meter", "ack")
        self._finish_settle = None if self.fast.cluster else Script(self.fast, "finish_settle", parts=parts)

    @classmethod
    def connect(cls, settings: CommonSettings, *, token_stream_maxlen: int = 100_000) -> Broker:
        """A broker over the Redis that ``settings`` describe (URL, ACL user, password file)."""
        redis = connect_with(settings)
        return cls(
            redis,
            Keys(settings.key_prefix),
            token_stream_maxlen=token_stream_maxlen,
            socket_timeout_s=settings.redis_socket_timeout_s,
            replica_ack=settings.replica_ack,
            replica_ack_ms=settings.replica_ack_ms,
            sharded_pubsub=settings.sharded_pubsub,
        )

    async def aclose(self) -> None:
        if self._admit is not self.fast:
            await self._admit.aclose()
        await self._blocking.aclose()
        await self.fast.aclose()
        await self.redis.aclose()

    def api_keys(self, pepper: bytes) -> KeyStore:
        return KeyStore(self.redis, self.keys, pepper, self.fast)

    def rollouts(self) -> RolloutStore:
        return RolloutStore(self.redis, self.fast, self.keys, self.now_ms)

    def fanin(self, buffer: int, on_overflow: Callable[[], None] | None = None) -> FanIn:
        """The process's Pub/Sub, fanned in to per-request buffers: one connection to one server; on
        a cluster, one per primary with subscribers (sharded), or, with classic Pub/Sub, one to any
        primary (classic messages reach every node) that moves to the next after a loss."""
        fast = self.fast
        if not isinstance(fast, ClusterPipelinedRedis):
            return Fanin(fast.endpoint, self.keys, buffer, on_overflow)
        if self.sharded:
            return ShardedFanin(fast, self.keys, buffer, on_overflow)
        turn = itertools.count()

        def next_node() -> Endpoint:
            nodes = fast.primaries or fast.seeds
            return nodes[next(turn) % len(nodes)]

        return Fanin(next_node, self.keys, buffer, on_overflow)

    async def ping(self) -> None:
        await self.redis.ping()

    async def jobs_counts(self, model: str, lane: str) -> tuple[int, int]:
        """(jobs ever admitted, jobs ever finished) on a lane: acknowledged entries are deleted, so
        finished = entries-added - length. Global, so every gateway computes the same rates."""
        try:
            info: Any = await self.redis.xinfo_stream(self.keys.jobs(model, lane))
        except ResponseError as exc:  # no stream yet
            if "no such key" in str(exc).lower():
                return 0, 0
            raise
        added = int(info.get("entries-added", 0))
        return added, added - int(info.get("length", 0))

    async def queue_depth(self, model: str, lane: str) -> tuple[int, int]:
        """(waiting, in flight) for one model and lane; exact: acknowledged entries are deleted, and
        those of requests that ended while they waited (``unqueue.lua``'s ``dead``) not counted."""
        stream = self.keys.jobs(model, lane)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(stream)
            pipe.hget(self.keys.fair(model, lane), "dead")
            pipe.xpending(stream, GROUP)
            length, dead, pending = await pipe.execute(raise_on_error=False)
        if isinstance(pending, ResponseError) and "NOGROUP" in str(pending):
            pending = None  # no group yet (no worker ever ran): all of it waits
        for reply in (length, dead, pending):
            if isinstance(reply, Exception):
                raise reply
        in_flight = int(pending["pending"]) if pending else 0
        return max(0, int(length) - in_flight - int(dead or 0)), in_flight

    # -- starting and settling jobs (claiming: claims.py) ----------------------------------------
    async def start_job(
        self,
        rid: str,
        worker_id: str,
        max_attempts: int,
        *,
        result_ttl_s: int,
        alone: bool = True,
        detach_grace_s: float | None = None,
    ) -> StartResult:
        """Fence a new attempt; ``alone``: this worker runs nothing else, so it may take a suspect;
        ``detach_grace_s``: a request nobody has followed for longer is :attr:`StartOutcome.DETACHED`."""
        res = await self._start(
            keys=[self.keys.request(rid), self.keys.emitted(rid), self.keys.tokens(rid)],
            args=[worker_id, max_attempts, "1" if alone else "0", result_ttl_s, grace_arg(detach_grace_s)],
        )
        return start_result(res)

    async def ack(self, job: Job, used_tokens: int | None = None) -> None:
        """Acknowledge and delete the entry (queue memory bounded, XLEN exact) and forget its binding;
        ``used_tokens``: what the request really cost, which replaces the estimate in its tenant's
        virtual counter."""
        await self._ack(*self._ack_call(job, used_tokens))

    def _ack_call(self, job: Job, used_tokens: int | None) -> tuple[list[str], list[Arg]]:
        """``ack.lua``'s keys and arguments (``settle.lua`` takes them too)."""
        model, lane = _model_lane(job.stream)
        delta = 0.0
        if job.tenant and used_tokens is not None:
            delta = (used_tokens - job.cost) / job.weight
        keys = [
            job.stream,
            self.keys.bound(model, lane),
            self.keys.fair(model, lane),
            self.keys.backlog(model, lane),
        ]
        return keys, [GROUP, job.entry_id, job.tenant, repr(delta)]

    async def refresh_leases(self, leases: list[Lease], worker_id: str, *, result_ttl_s: int) -> list[Lease]:
        """Reset the idle time of in-flight entries this worker still owns (``XCLAIM … JUSTID``) and
        keep their records alive; returns the leases another attempt has taken over meanwhile (they
        are not re-claimed, so the newer owner keeps its entry)."""
        if not leases:
            return []
        # A key keeps at least a minute less than its full TTL, and never less than two minutes (a
        # TTL of 120 s or less: the full one) between extensions, so a long TTL is set again about
        # once a minute instead of at every beat.
        below = max(result_ttl_s - 60, min(result_ttl_s, 120))
        rids = [lease.job.rid for lease in leases]
        keys = [[self.keys.request(rid), self.keys.emitted(rid), self.keys.tokens(rid)] for rid in rids]
        attempts = [lease.attempt for lease in leases]
        if self.fast.cluster:  # one call per request: each one's keys share its slot
            calls = [(k, [result_ttl_s, below, a]) for k, a in zip(keys, attempts, strict=True)]
            owned = [int(x) for [x] in await self._lease.many(calls)]
        else:  # one call for all of them
            flat = [key for k in keys for key in k]
            owned = [int(x) for x in await self._lease(keys=flat, args=[result_ttl_s, below, *attempts])]
        # Finished or cancelled ones (-1) stay claimed until this worker acknowledges them, as its
        # status check does: dropping them here would leave their entries pending unacknowledged.
        lost = [lease for lease, mine in zip(leases, owned, strict=True) if mine == 0]
        kept = [lease.job for lease, mine in zip(leases, owned, strict=True) if mine != 0]
        await self._touch(kept, worker_id)
        return lost

    async def hold_leases(self, jobs: list[Job], worker_id: str) -> None:
        """Keep entries claimed that this worker holds but has not started (suspects waiting)."""
        await self._touch(jobs, worker_id)

    async def _touch(self, jobs: list[Job], worker_id: str) -> None:
        by_stream: dict[str, list[str]] = {}
        for job in jobs:
            by_stream.setdefault(job.stream, []).append(job.entry_id)
        if not by_stream:
            return
        # On the raw pipeline (one write; on a cluster one per node, failovers retried there).
        await self._all_ok(
            [("XCLAIM", stream, GROUP, worker_id, 0, *ids, "JUSTID") for stream, ids in by_stream.items()]
        )

    async def release(self, jobs: list[Job], worker_id: str, idle_ms: int = 86_400_000) -> None:
        """Give jobs back for immediate reclaim (drain deadline): their entries look idle for a day, so
        the next reclaim by any worker takes them and continues them from the emitted text."""
        if not jobs:
            return
        await self._all_ok(
            [
                ("XCLAIM", job.stream, GROUP, worker_id, 0, job.entry_id, "IDLE", idle_ms, "JUSTID")
                for job in jobs
            ]
        )

    async def _all_ok(self, commands: list[tuple[Arg, ...]]) -> list[Any]:
        """Commands on the raw pipeline; raises the first error reply."""
        return raise_errors(await self.fast.pipeline(commands))

    # -- token streams ---------------------------------------------------------------------------
    def _finish_call(self, rid: str, end: Terminal) -> tuple[list[str], list[Arg]]:
        keys = [self.keys.request(rid), self.keys.tokens(rid), self.keys.emitted(rid)]
        usage, error, written = end.get("usage"), end.get("error"), end.get("written")
        attempt = end["attempt"]
        args: list[Arg] = [
            "*" if attempt is None else attempt,
            self.keys.channel(rid),
            self.token_stream_maxlen,
            end["kind"],
            end.get("text", ""),
            end.get("tokens", 0),
            end.get("finish_reason", ""),
            orjson.dumps(usage).decode() if usage is not None else "",
            orjson.dumps(error).decode() if error is not None else "",
            end["ttl_s"],
            end["status"].value,
            end.get("logprobs", ""),
            "" if written is None else written,
            self.publish,
        ]
        if end.get("queued_only"):
            args.append("queued")
        return keys, args

    async def finish(self, rid: str, **end: Unpack[Terminal]) -> int:
        """Append the terminal event and mark the record terminal (fenced unless ``attempt`` is None).
        ``written``: the attempt's last write number; if the record has fewer (a failover lost
        some), nothing is written and :data:`BEHIND` - the record's last is returned."""
        keys, args = self._finish_call(rid, end)
        return int(await self._finish(keys=keys, args=args))

    async def finish_read(self, rid: str, **end: Unpack[Terminal]) -> tuple[int, RequestRecord | None]:
        """:meth:`finish`, and in the same round trip what :meth:`settle` reads of the record as
        ``finish`` left it: (its result, that record when it is terminal, else None). On a cluster
        whose slot moves meanwhile the read may run before the script; its record is then not
        terminal, so None, and :meth:`settle` reads again."""
        keys, args = self._finish_call(rid, end)
        calls = [self._finish.evalsha(keys, args), settle_read(keys[0])]
        replies = await self.fast.pipeline(calls)
        if isinstance(replies[0], NoScriptError):  # a new or restarted Redis: load it, then again
            await self._finish.load()
            replies = await self.fast.pipeline(calls)
        if isinstance(replies[0], NoScriptError):  # a cluster node still without it: Script's way
            return int(await self._finish(keys=keys, args=args)), None
        if isinstance(replies[0], Exception):
            raise replies[0]
        record = None if isinstance(replies[1], Exception) else settle_record(replies[1])
        return int(replies[0]), record if record is not None and record.status.terminal else None

    @property
    def settles_in_finish(self) -> bool:
        """Whether :meth:`finish_settle` may be called (one Redis, not a cluster)."""
        return self._finish_settle is not None

    async def finish_settle(
        self, job: Job, billing: Billing, prompt: int, completion: int, **end: Unpack[Terminal]
    ) -> tuple[int, bool | None]:
        """:meth:`finish` of ``job``'s request, which completed and used ``prompt`` + ``completion``
        tokens, and when it wrote the terminal event, :meth:`settle` in the same call (one Redis
        only: :attr:`settles_in_finish`). Returns (finish's result, whether the request was metered
        now; None when nothing was settled: the caller settles as before)."""
        if self._finish_settle is None:
            raise RuntimeError("finish_settle needs one Redis, not a cluster")
        prompt, completion = int(prompt), int(completion)  # meter.lua takes whole counts only
        keys, args = self._finish_call(job.rid, end)
        meter_keys, meter_args = self.ledger.meter_args(billing, job.rid, "completed", prompt, completion)
        ack_keys, ack_args = self._ack_call(job, prompt + completion)
        sizes = (len(keys), len(args), len(meter_keys), len(meter_args), len(ack_keys), len(ack_args))
        if sizes != _SETTLING:
            raise ValueError("finish_settle.lua's parts take 3/14, 7/9 and 4/4 keys and arguments")
        seq, metered = await self._finish_settle(
            keys=[*keys, *meter_keys, *ack_keys], args=[*args, *meter_args, *ack_args]
        )
        return int(seq), None if int(metered) < 0 else bool(int(metered))

    async def fail(
        self,
        rid: str,
        *,
        attempt: int | None,
        code: str,
        message: str,
        ttl_s: int,
        status: Status = Status.ERROR,
        error_type: str = "server_error",
        param: str | None = None,
    ) -> int:
        """Terminate a request with an error event the client will see."""
        error = {"message": message, "type": error_type, "code": code}
        if param is not None:
            error["param"] = param
        return await self.finish(rid, attempt=attempt, kind="error", status=status, ttl_s=ttl_s, error=error)

    async def expire(self, rid: str, ttl_s: int, *, queued_only: bool = False) -> int:
        """End a request whose deadline passed before it could run with the ``timeout`` error.
        ``queued_only``: only if it is still queued past its deadline on Redis's clock, else
        :data:`NOT_DUE` (a gateway ending its client's wait; a worker that took the job knows)."""
        message = "the request's deadline passed before it could run"
        error = {"message": message, "type": "timeout", "code": "timeout"}
        return await self.finish(
            rid,
            attempt=None,
            kind="error",
            status=Status.ERROR,
            ttl_s=ttl_s,
            error=error,
            queued_only=queued_only,
        )

    async def cancel(self, rid: str, ttl_s: int, reason: str = "cancelled by client") -> int:
        """Cancel at once: terminal event now; the worker sees it at its next append and frees the slot."""
        return await self.fail(
            rid,
            attempt=None,
            code="cancelled",
            message=reason,
            ttl_s=ttl_s,
            status=Status.CANCELLED,
            error_type="cancelled",
        )

    async def read_events(self, rid: str, after: int, count: int = READ_PAGE) -> list[TokenEvent]:
        """Events with seq > ``after`` from the durable stream (entry ids are ``<seq>-0``)."""
        entries: Any = await self.redis.xrange(
            self.keys.tokens(rid), min=f"{after + 1}-0", max="+", count=count
        )
        return [TokenEvent.from_fields(fields) for _, fields in entries]

    # -- request records ---------------------------------------------------------------------------
    async def exists(self, rid: str) -> bool:
        return bool(await self.redis.exists(self.keys.request(rid)))

    async def progress(self, rid: str) -> tuple[Status, int] | None:
        """The request's status and the seq of its last event (its terminal one once it has ended:
        the two are written in one script); None when it has no record (expired, or never was)."""
        fields: Any = await self.redis.hmget(self.keys.request(rid), "status", "seq")
        return None if fields[0] is None else (Status(fields[0]), int(fields[1] or 0))

    async def get_record(self, rid: str) -> RequestRecord | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.request(rid))
            pipe.get(self.keys.emitted(rid))
            fields, emitted = await pipe.execute()
        return RequestRecord.from_hash(fields, emitted=emitted or "") if fields else None

    async def settle(self, job: Job, record: RequestRecord | None = None) -> RequestRecord | None:
        """Acknowledge a job whose request ended (or is gone), metering it first (idempotent, so a
        crash in between leaves the job to be reclaimed and settled again): its record when its
        usage was counted now. ``record``: its terminal record as :meth:`finish_read` read it."""
        if record is None and job.rid:  # only what metering reads: not the prompt (megabytes)
            record = settle_record(await self.fast.execute(*settle_read(self.keys.request(job.rid))))
        if record is None or not record.status.terminal:
            await self.ack(job)
            return None
        usage = record.usage or {}
        used = int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", record.tokens))
        if self._settle is None:  # a cluster: the usage and the job are on different slots
            metered = await self.ledger.meter(record, job.rid)
            await self.ack(job, used)
        else:  # one round trip: meter.lua, then ack.lua
            meter_keys, meter_args = self.ledger.meter_call(record, job.rid)
            ack_keys, ack_args = self._ack_call(job, used)
            metered = bool(
                int(await self._settle(keys=[*meter_keys, *ack_keys], args=[*meter_args, *ack_args]))
            )
        return record if metered else None

    async def watch(self, rids: list[str]) -> tuple[int, list[Watch]]:
        """Redis's clock, and the status and watchers of many requests, in one round trip."""
        fields = ("status", "watchers", "detached_ms")
        replies = await self._all_ok(
            [("TIME",), *(("HMGET", self.keys.request(rid), *fields) for rid in rids)]
        )
        seconds, micros = replies[0]
        watches = [Watch(Status(r[0]) if r[0] else None, int(r[1] or 0), int(r[2] or 0)) for r in replies[1:]]
        return int(seconds) * 1000 + int(micros) // 1000, watches

    async def attach(self, rid: str, *, shared: bool = False) -> bool:
        """One more client follows ``rid``; False when the record is gone (never recreates it).
        ``shared``: it came through the response cache (its record counts those following now)."""
        return bool(await self._watch(keys=[self.keys.request(rid)], args=[1, 1 if shared else 0]))

    async def detach(self, rid: str, *, shared: bool = False) -> None:
        """A client stopped following ``rid`` (``shared``: one that came through the response cache)."""
        await self._watch(keys=[self.keys.request(rid)], args=[-1, 1 if shared else 0])
