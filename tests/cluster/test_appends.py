"""A worker's token writes on a real local Redis Cluster (redis-server, then valkey-server): one
script call per node and step (append.lua's per-node form), and a node's call that meets a moved or
migrating slot writes nothing there; its sequences land whole, one call each, after the move."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from breakwater.broker import Append, Broker, RequestSpec
from breakwater.broker.cluster import slot_of
from breakwater.broker.connection import connect
from breakwater.keys import Keys
from breakwater.redis_cluster import LocalCluster
from breakwater.redis_server import RedisServer
from tests.helpers import async_wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(server_cluster: LocalCluster) -> LocalCluster:
    return server_cluster  # tests/cluster/conftest.py: redis-server, then valkey-server


@pytest.fixture
async def broker(cluster: LocalCluster) -> AsyncIterator[Broker]:
    redis = connect(cluster.url)
    broker = Broker(redis, Keys(f"a{uuid.uuid4().hex[:8]}"))
    yield broker
    await broker.fast.aclose()
    await redis.aclose()


def rids_on_every_primary(cluster: LocalCluster, keys: Keys, per_primary: int) -> list[str]:
    """Request ids whose records are spread ``per_primary`` to a primary."""
    found: dict[int, list[str]] = {}
    while any(
        len(found.get(n.port, [])) < per_primary for n in cluster.live() if cluster.role(n) == "master"
    ):
        rid = uuid.uuid4().hex[:12]
        on = found.setdefault(cluster.owner(slot_of(keys.request(rid))).port, [])
        if len(on) < per_primary:
            on.append(rid)
    return [rid for rids in found.values() for rid in rids]


async def running(broker: Broker, rids: list[str]) -> None:
    for rid in rids:
        spec = RequestSpec(
            model="m", lane="interactive", kind="completion", request_id=rid, timeout_s=60, prompt="p"
        )
        assert (await broker.enqueue(rid=rid, spec=spec, max_queued=100, result_ttl_s=60)).accepted
        assert (await broker.start_job(rid, "w", 3, result_ttl_s=60)).record is not None


def step(rids: list[str], n: int) -> list[Append]:
    return [Append(rid, 1, n, f"{rid}:{n} ", 1) for rid in rids]


def evalsha_calls(node: RedisServer) -> tuple[int, int]:
    """(calls, failed calls) of EVALSHA on ``node``."""
    stats: Any = LocalCluster.client(node).info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("failed_calls", 0))


async def exact(broker: Broker, rids: list[str], steps: int) -> None:
    for rid in rids:
        events = await broker.read_events(rid, 0)
        assert [(e.seq, e.text) for e in events] == [(n, f"{rid}:{n} ") for n in range(1, steps + 1)], rid
        record = await broker.get_record(rid)
        assert record is not None and record.emitted == "".join(f"{rid}:{n} " for n in range(1, steps + 1))


async def test_a_step_is_one_script_call_per_node(cluster: LocalCluster, broker: Broker) -> None:
    rids = rids_on_every_primary(cluster, broker.keys, 3)
    await running(broker, rids)
    assert await broker.append_step(step(rids, 1)) == [1] * len(rids)  # loads the per-node script
    primaries = [n for n in cluster.live() if cluster.role(n) == "master"]
    before = [evalsha_calls(n)[0] for n in primaries]
    assert await broker.append_step(step(rids, 2)) == [2] * len(rids)
    assert [evalsha_calls(n)[0] - b for n, b in zip(primaries, before, strict=True)] == [1] * len(primaries)
    await exact(broker, rids, 2)


async def test_a_half_migrated_request_is_written_whole_after_the_move(
    cluster: LocalCluster, broker: Broker
) -> None:
    """One request's slot is mid-migration with its token stream already on the new node: its
    node's batched call must write nothing for any of that node's sequences (a record and text
    ahead of the stream would leave a hole), and once the slot has moved every sequence has its
    event, exactly once."""
    rids = rids_on_every_primary(cluster, broker.keys, 2)
    await running(broker, rids)
    for n in (1, 2):
        assert await broker.append_step(step(rids, n)) == [n] * len(rids)
    moving = rids[1]  # the second of its node's batch: the call is routed by the first's record
    slot = slot_of(broker.keys.request(moving))
    source = cluster.owner(slot)
    target = next(n for n in cluster.live() if n is not source and cluster.role(n) == "master")
    src, dst = LocalCluster.client(source), LocalCluster.client(target)
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source))
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target))
    src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", broker.keys.tokens(moving))
    _, failed = evalsha_calls(source)
    task = asyncio.create_task(broker.append_step(step(rids, 3)))
    # The batched call for the source node is refused (and the per-sequence retries wait on TRYAGAIN).
    await async_wait_for(lambda: evalsha_calls(source)[1] > failed, 10, what="the source node's refusal")
    assert int(src.hget(broker.keys.request(moving), "seq") or 0) == 2  # nothing written there
    assert cluster.migrate_slot(slot, target) == 2  # the record and the text follow; the slot moves
    assert await task == [3] * len(rids)
    await exact(broker, rids, 3)
    assert cluster.owner(slot) is target
