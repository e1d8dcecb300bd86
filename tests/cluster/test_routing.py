"""The hot path's cluster client (broker/cluster.py) against a real local Redis Cluster: commands
routed by slot, batches split per primary, migrations (ASK, then MOVED) followed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import TryAgainError

from breakwater.broker.cluster import ClusterPipelinedRedis, slot_of
from breakwater.broker.connection import ClusterUrl
from breakwater.broker.wire import Endpoint
from breakwater.redis_cluster import LocalCluster

Routed = ClusterPipelinedRedis


@pytest.fixture(scope="module")
def cluster(server_cluster: LocalCluster) -> LocalCluster:
    return server_cluster  # tests/cluster/conftest.py: redis-server, then valkey-server


@pytest.fixture
async def fast(cluster: LocalCluster) -> AsyncIterator[ClusterPipelinedRedis]:
    seeds = [Endpoint("127.0.0.1", n.port) for n in cluster.nodes[:1]]
    client = ClusterPipelinedRedis(seeds, timeout_s=5)
    yield client
    await client.aclose()


def keys_on_every_primary(cluster: LocalCluster) -> list[str]:
    """One key per primary (found by trying tags)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < cluster.primaries:
        key = f"k:{{t{i}}}"
        found.setdefault(cluster.owner(slot_of(key)).port, key)
        i += 1
    return list(found.values())


def test_cluster_urls_parse() -> None:
    url = ClusterUrl.parse("rediss+cluster://app:s%3Acret@a.example:6379,b.example:6380/0?ssl_cert_reqs=none")
    assert url is not None
    assert url.seeds == (("a.example", 6379), ("b.example", 6380))
    assert (url.tls, url.username, url.password, url.verify) == (True, "app", "s:cret", False)
    bare = ClusterUrl.parse("rediss+cluster://h:1?ssl_ca_certs=/ca.pem")
    assert bare is not None and bare.seeds == (("h", 1),) and bare.ca_certs == "/ca.pem"
    assert ClusterUrl.parse("redis://localhost:6379/0") is None
    with pytest.raises(ValueError, match="database 0"):
        ClusterUrl.parse("redis+cluster://a:1/2")
    with pytest.raises(ValueError, match="host:port"):
        ClusterUrl.parse("redis+cluster://a")


async def test_a_batch_spans_every_primary_in_order(
    cluster: LocalCluster, fast: ClusterPipelinedRedis
) -> None:
    keys = keys_on_every_primary(cluster)
    run = uuid.uuid4().hex
    replies = await fast.pipeline([("SET", k, f"{run}:{k}") for k in keys] + [("GET", k) for k in keys])
    assert replies == ["OK"] * len(keys) + [f"{run}:{k}" for k in keys]
    assert {a for a in (fast._address(("GET", k)) for k in keys)} == {  # one connection per primary
        ("127.0.0.1", cluster.owner(slot_of(k)).port) for k in keys
    }
    for key in keys:  # each is where the cluster says, not just readable through redirections
        assert cluster.client(cluster.owner(slot_of(key))).get(key) == f"{run}:{key}"


async def test_scripts_are_loaded_on_every_primary(
    cluster: LocalCluster, fast: ClusterPipelinedRedis
) -> None:
    source = f"return '{uuid.uuid4().hex}'"
    await fast.broadcast("SCRIPT", "LOAD", source)
    sha = cluster.client(cluster.nodes[0]).script_load(source)
    for node in cluster.nodes:
        assert cluster.client(node).script_exists(sha) == [True]


async def test_a_slot_migration_is_followed(cluster: LocalCluster, fast: Routed) -> None:
    key = f"m:{{{uuid.uuid4().hex}}}"
    other = f"m:{{{key[3:-1]}}}:other"  # same slot
    slot = slot_of(key)
    await fast.execute("SET", key, "before")
    source = cluster.owner(slot)
    target = next(n for n in cluster.nodes if n is not source)
    src, dst = cluster.client(source), cluster.client(target)
    # Mid-migration: the key moved, the slot not yet: the source answers ASK for it.
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source))
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target))
    src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
    assert await fast.execute("GET", key) == "before"
    assert await fast.execute("SET", other, "new") == "OK"  # a new key of the slot: created there
    assert dst.execute_command("ASKING") and dst.execute_command("GET", other) == "new"
    # The slot moved: MOVED updates the map.
    for node in (target, source, *[n for n in cluster.nodes if n not in (source, target)]):
        cluster.client(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(target))
    assert await fast.pipeline([("GET", key), ("GET", other)]) == ["before", "new"]
    assert fast._address(("GET", key)) == ("127.0.0.1", target.port)
    assert cluster.owner(slot) is target


async def test_a_scripts_own_key_moved_ahead_of_its_slot_is_a_transient_error(
    cluster: LocalCluster, fast: Routed
) -> None:
    """enqueue.lua names a tenant's wait list itself: moved ahead of its slot (a reshard with a
    backlog), Redis refuses the script, and the gateway answered 500 (a ResponseError); now a
    transient TryAgainError (503, Retry-After), not sent again: the script may have written."""
    key = f"s:{{{uuid.uuid4().hex}}}"
    own = f"s:{{{key[3:-1]}}}:own"  # same slot, not declared to the script
    slot = slot_of(key)
    await fast.pipeline([("SET", key, "declared"), ("SET", own, "undeclared")])
    source = cluster.owner(slot)
    target = next(n for n in cluster.nodes if n is not source)
    src, dst = cluster.client(source), cluster.client(target)
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source))
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target))
    src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", own)
    try:
        [reply] = await fast.pipeline([("EVAL", "return redis.call('GET', ARGV[1])", 1, key, own)])
        assert isinstance(reply, TryAgainError) and "non local key" in str(reply), reply
    finally:  # the migration completed: both keys on the target
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
        for node in (target, source, *[n for n in cluster.nodes if n not in (source, target)]):
            cluster.client(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(target))
    assert await fast.pipeline([("GET", key), ("GET", own)]) == ["declared", "undeclared"]


def test_cluster_urls_from_a_local_cluster(cluster: LocalCluster) -> None:
    url = ClusterUrl.parse(cluster.url)
    assert url is not None and [p for _, p in url.seeds] == [n.port for n in cluster.nodes]
