"""Every Redis key and channel name Breakwater uses (DESIGN §4); no key string is built elsewhere.

Per-request keys share the hash tag ``{<rid>}`` and per-model keys ``{<model>}`` so that multi-key
scripts stay on one slot under Redis Cluster.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from redis.crc import key_slot

LANES: tuple[str, ...] = ("interactive", "batch")
GROUP = "workers"
PARTITION_SEP = "#"


SLOTS = 16384


@functools.lru_cache(maxsize=256)
def queues(model: str, partitions: int = 1) -> tuple[str, ...]:
    """The job queues of a model split into ``partitions`` (hot models on a Redis Cluster): the
    model's own name first (its keys unchanged from an unpartitioned model), then ``<model>#k.<s>``.
    Cut the slot space into N equal ranges: the model's own name falls in one, and partition k's ``s``
    is the first number that puts its name near the middle of the k-th range after that one. So the
    partitions hold one range each: on a cluster whose M primaries hold equal ranges (as ``redis-cli
    --cluster create`` makes them), where N and M divide one another, they land on min(N, M)
    primaries, evenly (otherwise move a slot: docs/deploy.md). Every per-model key builder below takes
    one of these queue names."""
    width = SLOTS / partitions
    own = int(key_slot(model.encode()) // width)
    names = [model]
    for k in range(1, partitions):
        middle = ((own + k) % partitions + 0.5) * width
        s = 0
        while abs(key_slot(f"{model}{PARTITION_SEP}{k}.{s}".encode()) + 0.5 - middle) > width / 4:
            s += 1
        names.append(f"{model}{PARTITION_SEP}{k}.{s}")
    return tuple(names)


def name_tag(name: str) -> str:
    """A short fixed-alphabet stand-in for a model's or tenant's name inside a key."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Keys:
    """Key builder; ``prefix`` isolates deployments (and tests) sharing one Redis."""

    prefix: str = "bw"

    # The per-model keys below take a queue name (``queues``): a model's, or one of its partitions'.
    def jobs(self, model: str, lane: str) -> str:
        return f"{self.prefix}:jobs:{{{model}}}:{lane}"

    # Fair share within a model and lane (enqueue.lua, bind.lua, ack.lua): every key on the model's slot.
    def bound(self, model: str, lane: str) -> str:
        """Stream entry id -> the request it was bound to when a worker read it."""
        return f"{self.prefix}:bound:{{{model}}}:{lane}"

    def fair(self, model: str, lane: str) -> str:
        """Virtual token counters per tenant (``c:<tenant>``) and the service floor."""
        return f"{self.prefix}:fair:{{{model}}}:{lane}"

    def backlog(self, model: str, lane: str) -> str:
        """Tenants with requests waiting (zset by virtual token counter)."""
        return f"{self.prefix}:backlog:{{{model}}}:{lane}"

    def joins(self, model: str, lane: str) -> str:
        """Tenants joining the backlog (a short capped stream): full workers watch it to preempt."""
        return f"{self.prefix}:joins:{{{model}}}:{lane}"

    def admitted(self, model: str, lane: str) -> str:
        """On a Redis Cluster: the requests the lane admitted in the last two minutes (zset: rid ->
        ms), so that a retried enqueue queues its request once (enqueue.lua's 'job' mode)."""
        return f"{self.prefix}:admitted:{{{model}}}:{lane}"

    def deadlines(self, model: str, lane: str) -> str:
        """Requests waiting for a worker (zset: their waiting-list item and tenant -> deadline ms):
        written at admission, removed when a worker binds one; a gateway ends those nobody follows
        at their deadline (gateway.deadlines)."""
        return f"{self.prefix}:deadlines:{{{model}}}:{lane}"

    def lanes(self) -> str:
        """Every lane requests were queued on (set: ``<model>\t<queue>\t<lane>``), noted by each
        process that queues some, for the gateways' deadline reaper."""
        return f"{self.prefix}:lanes"

    def waiting_prefix(self, model: str, lane: str) -> str:
        """+ tenant: that tenant's waiting requests, oldest first."""
        return f"{self.prefix}:wait:{{{model}}}:{lane}:"

    def request(self, rid: str) -> str:
        return f"{self.prefix}:req:{{{rid}}}"

    def emitted(self, rid: str) -> str:
        """The text emitted so far (a string key: APPEND is O(1) per token)."""
        return f"{self.prefix}:emit:{{{rid}}}"

    def tokens(self, rid: str) -> str:
        return f"{self.prefix}:tok:{{{rid}}}"

    def channel(self, rid: str) -> str:
        return f"{self.prefix}:ch:{{{rid}}}"

    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker_alive(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def dlq(self, model: str) -> str:
        return f"{self.prefix}:dlq:{{{model}}}"

    def idempotency(self, tenant: str, key_digest: str) -> str:
        """An Idempotency-Key, scoped to its tenant (``key_digest``: a hash of the client's key)."""
        return f"{self.prefix}:idem:{tenant}:{key_digest}"

    def cache(self, model: str, scope: str, digest: str) -> str:
        """A response-cache entry: the request that answers ``digest`` (gateway.cache). The model's
        and the scope's names are hashed (``name_tag``), so any name is safe in a SCAN pattern."""
        return f"{self.prefix}:cache:{name_tag(model)}:{name_tag(scope)}:{digest}"

    def cache_pattern(self, model: str = "", scope: str = "") -> str:
        """A SCAN pattern for the entries of one model and/or scope ('': any)."""
        m = name_tag(model) if model else "*"
        s = name_tag(scope) if scope else "*"
        return f"{self.prefix}:cache:{m}:{s}:*"

    def api_key(self, digest: str) -> str:
        """An API key's record, found by the key's peppered hash (the key itself is never stored)."""
        return f"{self.prefix}:apikey:{digest}"

    # A tenant's limits and usage share its hash tag, so the scripts that admit and meter its
    # requests touch one slot.
    def limiter(self, tenant: str, key_id: str) -> str:
        return f"{self.prefix}:rl:{{{tenant}}}:{key_id}"

    def running(self, tenant: str, key_id: str) -> str:
        return f"{self.prefix}:running:{{{tenant}}}:{key_id}"

    def usage(self, tenant: str, day: str) -> str:
        """Per key and day: ``<key id>:<completed|error|cancelled|rejected|prompt_tokens|...>``; the
        tenant's totals under the id ``*`` (as its limiter and running set are ``...:*``)."""
        return f"{self.prefix}:usage:{{{tenant}}}:{day}"

    def tenant(self, tenant: str) -> str:
        """A tenant's own limits (shared by all its keys): ``breakwater tenants set``."""
        return f"{self.prefix}:tenant:{{{tenant}}}"

    def usage_month(self, tenant: str, month: str) -> str:
        """Per key and UTC month (``YYYY-MM``): ``<key id>:tokens``, for monthly budgets."""
        return f"{self.prefix}:usage-month:{{{tenant}}}:{month}"

    def metered(self, tenant: str, day: str) -> str:
        return f"{self.prefix}:metered:{{{tenant}}}:{day}"

    # Rollouts (breakwater.rollout): low-volume control keys, all on one slot ({rollout}).
    def aliases(self) -> str:
        """Alias name -> its record (JSON)."""
        return f"{self.prefix}:aliases:{{rollout}}"

    def alias_revisions(self) -> str:
        """Alias name -> its last revision (kept when the alias is deleted: revisions never repeat)."""
        return f"{self.prefix}:alias-revisions:{{rollout}}"

    def alias_history(self) -> str:
        """Every alias change: who, when, what (a capped stream)."""
        return f"{self.prefix}:alias-history:{{rollout}}"

    def version_stats(self, bucket: int) -> str:
        """Finished requests per version in one time bucket: ``<version>:<ok|err|ttft_ms|ttft_n>``."""
        return f"{self.prefix}:vstats:{{rollout}}:{bucket}"

    def rollout_guard(self) -> str:
        """Which gateway judges the canaries now (a lease)."""
        return f"{self.prefix}:rollout-guard:{{rollout}}"

    # The Files and Batch APIs (gateway.files, gateway.batches): a file's or batch's keys share its
    # id's hash tag; a tenant's lists share the tenant's.
    def file(self, file_id: str) -> str:
        """A stored file: its fields and its bytes (``data``)."""
        return f"{self.prefix}:file:{{{file_id}}}"

    def files(self, tenant: str) -> str:
        """A tenant's files (zset: id -> created ms)."""
        return f"{self.prefix}:files:{{{tenant}}}"

    def file_readers(self, file_id: str) -> str:
        """How many downloads of a file are under way (a deleted file's bytes are kept for them)."""
        return f"{self.prefix}:file-readers:{{{file_id}}}"

    def files_held(self, tenant: str) -> str:
        """The bytes of a tenant's uploads being written now (held against its file quota)."""
        return f"{self.prefix}:files-held:{{{tenant}}}"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{{{batch_id}}}"

    def batch_out(self, batch_id: str) -> str:
        """A batch's answers so far: line index -> its output line."""
        return f"{self.prefix}:batch-out:{{{batch_id}}}"

    def batch_lease(self, batch_id: str) -> str:
        """Which gateway runs the batch now (a lease)."""
        return f"{self.prefix}:batch-lease:{{{batch_id}}}"

    def batches(self, tenant: str) -> str:
        """A tenant's batches (zset: id -> created ms)."""
        return f"{self.prefix}:batches:{{{tenant}}}"

    def batches_active(self) -> str:
        """Batches not yet finished (a set): every gateway's batch runner looks here for work."""
        return f"{self.prefix}:batches-active"

    def api_key_ids(self) -> str:
        """Key id -> hash: listing, showing and revoking keys by their public id."""
        return f"{self.prefix}:apikeys"
