"""Chaos on a real local Redis Cluster (3 primaries + 3 replicas), under continuous streaming load:
a primary SIGKILLed (its replica is promoted), and a live migration of the busy model's slot.
Every request is checked as in the single-server chaos suite (tests/chaos): exactly the text an
undisturbed run produces, no duplicated or missing token, and the books balance."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from breakwater.broker.cluster import slot_of
from breakwater.keys import Keys
from breakwater.redis_cluster import LocalCluster
from breakwater.redis_server import RedisServer
from tests.chaos.harness import Outcome, ResumingClient, books, make_specs, poll_for
from tests.chaos.test_chaos import WORKER, assert_exact, straddling, streams_mid_flight, urls
from tests.helpers import StackProcs

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of the scenario's own (it kills and moves things), failing over within ~1 s."""
    local = LocalCluster(tmp_path / "cluster", primaries=3, replicas=1, node_timeout_ms=1000)
    local.start()
    yield local
    local.stop()


def hosted_stream(
    client: ResumingClient, cluster: LocalCluster, prefix: str, node: RedisServer
) -> Callable[[], Awaitable[Outcome | None]]:
    """A finder for :func:`poll_for`: a stream mid-flight, with at most 30 tokens received, whose
    request keys ``node`` serves (each request's owner asked once)."""
    hosted: dict[str, bool] = {}

    async def find() -> Outcome | None:
        for out in client.streaming():
            if out.rid not in hosted:
                owner = await asyncio.to_thread(cluster.owner, slot_of(Keys(prefix).request(out.rid)))
                hosted[out.rid] = owner is node
            if hosted[out.rid] and len(out.events) <= 30:
                return out
        return None

    return find


def cluster_stack(cluster: LocalCluster, log_dir: Path, **gateway: object) -> StackProcs:
    procs = StackProcs(cluster.url, f"k{uuid.uuid4().hex[:10]}", log_dir)
    gateway_urls = [procs.add_gateway(detach_grace_s=60, **gateway) for _ in range(2)]
    for _ in range(2):
        procs.add_worker(**WORKER)
    procs.wait_workers(gateway_urls[0], count=2)
    return procs


async def test_a_primary_sigkilled_under_load_loses_no_token(cluster: LocalCluster, log_dir: Path) -> None:
    """The primary of the model's queue (and of about a third of the requests) dies; its replica
    is promoted; the killed node comes back as a replica. With BREAKWATER_REPLICA_ACK=1, every
    request completes exactly: admissions refused meanwhile (503) are retried by the client."""
    procs = cluster_stack(cluster, log_dir, replica_ack=1, replica_ack_ms=500)
    specs = make_specs("failover", 40, max_tokens=60)
    client = ResumingClient(urls(procs), deadline_s=120)
    try:
        slot = slot_of(Keys(procs.prefix).jobs("sim", "interactive"))
        victim = cluster.owner(slot)
        task = client.start(specs, rate=8, tag=uuid.uuid4().hex[:8])
        await streams_mid_flight(client, 6)
        # A stream whose own keys live on the victim, with >= 30 of its 60 tokens to go: it cannot
        # finish before the promotion (which cannot come within the cluster's 1 s node timeout).
        find = hosted_stream(client, cluster, procs.prefix, victim)
        hit = await poll_for(find, 20, "a stream on the victim")
        killed_at = asyncio.get_running_loop().time()
        victim.stop(kill=True)
        await asyncio.to_thread(cluster.wait_promoted, slot, victim)  # its replica took over
        promoted_at = asyncio.get_running_loop().time()
        victim.start()  # back, as a replica of the promoted node
        await asyncio.to_thread(cluster.wait_ok, 30)
        outcomes = await task
        alive = [w.alive() for w in procs.workers] + [g.alive() for g, _ in procs.gateways]
    finally:
        await client.close()
        procs.stop()
    b = books("cluster-primary-sigkill", specs, outcomes)
    assert_exact(b)
    assert b.completed == 40, b
    # The failover hit a stream mid-flight: tokens before the kill, and after it through the promoted
    # replica (no node serves its keys within the 1 s node timeout); assert_exact: not one lost.
    assert hit.tokens_between(0, killed_at) and hit.tokens_between(killed_at + 1.0, math.inf), hit
    assert promoted_at > killed_at + 1.0
    assert all(alive)  # every process rode through the failover


async def test_a_live_migration_of_the_busy_models_slot_is_invisible(
    cluster: LocalCluster, log_dir: Path
) -> None:
    """``{sim}``'s slot (its job streams, fair-share state, waiting lists) moves to another primary
    while requests stream; clients see no error and no refusal."""
    procs = cluster_stack(cluster, log_dir)
    specs = make_specs("reshard", 40, max_tokens=40)
    client = ResumingClient(urls(procs), deadline_s=120)
    slot = slot_of(Keys(procs.prefix).jobs("sim", "interactive"))
    try:
        task = client.start(specs, rate=10, tag=uuid.uuid4().hex[:8])
        await streams_mid_flight(client, 6)
        source = cluster.owner(slot)
        target = next(n for n in cluster.nodes if n is not source and cluster.role(n) == "master")
        began = asyncio.get_running_loop().time()
        moved = await asyncio.to_thread(cluster.migrate_slot, slot, target, 1, 0.05)
        ended = asyncio.get_running_loop().time()
        outcomes = await task
    finally:
        await client.close()
        procs.stop()
    assert moved >= 3 and cluster.owner(slot) is target
    b = books("cluster-reshard", specs, outcomes)
    assert_exact(b)
    assert b.completed == 40 and not b.refused, b
    assert straddling(outcomes, began, ended) or any(o.tokens_between(began, ended) for o in outcomes)
