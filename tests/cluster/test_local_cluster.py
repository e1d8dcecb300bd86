"""The local cluster used by tests and `breakwater up --redis-cluster`: a node whose port was taken
between choosing and binding it (a clean-clone CI run lost a whole module to one) starts again on
new ports."""

from __future__ import annotations

import socket
from pathlib import Path

from breakwater.redis_cluster import LocalCluster


def test_a_node_whose_port_was_taken_starts_on_another(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, primaries=1, replicas=0)
    taken = cluster.nodes[0].port
    with socket.socket() as squatter:  # what an outgoing connection's ephemeral port would do
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            cluster.start()
            assert cluster.nodes[0].port != taken
            assert "Address already in use" in (tmp_path / "node0" / "redis.log").read_text()
            assert LocalCluster._ok(cluster.nodes[0])  # the cluster formed on the new port
        finally:
            cluster.stop()
