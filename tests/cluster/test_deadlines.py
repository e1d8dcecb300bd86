"""The queue deadline reaper on a real local Redis Cluster (3 primaries): a partitioned model's lanes
are on several primaries and each request's record on its own slot; requests still queued at their
deadline end with the ``timeout`` error and leave their partition's lane, the others stay."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from breakwater.broker import Broker, RequestSpec
from breakwater.config import GatewaySettings
from breakwater.gateway.deadlines import QueueReaper
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.keys import queues
from breakwater.redis_cluster import LocalCluster

LANE = "interactive"
QUEUES = queues("m", 3)


@pytest.fixture(scope="module")
def cluster(server_cluster: LocalCluster) -> LocalCluster:
    return server_cluster  # tests/cluster/conftest.py: redis-server, then valkey-server


@pytest.fixture
async def settings(cluster: LocalCluster) -> GatewaySettings:
    prefix = f"p{uuid.uuid4().hex[:10]}"
    return GatewaySettings(redis_url=cluster.url, key_prefix=prefix, models="m", partitions="m=3")


@pytest.fixture
async def broker(settings: GatewaySettings) -> AsyncIterator[Broker]:
    broker = Broker.connect(settings)
    yield broker
    await broker.aclose()


def _spec(timeout_s: float) -> RequestSpec:
    return RequestSpec(
        model="m", lane=LANE, kind="completion", request_id="x", timeout_s=timeout_s, prompt="p", tenant="t"
    )


async def test_requests_past_their_deadline_end_and_leave_every_partition(
    broker: Broker, settings: GatewaySettings
) -> None:
    reaper = QueueReaper(broker, GatewayMetrics(), ttl_s=60)
    for i, queue in enumerate(QUEUES):  # one of each on every partition
        for rid, timeout_s in ((f"due{i}", 0.05), (f"later{i}", 60.0)):
            result = await broker.enqueue(
                rid=rid, spec=_spec(timeout_s), max_queued=10, result_ttl_s=60, queues=[queue]
            )
            assert result.accepted and result.queue == queue

    ended, deadline = 0, time.monotonic() + 10
    while ended < len(QUEUES):
        assert time.monotonic() < deadline, f"{ended} of {len(QUEUES)} requests ended"
        ended += await reaper.tick()
        await asyncio.sleep(0.02)

    for i, queue in enumerate(QUEUES):
        due, later = await broker.get_record(f"due{i}"), await broker.get_record(f"later{i}")
        assert due is not None and due.status.value == "error"
        assert later is not None and later.status.value == "queued"
        assert await broker.queue_depth(queue, LANE) == (1, 0)
        jobs = await broker.claim(queue, LANE, "w", 10, None)
        assert [job.rid for job in jobs] == [f"later{i}", ""]  # the ended one's entry binds to nothing


async def test_a_cancelled_request_is_withdrawn_from_its_partition_at_once(broker: Broker) -> None:
    """Its entry's score is its record's deadline, from the record's own primary: found by it."""
    queue = QUEUES[-1]
    result = await broker.enqueue(rid="c", spec=_spec(600), max_queued=10, result_ttl_s=60, queues=[queue])
    assert result.accepted
    assert await broker.cancel("c", 60) == 1
    record = await broker.get_record("c")
    assert record is not None
    assert await broker.withdraw("c", LANE, record.deadline_ms, QUEUES) is True
    assert await broker.queue_depth(queue, LANE) == (0, 0)
