"""A worker's settings refuse what would lose a running request's data."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from breakwater.config import WorkerSettings


def test_results_must_outlive_several_leases() -> None:
    """The lease refresh keeps a running request's keys alive at every beat: a result TTL shorter
    than a few leases would let its emitted text expire between two beats (no continuation)."""
    with pytest.raises(ValidationError, match=r"result_ttl_s \(5\) must be at least 3 leases"):
        WorkerSettings(result_ttl_s=5)  # 3 x 2 s x 3 = 18 s at the default beat
    with pytest.raises(ValidationError, match="result_ttl_s"):
        WorkerSettings(result_ttl_s=60, heartbeat_s=10.0)
    assert WorkerSettings(result_ttl_s=18).result_ttl_s == 18
    assert WorkerSettings().result_ttl_s == 3600
