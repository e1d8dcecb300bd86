"""What a key (or a tenant, for all its keys) may use: rates, concurrency and token budgets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """One API key's limits, or a tenant's for all its keys (0: none)."""

    rpm: int = 0
    tpm: int = 0
    max_concurrent: int = 0
    budget_day: int = 0
    budget_month: int = 0

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_concurrent or self.budget_day or self.budget_month)
