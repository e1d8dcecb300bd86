"""Dead letters: jobs that failed ``max_attempts`` times, kept per model with reason and attempts.

``breakwater dlq list|retry|purge``. A retry resubmits the original request (same body, sampling
and deadline length) under a new request id; the client of the dead one already got its error event.
"""

from __future__ import annotations

import dataclasses
import uuid

from breakwater.broker import Broker, DeadLetter


async def entries(broker: Broker, model: str, count: int = 100) -> list[DeadLetter]:
    return await broker.dead_letters(model, count)


async def retry(broker: Broker, model: str, letter: DeadLetter, *, ttl_s: int = 3600) -> str:
    """Resubmit a dead request under a new id; the dead-letter entry is removed. Returns the new id."""
    record = await broker.get_record(letter.rid)
    if record is None:
        raise LookupError(f"request {letter.rid} has expired; its body is gone, so it cannot be retried")
    # Not admitted through the key's limiter: nothing reserved there to reconcile when it is metered.
    spec = dataclasses.replace(record.spec, retried_from=letter.rid, reserved_tokens=0, held_tokens=0)
    prefix = letter.rid.split("-", 1)[0]
    rid = f"{prefix}-{uuid.uuid4().hex}"
    result = await broker.enqueue(rid=rid, spec=spec, max_queued=1 << 30, result_ttl_s=ttl_s)
    if not result.accepted:
        raise RuntimeError(f"could not enqueue the retry of {letter.rid}")
    await broker.delete_dead_letter(model, letter.entry_id)
    return rid


async def purge(broker: Broker, model: str) -> int:
    return await broker.purge_dead_letters(model)
