"""Token events on a Redis Cluster go over sharded Pub/Sub: the gateway's SSUBSCRIBE sits on the
primary of the request's slot, and no classic subscription exists (``BREAKWATER_SHARDED_PUBSUB=false``
keeps classic Pub/Sub, every message to every node)."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from breakwater.broker.cluster import slot_of
from breakwater.keys import Keys
from breakwater.redis_cluster import LocalCluster
from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, expected_sim


@pytest.fixture(scope="module")
def cluster(server_cluster: LocalCluster) -> LocalCluster:
    return server_cluster  # tests/cluster/conftest.py: redis-server, then valkey-server


def _count(cluster: LocalCluster, node: RedisServer, what: str, channel: str) -> int:
    """``PUBSUB NUMSUB|SHARDNUMSUB channel`` on one node."""
    return int(cluster.client(node).execute_command("PUBSUB", what, channel)[1])


@pytest.mark.parametrize("sharded", [True, False])
def test_a_stream_is_subscribed_on_its_shard(cluster: LocalCluster, log_dir: Path, sharded: bool) -> None:
    procs = StackProcs(cluster.url, f"s{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway(sharded_pubsub=sharded)
        procs.add_worker(sim_decode_base_ms=40, heartbeat_s=0.3, sharded_pubsub=sharded)
        procs.wait_workers(url)
        body = {"model": "sim", "prompt": "sharded", "seed": 3, "max_tokens": 40, "stream": True}
        text: list[str] = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    first = orjson.loads(line[6:])
                    text.append(first["choices"][0]["text"])
                    break
            channel = Keys(procs.prefix).channel(first["id"])
            owner = cluster.owner(slot_of(channel))
            shard_subs = {
                n.port: cluster.client(n).execute_command("PUBSUB", "SHARDNUMSUB", channel)[1]
                for n in cluster.nodes
            }
            classic_subs = sum(
                cluster.client(n).execute_command("PUBSUB", "NUMSUB", channel)[1] for n in cluster.nodes
            )
            for line in lines:
                if line.startswith("data: {"):
                    text.append(orjson.loads(line[6:])["choices"][0]["text"])
    finally:
        procs.stop()
    if sharded:
        assert shard_subs == {n.port: 1 if n is owner else 0 for n in cluster.nodes}
        assert classic_subs == 0
    else:
        assert set(shard_subs.values()) == {0} and classic_subs == 1
    assert "".join(text) == expected_sim(prompt="sharded", seed=3, max_tokens=40)[0]
