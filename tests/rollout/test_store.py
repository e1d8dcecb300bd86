"""The rollout store against a real Redis (or the local cluster): per-version counts in time
buckets, the window after an alias's change, and the guard's lease."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from breakwater.broker import Broker
from breakwater.broker.rollouts import BUCKET_S, RolloutStore, VersionCounts
from breakwater.config import GatewaySettings
from breakwater.redis_server import RedisServer
from breakwater.rollout.aliases import Alias
from tests.helpers import async_wait_for


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RolloutStore]:
    broker = Broker.connect(GatewaySettings(redis_url=redis_server.url, key_prefix=prefix))
    try:
        yield broker.rollouts()
    finally:
        await broker.aclose()


async def test_counts_add_up_over_gateways_and_buckets_and_start_after_a_change(store: RolloutStore) -> None:
    t0 = 1_000_000.0 * BUCKET_S  # the start of a bucket
    one = {"m@a": VersionCounts(ok=3, err=1), "m@b": VersionCounts(err=2)}
    for ttft in (5.0, 5.0, 10.0, 20.0):
        one["m@a"].add_ttft(ttft)
    late = VersionCounts(ok=1)
    late.add_ttft(1500.0)  # over the 250, 500 and 1000 ms SLOs
    await store.add_counts(one, now_s=t0)
    # Another gateway, the same second.
    await store.add_counts({"m@a": VersionCounts(ok=2, ttft_ms=10.5, ttft_n=2)}, now_s=t0 + 0.5)
    await store.add_counts({"m@a": VersionCounts(ok=5), "m@c": late}, now_s=t0 + 2 * BUCKET_S)  # later
    got = await store.counts(["m@a", "m@b", "m@c"], 60, now_s=t0 + 2 * BUCKET_S)
    assert (got["m@a"].ok, got["m@a"].err, got["m@a"].ttft_n) == (10, 1, 6)
    assert got["m@a"].ttft_ms == pytest.approx(50.5) and got["m@a"].error_rate == pytest.approx(1 / 11)
    assert (got["m@b"].ok, got["m@b"].err) == (0, 2) and got["m@c"].finished == 1
    assert (
        got["m@c"].slow == [1, 1, 1, 0, 0, 0]
        and got["m@c"].missed(1000) == 1.0
        and got["m@a"].slow == [0] * 6
    )
    # Evidence from the bucket of a change (and before) is not used: only the next bucket's.
    since = await store.counts(["m@a", "m@b"], 60, since_s=t0 + 0.7, now_s=t0 + 2 * BUCKET_S)
    assert since["m@a"].ok == 5 and since["m@b"].finished == 0
    # Outside the window: nothing.
    assert (await store.counts(["m@a"], 60, now_s=t0 + 600))["m@a"].finished == 0


async def test_one_gateway_at_a_time_holds_the_lease(store: RolloutStore) -> None:
    assert await store.lead("gw-1", 300)
    assert not await store.lead("gw-2", 300)
    assert await store.lead("gw-1", 300)  # renewed
    # gw-1 stops renewing: the lease lapses and gw-2 takes it.
    await async_wait_for(lambda: store.lead("gw-2", 300), 5, 0.05, "the lease to lapse")
    assert not await store.lead("gw-1", 300)


async def test_the_guards_own_writes_keep_the_evidence_window(store: RolloutStore) -> None:
    by_hand = await store.put(Alias("m", {"m@a": 80, "m@b": 10, "m@c": 10}), expected=0)
    assert by_hand.since_ms == by_hand.updated_ms > 0  # Redis's clock, not this host's
    rolled = await store.put(
        by_hand.without("m@b", by="rollback-guard", why="x"), expected=1, new_evidence=False
    )
    assert (
        rolled.since_ms == by_hand.since_ms and rolled.updated_ms >= by_hand.updated_ms
    )  # m@c keeps its window
    again = await store.put(Alias("m", {"m@a": 90, "m@b": 10}), expected=2)
    assert again.since_ms == again.updated_ms >= rolled.updated_ms
