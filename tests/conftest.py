"""Session fixtures: a real Redis-compatible server on a free port, and per-test key prefixes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs
from tests.inproc import InProc, inproc_gateway


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    """One gateway and one fast sim worker for a whole module (tests use distinct seeds and prompts)."""
    procs = StackProcs(redis_server.url, f"m{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        procs.add_worker(sim_decode_base_ms=1, heartbeat_s=0.5)
        procs.wait_workers(url)
        yield procs
    finally:
        procs.stop()


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
