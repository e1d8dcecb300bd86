"""Start a local Redis Cluster (``redis-server --cluster-enabled yes`` + ``redis-cli --cluster
create``): N primaries, each with ``replicas`` replicas, on free ports of 127.0.0.1. For tests and
``breakwater up --redis-cluster N``; production clusters are managed (docs/deploy.md)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from breakwater.broker.connection import RESP
from breakwater.redis_server import RedisServer, RedisServerError, find_redis_server, free_port


def find_redis_cli(server_binary: str | None = None) -> str:
    """The cli that goes with ``server_binary`` (valkey-cli beside valkey-server), else any."""
    server = Path(server_binary or find_redis_server())
    beside = str(server.with_name("valkey-cli" if "valkey" in server.name else "redis-cli"))
    for candidate in (beside, shutil.which("redis-cli"), shutil.which("valkey-cli")):
        if candidate and Path(candidate).exists():
            return candidate
    raise RedisServerError("no redis-cli (or valkey-cli) found: apt-get install redis-tools")


def _info(port: int, section: str) -> dict[str, str]:
    """``INFO <section>`` (or ``CLUSTER INFO``) of a local node, as a dict."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        cmd = b"CLUSTER INFO\r\n" if section == "cluster" else f"INFO {section}\r\n".encode()
        s.sendall(cmd)
        data = b""
        while not _bulk_len(data) or len(data) < _bulk_len(data):
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("connection closed mid-reply")
            data += chunk
    text = data.split(b"\r\n", 1)[1].decode(errors="replace")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _bulk_len(data: bytes) -> int:
    """The whole reply's length once its ``$<n>`` header is in."""
    head, sep, _ = data.partition(b"\r\n")
    if not sep or not head.startswith(b"$"):
        return 0
    return len(head) + 2 + int(head[1:]) + 2


SLOTS = 16384


class LocalCluster:
    """``primaries`` x (1 + ``replicas``) cluster-mode servers with short failover timeouts."""

    def __init__(
        self,
        data_dir: Path,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        appendfsync: str = "everysec",
        binary: str | None = None,
    ) -> None:
        """``binary``: the server to run (redis-server or valkey-server; None: whichever is found)."""
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs a primary or more, and replicas >= 0")
        self.data_dir = data_dir
        self.primaries = primaries
        self.replicas = replicas
        self.binary = binary
        count = primaries * (1 + replicas)
        self._node_timeout_ms = node_timeout_ms
        self._appendfsync = appendfsync
        self.bus_ports = [free_port() for _ in range(count)]
        self.nodes = [self._node(i, data_dir / f"node{i}") for i in range(count)]

    def _node(self, i: int, folder: Path) -> RedisServer:
        return RedisServer(
            folder,
            appendfsync=self._appendfsync,
            extra_args=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                # The bus port is port + 10000 unless given: ports above 55535 would not do.
                "--cluster-port",
                str(self.bus_ports[i]),
                "--cluster-node-timeout",
                str(self._node_timeout_ms),
                # A replica may be promoted however long it was cut off (tests kill primaries).
                "--cluster-replica-validity-factor",
                "0",
                "--cluster-require-full-coverage",
                "no",
            ],
            binary=self.binary,
        )

    def _start_node(self, i: int, attempts: int = 3) -> None:
        """Start node ``i``; when its port or bus port was taken between choosing and binding it (an
        outgoing connection's ephemeral port, say), choose new ones and start it again."""
        for attempt in range(attempts):
            try:
                self.nodes[i].start()
                return
            except RedisServerError as exc:
                if "Address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                self.bus_ports[i] = free_port()
                self.nodes[i] = self._node(i, self.data_dir / f"node{i}-{attempt + 1}")

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def local_url(self) -> str:
        """:attr:`url`: a cluster's clients follow the nodes' announced TCP addresses."""
        return self.url

    def start(self, timeout_s: float = 30.0) -> None:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        for i in range(len(self.nodes)):
            self._start_node(i)
        if self.primaries < 3 and self.replicas == 0:  # redis-cli --cluster create wants 3 or more
            cli = find_redis_cli(self.binary)
            share = SLOTS // self.primaries
            for i, node in enumerate(self.nodes):
                last = SLOTS - 1 if i == self.primaries - 1 else (i + 1) * share - 1
                subprocess.run(
                    [cli, "-p", str(node.port), "cluster", "addslotsrange", str(i * share), str(last)],
                    check=True,
                    capture_output=True,
                )
                if i:
                    first = (str(self.nodes[0].port), str(self.bus_ports[0]))
                    subprocess.run(
                        [cli, "-p", str(node.port), "cluster", "meet", "127.0.0.1", *first],
                        check=True,
                        capture_output=True,
                    )
        else:
            subprocess.run(
                [
                    find_redis_cli(self.binary),
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{n.port}" for n in self.nodes),
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout_s,
            )
        self.wait_ok(timeout_s)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every live node reports ``cluster_state:ok`` and all slots are served."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._ok(n) for n in self.nodes if n.proc is not None and n.proc.poll() is None):
                return
            time.sleep(0.1)
        raise RedisServerError(f"the local cluster did not become ready within {timeout_s}s")

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        try:
            info = _info(node.port, "cluster")
        except OSError:
            return False
        return info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == "16384"

    def role(self, node: RedisServer) -> str:
        return _info(node.port, "replication").get("role", "")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __repr__(self) -> str:
        return f"LocalCluster({self.url})"

    # -- for tests and operations: who serves a slot, moving a slot ----------------------------------
    @staticmethod
    def client(node: RedisServer) -> Any:
        """A blocking client of one node (its ``execute_command`` is untyped: hence Any)."""
        return redis.Redis(
            host="127.0.0.1", port=node.port, decode_responses=True, socket_timeout=5, protocol=RESP
        )

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def owner(self, slot: int) -> RedisServer:
        """The primary serving ``slot`` now (as a live node sees the cluster)."""
        for row in self.client(self.live()[0]).execute_command("CLUSTER", "SLOTS"):
            if int(row[0]) <= slot <= int(row[1]):
                port = int(row[2][1])
                return next(n for n in self.nodes if n.port == port)
        raise RedisServerError(f"no node serves slot {slot}")

    def wait_promoted(self, slot: int, instead_of: RedisServer, timeout_s: float = 30.0) -> RedisServer:
        """Until a primary other than ``instead_of`` serves ``slot`` (a replica was promoted) and
        the cluster is ok again; that primary."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                owner = self.owner(slot)
            except (OSError, redis.RedisError, RedisServerError):
                owner = instead_of
            if owner is not instead_of:
                self.wait_ok(max(1.0, deadline - time.monotonic()))
                return owner
            time.sleep(0.1)
        raise RedisServerError(f"no replica took over slot {slot} within {timeout_s}s")

    def node_id(self, node: RedisServer) -> str:
        return str(self.client(node).execute_command("CLUSTER", "MYID"))

    def migrate_slot(self, slot: int, target: RedisServer, batch: int = 10, pause_s: float = 0.0) -> int:
        """Move ``slot`` to ``target`` as ``redis-cli --cluster reshard`` does (IMPORTING/MIGRATING,
        MIGRATE in batches, then SETSLOT NODE everywhere): clients meet ASK, TRYAGAIN and MOVED on
        the way. Returns how many keys moved."""
        source = self.owner(slot)
        if source is target:
            return 0
        src, dst = self.client(source), self.client(target)
        src_id, dst_id = self.node_id(source), self.node_id(target)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause_s)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for node in self.live():
            if node not in (source, target) and self.role(node) == "master":
                self.client(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved
