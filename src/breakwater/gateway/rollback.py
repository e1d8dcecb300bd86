"""The rollback guard (issue 19): every gateway counts its finished requests per version and adds
them to Redis each second; one gateway at a time (a lease) judges each guarded alias's canaries
against its baseline and sets a failing canary's weight to 0, logged in the alias's history,
counted, and exported for the alert (``breakwater_alias_rolled_back``)."""

from __future__ import annotations

import logging
import uuid

from breakwater.broker.rollouts import Conflict, Refused, RolloutStore, VersionCounts
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.versions import VersionRouter
from breakwater.rollout.aliases import Alias

log = logging.getLogger(__name__)
LEASE_MS = 5000
GUARD = "rollback-guard"


class Outcomes:
    """This gateway's finished requests per model (version) since the last flush."""

    def __init__(self) -> None:
        self._counts: dict[str, VersionCounts] = {}

    def add(self, model: str, status: str, ttft_s: float | None) -> None:
        if status not in ("completed", "error"):
            return  # a cancelled request says nothing of its version
        c = self._counts.setdefault(model, VersionCounts())
        if status == "completed":
            c.ok += 1
        else:
            c.err += 1
        if ttft_s is not None:
            c.add_ttft(ttft_s * 1000.0)

    def take(self) -> dict[str, VersionCounts]:
        counts, self._counts = self._counts, {}
        return counts


def verdict(alias: Alias, version: str, counts: dict[str, VersionCounts]) -> str | None:
    """Why ``version`` (a canary of ``alias``) must be rolled back, or None."""
    guard = alias.guard
    baseline = alias.baseline
    if guard is None or version == baseline:
        return None
    canary, base = counts[version], counts[baseline]
    if canary.finished < guard.min_requests or base.finished < guard.min_requests:
        return None  # not enough evidence on both sides yet
    if canary.error_rate > base.error_rate + guard.max_error_delta:
        return (
            f"error rate {canary.error_rate:.1%} over {canary.finished} requests in {guard.window_s}s; "
            f"baseline {baseline} {base.error_rate:.1%} over {base.finished} "
            f"(allowed +{guard.max_error_delta:.1%})"
        )
    enough_ttfts = canary.ttft_n >= guard.min_requests and base.ttft_n >= guard.min_requests
    if guard.ttft_slo_ms and enough_ttfts:
        missed, base_missed = canary.missed(guard.ttft_slo_ms), base.missed(guard.ttft_slo_ms)
        if missed > base_missed + guard.max_error_delta:
            return (
                f"TTFT over {guard.ttft_slo_ms} ms for {missed:.1%} of {canary.ttft_n} requests in "
                f"{guard.window_s}s; baseline {baseline} {base_missed:.1%} of {base.ttft_n} "
                f"(allowed +{guard.max_error_delta:.1%})"
            )
    mine, theirs = canary.mean_ttft_ms, base.mean_ttft_ms
    slower = (
        guard.ttft_ratio > 0
        and mine is not None
        and theirs is not None
        and enough_ttfts
        and mine > theirs * guard.ttft_ratio
    )
    if slower:
        return (
            f"mean TTFT {mine:.0f} ms over {canary.ttft_n} requests in {guard.window_s}s; baseline "
            f"{baseline} {theirs:.0f} ms (allowed x{guard.ttft_ratio:g})"
        )
    return None


class RollbackGuard:
    def __init__(self, router: VersionRouter, store: RolloutStore, metrics: GatewayMetrics) -> None:
        self.router = router
        self.store = store
        self.metrics = metrics
        self.outcomes = Outcomes()
        self.owner = uuid.uuid4().hex

    async def tick(self) -> None:
        """Once a second: refresh the aliases, flush this gateway's counts of the versions a guard
        watches (none written where no alias is guarded), judge if leading. Counts a failed flush
        could not write are dropped (the write may have been applied: sending them again could
        count them twice; the guard judges rates, a gap only delays it)."""
        aliases = await self.router.aliases(fresh=True)
        guarded = [a for a in aliases.values() if a.guard is not None and len(a.versions) > 1]
        watched = {v for a in guarded for v in a.versions}
        counts = self.outcomes.take()
        await self.store.add_counts({v: c for v, c in counts.items() if v in watched})
        if guarded and await self.store.lead(self.owner, LEASE_MS):
            for alias in guarded:
                await self._judge(alias)

    async def _judge(self, alias: Alias) -> None:
        assert alias.guard is not None
        # Evidence from after the alias's last change only: a canary set again after a fix starts clean.
        counts = await self.store.counts(
            alias.versions, alias.guard.window_s, since_s=(alias.since_ms or alias.updated_ms) / 1000
        )
        for version in alias.versions:
            why = verdict(alias, version, counts)
            if why is None or not alias.serves(version):
                continue
            changed = alias.without(version, by=GUARD, why=why)
            try:  # the other canaries keep their evidence: new_evidence=False
                await self.store.put(changed, expected=alias.revision, new_evidence=False)
            except Conflict:  # changed meanwhile (by hand): judge the new one next tick
                return
            except Refused as exc:  # cannot happen to a record the store accepted; never stall the rest
                log.error("rollback refused", extra={"fields": {"alias": alias.name, "error": str(exc)}})
                return
            self.metrics.rollbacks.labels(alias.name, version).inc()
            log.warning(
                "canary rolled back",
                extra={"fields": {"alias": alias.name, "version": version, "why": why}},
            )
            await self.router.aliases(fresh=True)
            return  # one change per alias per tick: the next judges the new weights
