"""A tenant's ledger in Redis: rate and concurrency limits at admission (``limits.lua``), and usage
metered exactly once per request when it ends (``meter.lua``). Both run on the tenant's hash slot."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from breakwater.broker.cluster import Fast
from breakwater.broker.record import RequestRecord, Status
from breakwater.broker.scripts import Script
from breakwater.broker.wire import Arg
from breakwater.keys import Keys
from breakwater.tenancy.limits import Limits

USAGE_TTL_S = 400 * 86400  # bills are made from these: kept a year and a month
METERED_TTL_S = 3 * 86400  # longer than any request lives (its deadline plus its result's TTL)
OUTCOMES = ("completed", "error", "cancelled", "rejected")
TENANT = "*"  # the tenant's own limiter, running set and usage totals sit beside its keys' under this id
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrent", "budget_day", "budget_month")
COUNTS = (*OUTCOMES, "prompt_tokens", "completion_tokens")


# The record fields Ledger.meter and the counter correction read.
SETTLE_FIELDS = (
    "status",
    "created",
    "tokens",
    "usage",
    "tenant",
    "key_id",
    "reserved_tokens",
    "held_tokens",
    "model",
    "lane",
)


def settle_read(record_key: str) -> tuple[str, ...]:
    """The command that reads what metering a request needs (not its prompt: megabytes)."""
    return ("HMGET", record_key, *SETTLE_FIELDS)


def settle_record(values: Any) -> RequestRecord | None:
    found = {k: v for k, v in zip(SETTLE_FIELDS, values, strict=True) if v is not None}
    return RequestRecord.from_hash(found) if "status" in found else None


def day_of(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(unix_s))


def until_next_day_and_month(unix_s: float) -> tuple[int, int]:
    """Milliseconds from ``unix_s`` to the next UTC midnight and to the next UTC month."""
    now = datetime.fromtimestamp(unix_s, UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    day = midnight + timedelta(days=1)
    month = (midnight.replace(day=28) + timedelta(days=4)).replace(day=1)
    return math.ceil((day - now).total_seconds() * 1000), math.ceil((month - now).total_seconds() * 1000)


@dataclass(frozen=True, slots=True)
class Window:
    """Where one subject's (key's or tenant's) rate limits stand after a decision; -1: no such limit."""

    requests_remaining: int = -1
    requests_reset_ms: int = 0
    tokens_remaining: int = -1
    tokens_reset_ms: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """The limiter's answer for a request: the key's window, and the tenant's when it has limits."""

    admitted: bool
    reason: str  # requests | tokens | concurrency | budget_day | budget_month (tenant_...) when refused
    retry_after_ms: int
    key: Window
    tenant: Window | None = None


@dataclass(frozen=True, slots=True)
class Billing:
    """What metering a request needs of its record: a worker keeps this for the whole run, not the
    record (whose prompt may be megabytes), and meters the request in its finish's call."""

    tenant: str
    key_id: str  # the id its limits and usage count under (a rotated key's first key's)
    reserved_tokens: int  # held at admission against tokens per minute until the request is metered
    created: int  # unix seconds: the day (and month) its usage counts under
    held_tokens: int = 0  # held at admission against the token budgets until then
    key: str = ""  # the key it was made with (for log lines)

    @classmethod
    def of(cls, record: RequestRecord) -> Billing:
        spec = record.spec
        held = spec.held_tokens or spec.reserved_tokens  # a record from before held_tokens: the same
        limit_id = spec.limit_id or spec.key_id
        return cls(spec.tenant, limit_id, spec.reserved_tokens, record.created, held, spec.key_id)


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: str
    key_id: str
    counts: dict[str, int]


