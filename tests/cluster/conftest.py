"""A three-primary local cluster per module, of redis-server and then of valkey-server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from breakwater.redis_cluster import LocalCluster
from breakwater.redis_server import find_valkey_server


@pytest.fixture(scope="module", params=["redis", "valkey"])
def server_cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalCluster]:
    """A cluster of Redis's redis-server, then of Valkey's valkey-server (the same protocol)."""
    binary = shutil.which("redis-server") if request.param == "redis" else find_valkey_server()
    assert binary, f"no {request.param} server here"
    local = LocalCluster(tmp_path_factory.mktemp(request.param), primaries=3, replicas=0, binary=binary)
    local.start()
    yield local
    local.stop()
