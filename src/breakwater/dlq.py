"""Dead letters: jobs that failed ``max_attempts`` times, kept per model with reason and attempts.

``breakwater dlq list|retry|purge``. A retry resubmits the original request (same body, sampling
and deadline length) under a new request id; the client of the dead one already got its error event.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from breakwater.broker import Broker

# Fields describing the request itself (copied on retry); progress fields start over.
REQUEST_FIELDS = (
    "model", "lane", "request_id", "timeout_s", "include_usage", "stop", "ignore_eos", "max_tokens",
    "temperature", "top_p", "seed", "top_k", "kind", "messages", "prompt",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    rid: str
    reason: str
    attempts: int
    ts_ms: int


async def entries(broker: Broker, model: str, count: int = 100) -> list[DeadLetter]:
    raw: Any = await broker.redis.xrange(broker.keys.dlq(model), count=count)
    return [
        DeadLetter(
            str(eid),
            str(f.get("rid")),
            str(f.get("reason")),
            int(f.get("attempts", 0)),
            int(f.get("ts_ms", 0)),
        )
        for eid, f in raw
    ]


async def retry(broker: Broker, model: str, letter: DeadLetter, *, ttl_s: int = 3600) -> str:
    """Resubmit a dead request under a new id; the dead-letter entry is removed. Returns the new id."""
    record: dict[str, str] = await broker.get_request(letter.rid)
    if not record:
        raise LookupError(f"request {letter.rid} has expired; its body is gone, so it cannot be retried")
    fresh = {k: record[k] for k in REQUEST_FIELDS if k in record}
    now = time.time()
    timeout_s = float(fresh.get("timeout_s") or 600)
    fresh.update(
        status="queued",
        attempt="0",
        seq="0",
        tokens="0",
        emitted="",
        watchers="0",
        detached_ms=str(int(now * 1000)),
        created_ms=str(int(now * 1000)),
        created=str(int(now)),
        deadline_ms=str(int((now + timeout_s) * 1000)),
        retried_from=letter.rid,
    )
    prefix = letter.rid.split("-", 1)[0]
    rid = f"{prefix}-{uuid.uuid4().hex}"
    result = await broker.enqueue(
        rid=rid,
        model=model,
        lane=fresh.get("lane", "batch"),
        record=fresh,
        max_queued=1 << 30,
        request_id=fresh.get("request_id", ""),
        ttl_s=int(timeout_s) + ttl_s,
    )
    if not result.accepted:
        raise RuntimeError(f"could not enqueue the retry of {letter.rid}")
    await broker.redis.xdel(broker.keys.dlq(model), letter.entry_id)
    return rid


async def purge(broker: Broker, model: str) -> int:
    n: int = await broker.redis.xlen(broker.keys.dlq(model))
    await broker.redis.delete(broker.keys.dlq(model))
    return n