class Ledger:
    def __init__(self, fast: Fast, redis: Any, keys: Keys) -> None:
        self.fast = fast
        self.redis = redis
        self.keys = keys
        self._limits = Script(fast, "limits")
        self._meter = Script(fast, "meter")
        self._unhold = Script(fast, "unhold")

    async def admit(
        self,
        tenant: str,
        key_id: str,
        limits: Limits,
        *,
        rids: Sequence[str],
        tokens: int,
        deadline_ms: int,
        tenant_limits: Limits | None = None,
        held: int | None = None,
        held_ahead: int = 0,
    ) -> Decision:
        """Check (and on admission take) the key's limits and, if it has any, the tenant's, for the
        requests ``rids`` as one arrival (one request, or a request's choices): ``tokens`` (theirs in
        all) against tokens per minute, ``held`` (default: ``tokens``) against the token budgets, of
        which the choices before a group's last hold ``held_ahead``: a budget admits the group only
        if it would admit it choice by choice."""
        now = time.time()
        subjects = [(key_id, limits)] + (
            [(TENANT, tenant_limits)] if tenant_limits and tenant_limits.any else []
        )
        keys = [self.keys.usage(tenant, day_of(now)), self.keys.usage_month(tenant, day_of(now)[:7])]
        args: list[str | int] = [
            tokens,
            " ".join(rids),
            deadline_ms,
            USAGE_TTL_S,
            *until_next_day_and_month(now),
            key_id,
            tokens if held is None else held,
            held_ahead,
        ]
        for subject, lim in subjects:
            keys += [self.keys.limiter(tenant, subject), self.keys.running(tenant, subject)]
            args += [subject, lim.rpm, lim.tpm, lim.max_concurrent, lim.budget_day, lim.budget_month]
        res = await self._limits(keys=keys, args=args)
        windows = [Window(*(int(v) for v in res[3 + 4 * i : 7 + 4 * i])) for i in range(len(subjects))]
        return Decision(
            bool(int(res[0])), str(res[1]), int(res[2]), windows[0], windows[1] if len(windows) > 1 else None
        )

    async def tenant_limits(self, tenant: str) -> Limits:
        raw: Any = await self.redis.hgetall(self.keys.tenant(tenant))
        return Limits(**{name: int(raw.get(name) or 0) for name in LIMIT_FIELDS})

    async def set_tenant_limits(self, tenant: str, limits: Limits) -> None:
        mapping: dict[Any, Any] = {name: getattr(limits, name) for name in LIMIT_FIELDS}
        await self.redis.hset(self.keys.tenant(tenant), mapping=mapping)

    async def meter(self, record: RequestRecord, rid: str, *, outcome: str | None = None) -> bool:
        """Count a request that ended (once: False when it had been). ``outcome`` defaults to the
        record's status; usage is the record's, or the tokens it emitted when it has none."""
        return bool(int(await self._meter(*self.meter_call(record, rid, outcome=outcome))))

    async def meter_ended(self, rid: str) -> bool:
        """Meter a request that ended while it waited for a worker (past its deadline, cancelled)
        and that no worker will now settle; False when it had been (or is not terminal, or gone)."""
        record = settle_record(await self.fast.execute(*settle_read(self.keys.request(rid))))
        if record is None or not record.status.terminal:
            return False
        return await self.meter(record, rid)

    def meter_call(
        self, record: RequestRecord, rid: str, *, outcome: str | None = None
    ) -> tuple[list[str], list[Arg]]:
        """``meter.lua``'s keys and arguments for :meth:`meter` (``settle.lua`` takes them too)."""
        if outcome is None:
            outcome = {Status.DONE: "completed", Status.CANCELLED: "cancelled"}.get(record.status, "error")
        usage = record.usage or {}
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", record.tokens))
        return self.meter_args(Billing.of(record), rid, outcome, prompt, completion)

    def meter_args(
        self, billing: Billing, rid: str, outcome: str, prompt: int, completion: int
    ) -> tuple[list[str], list[Arg]]:
        """``meter.lua``'s keys and arguments for a request of ``billing`` that used these tokens."""
        tenant, key_id = billing.tenant, billing.key_id
        day = day_of(billing.created or time.time())
        keys = [
            self.keys.usage(tenant, day),
            self.keys.metered(tenant, day),
            self.keys.usage_month(tenant, day[:7]),
            self.keys.limiter(tenant, key_id),
            self.keys.running(tenant, key_id),
            self.keys.limiter(tenant, TENANT),
            self.keys.running(tenant, TENANT),
        ]
        args: list[Arg] = [
            rid,
            key_id,
            outcome,
            prompt,
            completion,
            billing.reserved_tokens,
            USAGE_TTL_S,
            METERED_TTL_S,
            billing.held_tokens,
        ]
        return keys, args

    async def release(self, tenant: str, key_id: str, *rids: str) -> None:
        """Requests the limiter admitted but that were not queued after all (a lane was full):
        free their places among the running ones. What they took of the rates stays taken."""
        await self.redis.zrem(self.keys.running(tenant, key_id), *rids)
        await self.redis.zrem(self.keys.running(tenant, TENANT), *rids)

    async def unhold(self, tenant: str, key_id: str, held: int) -> None:
        """A request the limiter admitted but that was not queued after all: give back what it held
        against the budgets (no metering will). Today's and this month's hashes: admission was
        moments ago."""
        day = day_of(time.time())
        keys = [self.keys.usage(tenant, day), self.keys.usage_month(tenant, day[:7])]
        await self._unhold(keys=keys, args=[key_id, held])

    async def usage(self, tenant: str, first: str, last: str) -> list[UsageRow]:
        """A tenant's usage per day (``YYYY-MM-DD``, inclusive) and key."""
        rows: list[UsageRow] = []
        start = date.fromisoformat(first)
        for offset in range((date.fromisoformat(last) - start).days + 1):  # to 9999-12-31, not past it
            day = (start + timedelta(days=offset)).isoformat()
            raw: Any = await self.redis.hgetall(self.keys.usage(tenant, day))
            per_key: dict[str, dict[str, int]] = {}
            for field, value in raw.items():
                key_id, _, name = str(field).rpartition(":")
                if key_id == TENANT or name not in COUNTS:  # the tenant's totals, reservations held
                    continue
                per_key.setdefault(key_id, dict.fromkeys(COUNTS, 0))[name] = int(value)
            rows.extend(UsageRow(day, key_id, counts) for key_id, counts in sorted(per_key.items()))
        return rows
