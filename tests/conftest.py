"""Session fixtures: a real Redis-compatible server on a free port, and per-test key prefixes.

``BREAKWATER_TEST_REDIS=cluster`` runs the same tests against a real local Redis Cluster of three
primaries and three replicas (``redis-server --cluster-enabled yes`` + ``redis-cli --cluster create``):
``redis_server.url`` is then a ``redis+cluster://`` URL and ``redis`` a cluster client.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from breakwater.broker import Broker
from breakwater.broker.connection import connect
from breakwater.keys import Keys
from breakwater.redis_cluster import LocalCluster
from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, one_gateway_one_worker
from tests.inproc import InProc, inproc_gateway

CLUSTER = os.environ.get("BREAKWATER_TEST_REDIS", "") == "cluster"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The session's Redis (a :class:`RedisServer`), or its local cluster (a :class:`LocalCluster`)."""
    server: RedisServer | LocalCluster
    if CLUSTER:
        server = LocalCluster(tmp_path_factory.mktemp("cluster"), primaries=3, replicas=1)
    else:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = connect(redis_server.url)  # a cluster client on a cluster
    yield client
    await client.aclose()


@pytest.fixture
async def broker(redis: Redis, prefix: str) -> AsyncIterator[Broker]:
    """A broker on the test's Redis and key prefix (a module may define its own)."""
    broker = Broker(redis, Keys(prefix))
    yield broker
    await broker.fast.aclose()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    """One gateway and one fast sim worker for a whole module (tests use distinct seeds and prompts)."""
    with one_gateway_one_worker(
        redis_server.url, "m", log_dir, sim_decode_base_ms=1, heartbeat_s=0.5
    ) as procs:
        yield procs


@pytest.fixture
async def gw(redis_server: RedisServer, prefix: str) -> AsyncIterator[InProc]:
    """The gateway with one fast sim worker serving model ``sim``."""
    async with inproc_gateway(redis_server.url, prefix) as inproc:
        await inproc.add_worker()
        yield inproc


@pytest.fixture
async def gw_empty(redis_server: RedisServer, prefix: str) -> AsyncIterator[InProc]:
    """The gateway with no worker yet."""
    async with inproc_gateway(redis_server.url, prefix) as inproc:
        yield inproc


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, Redis]]:
    """A Redis of the test's own, whose memory limit it may change."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = Redis.from_url(server.url, decode_responses=True)
    try:
        yield server, client
    finally:
        await client.aclose()
        server.stop()
