"""Dead letters: jobs given up after ``max_attempts`` attempts without progress, per model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from breakwater.keys import Keys


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    rid: str
    reason: str
    attempts: int
    ts_ms: int


class DeadLetters:
    """Part of :class:`~breakwater.broker.Broker`."""

    redis: Redis
    keys: Keys

    async def now_ms(self) -> int:
        """Redis's clock: every host compares deadlines and grace periods against this one."""
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def dead_letter(self, model: str, rid: str, reason: str, attempts: int) -> None:
        await self.redis.xadd(
            self.keys.dlq(model),
            {"rid": rid, "reason": reason, "attempts": attempts, "ts_ms": await self.now_ms()},
            maxlen=10_000,
            approximate=True,
        )

    async def dead_letters(self, model: str, count: int = 100) -> list[DeadLetter]:
        raw: Any = await self.redis.xrange(self.keys.dlq(model), count=count)
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

    async def delete_dead_letter(self, model: str, entry_id: str) -> None:
        await self.redis.xdel(self.keys.dlq(model), entry_id)

    async def purge_dead_letters(self, model: str) -> int:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xlen(self.keys.dlq(model))
            pipe.delete(self.keys.dlq(model))
            n, _ = await pipe.execute()
        return int(n)
