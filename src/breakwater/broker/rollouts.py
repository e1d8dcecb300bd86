"""The rollout store: aliases (compare-and-set, with a history of every change), finished-request
counts per version in time buckets (the guard's evidence), and the guard's lease. All on one slot."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis

from breakwater.broker.cluster import Fast
from breakwater.broker.scripts import Script
from breakwater.broker.wire import Arg, raise_errors
from breakwater.keys import Keys
from breakwater.rollout.aliases import Alias

HISTORY_MAXLEN = 10_000
BUCKET_S = 5  # the time buckets of the per-version counts


class Conflict(Exception):
    """The alias changed since it was read (its revision moved on)."""


@dataclass(slots=True)
class VersionCounts:
    """Finished requests on one version: completed, errors, and the first-token times of those with one."""

    ok: int = 0
    err: int = 0
    ttft_ms: float = 0.0
    ttft_n: int = 0

    @property
    def finished(self) -> int:
        return self.ok + self.err

    @property
    def error_rate(self) -> float:
        return self.err / self.finished if self.finished else 0.0

    @property
    def mean_ttft_ms(self) -> float | None:
        return self.ttft_ms / self.ttft_n if self.ttft_n else None


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of an alias's history; ``alias`` is None when the change deleted it."""

    name: str
    revision: int
    by: str
    note: str
    ts_ms: int
    alias: Alias | None


class RolloutStore:
    def __init__(self, redis: Redis, fast: Fast, keys: Keys) -> None:
        self.redis = redis
        self.fast = fast
        self.keys = keys
        self._set = Script(fast, "alias_set")

    async def aliases(self) -> dict[str, Alias]:
        raw: Mapping[Any, Any] = await self.redis.hgetall(self.keys.aliases())
        return {_s(name): Alias.from_json(record) for name, record in raw.items()}

    async def alias(self, name: str) -> Alias | None:
        raw = await self.redis.hget(self.keys.aliases(), name)
        return Alias.from_json(raw) if raw else None

    async def put(self, alias: Alias, *, expected: int) -> Alias:
        """Write ``alias`` if the stored one's revision is still ``expected`` (0: none stored), as
        revision ``expected + 1``; :class:`Conflict` otherwise."""
        now_ms = int(time.time() * 1000)
        stored = replace(alias, revision=expected + 1, updated_ms=now_ms)
        ok, _ = await self._set(
            [self.keys.aliases(), self.keys.alias_history()],
            [
                alias.name,
                stored.to_json(),
                expected,
                stored.revision,
                alias.by,
                alias.note,
                now_ms,
                HISTORY_MAXLEN,
            ],
        )
        if not int(ok):
            raise Conflict(alias.name)
        return stored

    async def delete(self, name: str, *, expected: int, by: str, note: str = "") -> bool:
        now_ms = int(time.time() * 1000)
        ok, _ = await self._set(
            [self.keys.aliases(), self.keys.alias_history()],
            [name, "", expected, expected + 1, by, note, now_ms, HISTORY_MAXLEN],
        )
        return bool(int(ok))

    async def history(self, name: str, count: int = 50) -> list[Change]:
        """The alias's last ``count`` changes, oldest first (scans the shared history newest first)."""
        found: list[Change] = []
        last = "+"
        while len(found) < count:
            page: Any = await self.redis.xrevrange(self.keys.alias_history(), last, "-", count=500)
            for _, fields in page:
                f = {_s(k): _s(v) for k, v in fields.items()}
                if f.get("alias") == name:
                    record = f.get("record", "")
                    found.append(
                        Change(
                            name=name,
                            revision=int(f.get("revision", 0)),
                            by=f.get("by", ""),
                            note=f.get("note", ""),
                            ts_ms=int(f.get("ts_ms", 0)),
                            alias=Alias.from_json(record) if record else None,
                        )
                    )
                    if len(found) == count:
                        break
            if len(page) < 500:
                break
            last = "(" + _s(page[-1][0])
        return found[::-1]

    # -- evidence for the guard --------------------------------------------------------------------
    async def add_counts(self, counts: Mapping[str, VersionCounts], now_s: float | None = None) -> None:
        """Add one gateway's counts since its last flush to the current bucket (one write)."""
        bucket = int((time.time() if now_s is None else now_s) // BUCKET_S)
        key = self.keys.version_stats(bucket)
        commands: list[tuple[Arg, ...]] = []
        for version, c in counts.items():
            for name, value in (("ok", c.ok), ("err", c.err), ("ttft_n", c.ttft_n)):
                if value:
                    commands.append(("HINCRBY", key, f"{version}:{name}", value))
            if c.ttft_ms:
                commands.append(("HINCRBYFLOAT", key, f"{version}:ttft_ms", round(c.ttft_ms, 3)))
        if commands:
            commands.append(("EXPIRE", key, 3600))
            raise_errors(await self.fast.pipeline(commands))

    async def counts(
        self, versions: Iterable[str], window_s: int, now_s: float | None = None
    ) -> dict[str, VersionCounts]:
        """Each version's counts over the last ``window_s`` (whole buckets)."""
        last = int((time.time() if now_s is None else now_s) // BUCKET_S)
        buckets = range(last - max(1, window_s // BUCKET_S) + 1, last + 1)
        wanted = list(versions)
        out = {v: VersionCounts() for v in wanted}
        replies = raise_errors(
            await self.fast.pipeline([("HGETALL", self.keys.version_stats(b)) for b in buckets])
        )
        for reply in replies:
            fields = _pairs(reply)
            for version, c in out.items():
                c.ok += int(float(fields.get(f"{version}:ok", 0)))
                c.err += int(float(fields.get(f"{version}:err", 0)))
                c.ttft_n += int(float(fields.get(f"{version}:ttft_n", 0)))
                c.ttft_ms += float(fields.get(f"{version}:ttft_ms", 0))
        return out

    async def lead(self, owner: str, ttl_ms: int) -> bool:
        """Take or renew the guard's lease: True while ``owner`` holds it."""
        key = self.keys.rollout_guard()
        if await self.redis.set(key, owner, nx=True, px=ttl_ms):
            return True
        if _s(await self.redis.get(key) or b"") == owner:
            await self.redis.pexpire(key, ttl_ms)
            return True
        return False


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(reply: Any) -> dict[str, str]:
    """HGETALL's reply on the raw connection: a flat list (RESP2) or a map."""
    if isinstance(reply, dict):
        return {_s(k): _s(v) for k, v in reply.items()}
    items = list(reply or [])
    return {_s(items[i]): _s(items[i + 1]) for i in range(0, len(items) - 1, 2)}
