"""The rollout store: aliases (compare-and-set, with a history of every change), finished-request
counts per version in time buckets (the guard's evidence), and the guard's lease. All on one slot."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from redis.asyncio import Redis

from breakwater.broker.cluster import Fast
from breakwater.broker.scripts import Script
from breakwater.broker.wire import Arg, raise_errors, text
from breakwater.keys import Keys
from breakwater.rollout.aliases import TTFT_SLOS, Alias

log = logging.getLogger(__name__)
HISTORY_MAXLEN = 10_000
BUCKET_S = 1  # the time buckets of the per-version counts (a change discards at most 1 s of evidence)
MAX_WINDOW_S = 600
# The TTFT SLOs a guard may judge by (each gateway counts the first tokens later than each).
TTFT_SLOS_MS = TTFT_SLOS
COUNTERS = ("ok", "err", "ttft_n", "ttft_ms", *(f"slow{slo}" for slo in TTFT_SLOS_MS))


class Conflict(Exception):
    """The alias changed since it was read (its revision moved on)."""


class Refused(ValueError):
    """The store refused the record (it would chain aliases)."""


@dataclass(slots=True)
class VersionCounts:
    """Finished requests on one version: completed, errors, the first-token times of those with
    one, and how many of those took longer than each of ``TTFT_SLOS_MS`` (``slow``, in that order)."""

    ok: int = 0
    err: int = 0
    ttft_ms: float = 0.0
    ttft_n: int = 0
    slow: list[int] = field(default_factory=lambda: [0] * len(TTFT_SLOS_MS))

    def add_ttft(self, ttft_ms: float) -> None:
        self.ttft_ms += ttft_ms
        self.ttft_n += 1
        for i, slo in enumerate(TTFT_SLOS_MS):
            self.slow[i] += ttft_ms > slo

    def missed(self, slo_ms: int) -> float:
        """The share of first tokens later than ``slo_ms`` (one of ``TTFT_SLOS_MS``)."""
        return self.slow[TTFT_SLOS_MS.index(slo_ms)] / self.ttft_n if self.ttft_n else 0.0

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
    def __init__(self, redis: Redis, fast: Fast, keys: Keys, clock: Callable[[], Awaitable[int]]) -> None:
        """``clock``: Redis's time in ms (the broker's): alias changes and the counts' buckets use it,
        not the clocks of the hosts that run the CLI or the gateways."""
        self.redis = redis
        self.fast = fast
        self.keys = keys
        self.now_ms = clock
        self._set = Script(fast, "alias_set")
        self._lease = Script(fast, "rollout_lease")
        self._sum = Script(fast, "vstats_sum")

    async def aliases(self) -> dict[str, Alias]:
        """Every alias; a record that does not parse (written by a newer release?) is left out."""
        raw: Mapping[Any, Any] = await self.redis.hgetall(self.keys.aliases())
        aliases: dict[str, Alias] = {}
        for name, record in raw.items():
            try:
                aliases[text(name)] = Alias.from_json(record)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning(
                    "alias record unreadable; ignored",
                    extra={"fields": {"alias": text(name), "error": str(exc)}},
                )
        return aliases

    async def modify(self, name: str, change: Callable[[Alias | None], Alias | None]) -> Alias | None:
        """Read the alias, ``change`` it and write the result, again whenever another writer came
        in between (compare-and-set on the revision). ``change`` returns None to write nothing, and
        so does this; it may raise (ValueError for what it refuses), as may :meth:`put` (Refused)."""
        while True:
            expected = await self.revision(name)
            changed = change(await self.alias(name))
            if changed is None:
                return None
            try:
                return await self.put(changed, expected=expected)
            except Conflict:
                continue

    async def remove(self, name: str, *, by: str, note: str = "") -> bool:
        """Delete the alias whatever its revision (logged as any change); False when there is none."""
        while True:
            expected = await self.revision(name)
            if await self.alias(name) is None:
                return False
            try:
                await self.delete(name, expected=expected, by=by, note=note)
                return True
            except Conflict:
                continue

    async def revision(self, name: str) -> int:
        """The alias's last revision (0: never set); deleting it does not reset this."""
        return int(await self.redis.hget(self.keys.alias_revisions(), name) or 0)

    async def alias(self, name: str) -> Alias | None:
        raw = await self.redis.hget(self.keys.aliases(), name)
        return Alias.from_json(raw) if raw else None

    async def put(self, alias: Alias, *, expected: int, new_evidence: bool = True) -> Alias:
        """Write ``alias`` if its revision is still ``expected`` (:meth:`revision`), as revision
        ``expected + 1``: :class:`Conflict` when it moved on, :class:`Refused` when the record names
        an alias or an alias names it. ``new_evidence``: the guard's window starts now (a change by
        hand); the guard's own writes keep it. Times are Redis's clock, the one every gateway's
        counts are bucketed by (not the clock of the host that runs the CLI)."""
        now_ms = await self.now_ms()
        since_ms = now_ms if new_evidence or not alias.since_ms else alias.since_ms
        stored = replace(alias, revision=expected + 1, updated_ms=now_ms, since_ms=since_ms)
        await self._write(
            alias.name, stored.to_json(), expected, alias.by, alias.note, now_ms, alias.versions
        )
        return stored

    async def delete(self, name: str, *, expected: int, by: str, note: str = "") -> None:
        """Delete the alias if its revision is still ``expected``: :class:`Conflict` otherwise (or
        when there is none)."""
        await self._write(name, "", expected, by, note, await self.now_ms(), [])

    async def _write(
        self, name: str, record: str, expected: int, by: str, note: str, now_ms: int, versions: list[str]
    ) -> None:
        keys = [self.keys.aliases(), self.keys.alias_history(), self.keys.alias_revisions()]
        args: list[Arg] = [name, record, expected, expected + 1, by, note, now_ms, HISTORY_MAXLEN, *versions]
        ok, detail = await self._set(keys, args)
        if int(ok) < 0:
            raise Refused(text(detail))
        if not int(ok):
            raise Conflict(name)

    async def history(self, name: str, count: int = 50) -> list[Change]:
        """The alias's last ``count`` changes, oldest first (scans the shared history newest first)."""
        found: list[Change] = []
        last = "+"
        while len(found) < count:
            page: Any = await self.redis.xrevrange(self.keys.alias_history(), last, "-", count=500)
            for _, fields in page:
                f = {text(k): text(v) for k, v in fields.items()}
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
            last = "(" + text(page[-1][0])
        return found[::-1]

    # -- evidence for the guard --------------------------------------------------------------------
    async def add_counts(self, counts: Mapping[str, VersionCounts], now_s: float | None = None) -> None:
        """Add one gateway's counts since its last flush to the current bucket (one write, after
        reading Redis's clock)."""
        if not counts:
            return
        bucket = int((await self.now_ms() / 1000 if now_s is None else now_s) // BUCKET_S)
        key = self.keys.version_stats(bucket)
        commands: list[tuple[Arg, ...]] = []
        for version, c in counts.items():
            slow = [(f"slow{slo}", n) for slo, n in zip(TTFT_SLOS_MS, c.slow, strict=True)]
            for name, value in (("ok", c.ok), ("err", c.err), ("ttft_n", c.ttft_n), *slow):
                if value:
                    commands.append(("HINCRBY", key, f"{version}:{name}", value))
            if c.ttft_ms:
                commands.append(("HINCRBYFLOAT", key, f"{version}:ttft_ms", round(c.ttft_ms, 3)))
        if commands:
            commands.append(("EXPIRE", key, MAX_WINDOW_S + 60))
            raise_errors(await self.fast.pipeline(commands))

    async def counts(
        self, versions: Iterable[str], window_s: int, *, since_s: float = 0.0, now_s: float | None = None
    ) -> dict[str, VersionCounts]:
        """Each version's counts over the last ``window_s`` (whole buckets), from the first bucket
        wholly after ``since_s`` (the alias's last change: evidence from before it is not used)."""
        last = int((await self.now_ms() / 1000 if now_s is None else now_s) // BUCKET_S)
        first = max(last - max(1, window_s // BUCKET_S) + 1, int(since_s // BUCKET_S) + 1)
        buckets = range(first, last + 1)
        if not buckets:
            return {v: VersionCounts() for v in versions}
        buckets = buckets[-MAX_WINDOW_S:]
        wanted = list(versions)
        if not wanted:
            return {}
        keys = [self.keys.version_stats(b) for b in buckets]
        sums = await self._sum(keys, [len(COUNTERS), *COUNTERS, *wanted])
        out: dict[str, VersionCounts] = {}
        for version, row in zip(wanted, sums, strict=True):
            ok, err, n, ms, *slow = (float(text(x)) for x in row)
            out[version] = VersionCounts(int(ok), int(err), ms, int(n), [int(x) for x in slow])
        return out

    async def lead(self, owner: str, ttl_ms: int) -> bool:
        """Take or renew the guard's lease (atomically): True while ``owner`` holds it."""
        return bool(int(await self._lease([self.keys.rollout_guard()], [owner, ttl_ms])))
