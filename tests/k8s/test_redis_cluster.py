"""overlays/redis-cluster: Breakwater on a 6-node Redis Cluster (issue #16): the manifests keep
their promises, and the rendered scripts form a real local cluster Breakwater runs on."""

from __future__ import annotations

import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
from redis import Redis, RedisCluster
from redis.exceptions import RedisError

from breakwater.broker.connection import ClusterUrl
from breakwater.config import GatewaySettings
from breakwater.keys import GROUP, LANES, Keys, queues
from breakwater.redis_server import find_redis_server, free_port
from tests.helpers import expected_sim, wait_for
from tests.inproc import inproc_gateway
from tests.k8s.render import (
    K8S,
    tool,
)

pytestmark = pytest.mark.timeout(600)


# -- overlays/redis-cluster: Breakwater on a 6-node Redis Cluster (issue #16) -------------------------

CLUSTER = "redis-cluster"
CLUSTER_KEDA = "redis-cluster+keda+keda-redis-cluster"
CLUSTER_PASSWORDS = (
    "gateway-password",
    "worker-password",
    "metrics-password",
    "replication-password",
    "admin-password",
)


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert not selector.get("matchExpressions"), selector  # none used here: matchLabels only
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _cluster_pods(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], set[str]]:
    """The cluster's StatefulSet and the stable names of its pods (<pod>.<headless service>)."""
    sts = _one(objects, "StatefulSet", CLUSTER)
    name, service = sts["metadata"]["name"], sts["spec"]["serviceName"]
    return sts, {f"{name}-{i}.{service}" for i in range(sts["spec"]["replicas"])}


def _redis_conf(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The cluster's redis.conf, directive -> value (the StatefulSet runs the generated ConfigMap)."""
    sts = _one(objects, "StatefulSet", CLUSTER)
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    config = _one(objects, "ConfigMap", volumes["config"]["configMap"]["name"])
    conf = {}
    for line in config["data"]["redis.conf"].splitlines():
        if line.strip() and not line.startswith("#"):
            directive, _, value = line.partition(" ")
            conf[directive] = value
    return conf


def test_redis_cluster_replaces_the_single_redis(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Six cluster-mode nodes with their node config and AOF on the PersistentVolume, reachable by
    stable names (headless Service) on the client and bus ports; no single Redis remains."""
    for name in (CLUSTER, CLUSTER_KEDA):
        objects = renders[name]
        assert not [
            o
            for o in objects
            if o["metadata"]["name"] in ("redis", "redis-headless") and o["kind"] != "ServiceAccount"
        ]
        sts, _ = _cluster_pods(objects)
        assert [o["metadata"]["name"] for o in objects if o["kind"] == "StatefulSet"] == [CLUSTER]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert not [
            o
            for o in objects
            if o["kind"] == "Service" and o["spec"]["selector"].get("app.kubernetes.io/name") == "redis"
        ]
        assert sts["spec"]["replicas"] == 6
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        spec = sts["spec"]["template"]["spec"]
        redis = next(c for c in spec["containers"] if c["name"] == "redis")
        assert re.fullmatch(r"redis:7\.\d+\.\d+(-alpine)?", redis["image"])  # sharded Pub/Sub: >= 7
        assert {p["name"]: p["containerPort"] for p in redis["ports"]} == {"redis": 6379, "bus": 16379}
        conf = _redis_conf(objects)
        assert conf["cluster-enabled"] == "yes" and conf["appendonly"] == "yes"
        assert conf["cluster-node-timeout"] == "5000" and conf["cluster-port"] == "16379"
        assert conf["port"] == "6379" and conf["maxmemory-policy"] == "noeviction"
        assert conf["cluster-preferred-endpoint-type"] == "hostname"
        assert conf["masteruser"] == "replication" and "masterauth" not in conf  # from the Secret
        # nodes.conf and the AOF live on the pod's own PersistentVolumeClaim.
        data = next(m for m in redis["volumeMounts"] if m["name"] == "data")
        assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
        assert conf["dir"] == data["mountPath"]
        assert Path(conf["cluster-config-file"]).parent == Path(data["mountPath"])
        # The headless Service names every pod, ready or not (nodes find each other before the
        # cluster is formed), on both ports; the client Service never exposes the bus.
        headless = _one(objects, "Service", sts["spec"]["serviceName"])
        assert (
            headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
        )
        assert _selects({"matchLabels": headless["spec"]["selector"]}, labels)
        assert {p["port"]: p["targetPort"] for p in headless["spec"]["ports"]} == {
            6379: "redis",
            16379: "bus",
        }
        client = _one(objects, "Service", CLUSTER)
        assert 16379 not in {p["port"] for p in client["spec"]["ports"]}
        announce = next(e for e in spec["initContainers"][0]["env"] if e["name"] == "ANNOUNCE_HOSTNAME")
        assert announce["value"].startswith(
            f"$(POD_NAME).{headless['metadata']['name']}.$(POD_NAMESPACE).svc"
        )
        pdb = _one(objects, "PodDisruptionBudget", CLUSTER)
        assert pdb["spec"]["maxUnavailable"] == 1 and _selects(pdb["spec"]["selector"], labels)


def test_redis_cluster_bus_port_is_open_only_between_its_nodes(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    """16379 is reachable from the cluster's own pods and nothing else; gateways, workers, KEDA and the
    bootstrap Job reach the client port; the nodes' egress goes to each other only."""
    for name in (CLUSTER, CLUSTER_KEDA):
        objects = renders[name]
        sts, _ = _cluster_pods(objects)
        labels = sts["spec"]["template"]["metadata"]["labels"]
        node_peer = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": CLUSTER}}}
        assert _selects(node_peer["podSelector"], labels)
        policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"]
        bus_from: list[dict[str, Any]] = []
        client_from: list[str] = []
        for policy in policies:
            if not _selects(policy["podSelector"], labels):
                continue
            for rule in policy.get("ingress", []):
                assert rule.get("from") and rule.get("ports"), rule  # never from anywhere, any port
                ports = {p["port"] for p in rule["ports"]}
                if 16379 in ports:
                    bus_from += rule["from"]
                if 6379 in ports:
                    client_from += [
                        peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                        or peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                        for peer in rule["from"]
                    ]
        assert bus_from == [node_peer]
        assert sorted(client_from) == sorted(["gateway", "worker", "keda", CLUSTER, f"{CLUSTER}-bootstrap"])
        by_name = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
        for client in ("gateway", "worker", f"{CLUSTER}-bootstrap"):
            assert by_name[client]["egress"] == [
                {"to": [node_peer], "ports": [{"protocol": "TCP", "port": 6379}]}
            ], client
        job = _one(objects, "Job", f"{CLUSTER}-bootstrap")
        assert _selects(
            by_name[f"{CLUSTER}-bootstrap"]["podSelector"], job["spec"]["template"]["metadata"]["labels"]
        )
        assert by_name[f"{CLUSTER}-bootstrap"]["ingress"] == []


def test_redis_cluster_url_names_seeds_of_the_statefulset(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Gateways and workers get a redis+cluster:// URL whose 3 seeds are pods of the StatefulSet
    (by the headless Service's names), replica acknowledgement on, and settings that parse."""
    for name in (CLUSTER, CLUSTER_KEDA):
        objects = renders[name]
        _, pods = _cluster_pods(objects)
        data = _one(objects, "ConfigMap", "breakwater")["data"]
        url = data["BREAKWATER_REDIS_URL"]
        assert url.startswith("redis+cluster://")
        parsed = ClusterUrl.parse(url)
        assert parsed is not None and not parsed.tls
        assert parsed.username is None and parsed.password is None  # from the ACL settings
        assert len(parsed.seeds) == len(set(parsed.seeds)) == 3
        assert all(host in pods and port == 6379 for host, port in parsed.seeds), parsed.seeds
        settings = GatewaySettings(**{k.removeprefix("BREAKWATER_").lower(): v for k, v in data.items()})
        assert settings.replica_ack == 1 and settings.sharded_pubsub
        assert settings.partitions_of(data["BREAKWATER_MODELS"]) == 1
    # The commented partitions example is a valid setting and lists the queues it makes.
    text = (K8S / "overlays" / CLUSTER / "config.yaml").read_text()
    example = re.search(r"^\s*# BREAKWATER_PARTITIONS: (\S+)$", text, re.M)
    assert example and "BREAKWATER_REPLICA_ACK" in text
    settings = GatewaySettings(partitions=example[1])
    model, _, count = example[1].partition("=")
    assert settings.partitions_of(model) == int(count) > 1
    assert f"#   {', '.join(queues(model, int(count)))}\n" in text


def test_redis_cluster_bootstrap_job_is_idempotent(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The Job forms the cluster from every pod, and only where no node says cluster_state:ok;
    it gives up after a few tries and is cleaned up after it finished."""
    objects = renders[CLUSTER]
    sts, pods = _cluster_pods(objects)
    job = _one(objects, "Job", f"{CLUSTER}-bootstrap")
    assert 1 <= job["spec"]["backoffLimit"] <= 10
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["activeDeadlineSeconds"] > 0
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["image"] == next(
        c["image"] for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "redis"
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    assert sorted(env["NODES"].split()) == sorted(f"{pod}:6379" for pod in pods)
    replicas = int(env["REPLICAS_PER_PRIMARY"])
    assert replicas == 1 and sts["spec"]["replicas"] % (1 + replicas) == 0
    assert container["command"][:2] == ["sh", "-ec"]
    script = container["command"][2]
    check = script.index('cluster_state)" = ok')
    assert check < script.index("exit 0", check) < script.index("--cluster create")
    assert '--cluster-replicas "$REPLICAS_PER_PRIMARY" --cluster-yes' in script
    assert "--user admin" in script and "REDISCLI_AUTH" in script  # the password never in argv
    # The passwords a cluster node and the Job read come from Secrets the scripts create.
    created = set(
        re.findall(
            r"--from-literal=([a-z-]+)=", (K8S / "overlays" / CLUSTER / "create-secrets.sh").read_text()
        )
    )
    assert created == {"replication-password", "admin-password"}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    projected = {
        item["path"]: (source["secret"]["name"], item["key"])
        for source in volumes["passwords"]["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    assert set(projected) == set(CLUSTER_PASSWORDS)
    assert {k for (secret, k) in projected.values() if secret == "breakwater-redis-cluster"} == created
    (mount,) = container["volumeMounts"]
    assert {v["name"]: v for v in spec["volumes"]}[mount["name"]]["secret"] == {
        "secretName": "breakwater-redis-cluster",
        "defaultMode": 0o440,
        "items": [{"key": "admin-password", "path": "admin-password"}],
    }


def test_redis_cluster_acl_keeps_the_base_rules() -> None:
    """Each role keeps the single Redis's rules and gains only the cluster commands; the two new
    users can replicate and administer the cluster, and nothing else."""
    base = (K8S / "base" / "redis" / "users.acl.tmpl").read_text().splitlines()
    cluster = (K8S / "overlays" / CLUSTER / "redis" / "users.acl.tmpl").read_text().splitlines()
    assert cluster[0] == base[0] == "user default off"
    for line, base_line in zip(cluster[1 : len(base)], base[1:], strict=True):
        assert line.startswith(base_line + " "), line
        added = line.removeprefix(base_line).split()
        assert all(r.startswith(("+cluster|", "+readonly", "+asking", "+wait")) for r in added), added
        assert "+cluster|slots" in added and "+cluster|info" in added
    extra = {line.split()[1]: line.split()[4:] for line in cluster[len(base) :]}
    assert extra["replication"] == ["resetkeys", "resetchannels", "-@all", "+psync", "+replconf", "+ping"]
    assert extra["admin"] == [
        "resetkeys",
        "resetchannels",
        "-@all",
        "+@connection",
        "+ping",
        "+info",
        "+cluster",
    ]


def test_keda_on_redis_cluster_follows_the_key_contract(renders: dict[str, list[dict[str, Any]]]) -> None:
    """KEDA's redis-cluster-streams triggers read the very job streams and group the broker uses,
    from seeds that are the cluster's pods; the Prometheus triggers stay."""
    objects = renders[CLUSTER_KEDA]
    _, pods = _cluster_pods(objects)
    namespace = _one(objects, "Namespace", "breakwater")["metadata"]["name"]
    config = _one(objects, "ConfigMap", "breakwater")["data"]
    model = config["BREAKWATER_MODELS"]
    keys = Keys(config["BREAKWATER_KEY_PREFIX"])
    scaled = _one(objects, "ScaledObject", "worker")
    types = [t["type"] for t in scaled["spec"]["triggers"]]
    assert "redis-streams" not in types and types.count("prometheus") == 2
    streams = [t for t in scaled["spec"]["triggers"] if t["type"] == "redis-cluster-streams"]
    assert sorted(t["metadata"]["stream"] for t in streams) == sorted(
        keys.jobs(model, lane) for lane in LANES
    )
    auth = _one(objects, "TriggerAuthentication", "redis-metrics")
    assert {(r["parameter"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {
        ("username", "metrics-username"),
        ("password", "metrics-password"),
    }
    for trigger in streams:
        meta = trigger["metadata"]
        assert (
            meta["consumerGroup"] == GROUP and int(meta["lagCount"]) > 0 and meta["activationLagCount"] == "0"
        )
        assert trigger["authenticationRef"]["name"] == "redis-metrics"
        addresses = [a.rpartition(":") for a in meta["addresses"].split(",")]
        assert len(addresses) == 3 and all(port == "6379" for _, _, port in addresses)
        # Fully qualified: KEDA resolves them from its own namespace.
        assert {host for host, _, _ in addresses} <= {f"{pod}.{namespace}.svc.cluster.local" for pod in pods}
    # The example for a partitioned model names that model's real partition queues.
    text = (K8S / "components" / "keda-redis-cluster" / "scaledobject-patch.yaml").read_text()
    named = set(re.findall(r'"(bw:jobs:\{[^}]+\}:\w+)"', text))
    partitioned = {keys.jobs(q, lane) for q in queues(model, 3) for lane in LANES}
    assert named <= partitioned and any("#" in n for n in named), named - partitioned


def _pod_env(container: dict[str, Any], fields: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: downward-API fields, $(VAR) references."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], var["value"])
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _moved(command: str, moved: dict[str, Path]) -> str:
    for where, folder in moved.items():
        command = command.replace(where, f"{folder}/")
    return command


class _PodsHere:
    """The overlay's redis-cluster pods and bootstrap Job as local processes: the rendered shell
    snippets and redis.conf run as written, with their paths moved into ``tmp`` and the ports
    and announced addresses made local (every pod is 127.0.0.1 here)."""

    def __init__(self, objects: list[dict[str, Any]], tmp: Path) -> None:
        self.tmp = tmp
        self.sts = _one(objects, "StatefulSet", CLUSTER)
        self.spec = self.sts["spec"]["template"]["spec"]
        self.count: int = self.sts["spec"]["replicas"]
        self.job = _one(objects, "Job", f"{CLUSTER}-bootstrap")["spec"]["template"]["spec"]["containers"][0]
        self.passwords = {key: secrets.token_hex(24) for key in CLUSTER_PASSWORDS}
        self.shared = {"/secrets/": tmp / "secrets", "/config/": tmp / "config"}
        for folder in self.shared.values():
            folder.mkdir()
        for key, value in self.passwords.items():
            (self.shared["/secrets/"] / key).write_text(value)  # as a Secret volume: no newline
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        config = _one(objects, "ConfigMap", volumes["config"]["configMap"]["name"])
        for name, text in config["data"].items():
            (self.shared["/config/"] / name).write_text(text)
        self.ports = [free_port() for _ in range(self.count)]
        self.moved = [
            {
                **self.shared,
                "/data/": tmp / f"node{i}" / "data",
                "/etc/redis/runtime/": tmp / f"node{i}" / "runtime",
            }
            for i in range(self.count)
        ]
        self.path = f"{Path(tool('redis-cli')).parent}:/usr/bin:/bin"
        self.servers: dict[int, subprocess.Popen[bytes]] = {}

    def fqdn(self, i: int) -> str:
        return f"{CLUSTER}-{i}.{self.sts['spec']['serviceName']}.breakwater.svc.cluster.local"

    def init(self, i: int) -> subprocess.CompletedProcess[str]:
        """Node ``i``'s init container (users.acl, node.conf, nodes.conf's peer IPs)."""
        init = self.spec["initContainers"][0]
        assert init["command"][:2] == ["sh", "-ec"]
        for folder in (self.moved[i]["/data/"], self.moved[i]["/etc/redis/runtime/"]):
            folder.mkdir(parents=True, exist_ok=True)
        fields = {
            "status.podIP": "127.0.0.1",
            "metadata.name": f"{CLUSTER}-{i}",
            "metadata.namespace": "breakwater",
        }
        return subprocess.run(
            ["sh", "-ec", _moved(init["command"][2], self.moved[i])],
            env={**_pod_env(init, fields), "PATH": self.path},
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def configure(self, i: int) -> None:
        """node<i>.conf: the rendered redis.conf with this node's port, bus port and folders."""
        runtime, data = self.moved[i]["/etc/redis/runtime/"], self.moved[i]["/data/"]
        node_conf = (runtime / "node.conf").read_text()
        (runtime / "node.conf").write_text(node_conf.replace(self.fqdn(i), "127.0.0.1"))  # resolvable here
        conf = (self.shared["/config/"] / "redis.conf").read_text()
        for directive, value in {
            "bind": "127.0.0.1",
            "port": str(self.ports[i]),
            "cluster-port": str(free_port()),
            "dir": str(data),
            "cluster-config-file": str(data / "nodes.conf"),
            "aclfile": str(runtime / "users.acl"),
            "include": str(runtime / "node.conf"),
        }.items():
            conf, found = re.subn(rf"^{directive} .*$", f"{directive} {value}", conf, flags=re.M)
            assert found == 1, directive
        (self.tmp / f"node{i}.conf").write_text(conf)

    def start(self, i: int) -> None:
        with open(self.tmp / f"redis{i}.log", "ab") as log:
            conf = str(self.tmp / f"node{i}.conf")
            self.servers[i] = subprocess.Popen([find_redis_server(), conf], stdout=log, stderr=log)
        probe = _moved(self.spec["containers"][0]["readinessProbe"]["exec"]["command"][2], self.moved[i])
        probe = probe.replace("redis-cli ", f"{tool('redis-cli')} -p {self.ports[i]} ", 1)
        wait_for(lambda: subprocess.run(["sh", "-c", probe], timeout=10).returncode == 0, 10, 0.1, "probe")

    def stop(self, i: int) -> None:
        self.servers[i].terminate()
        self.servers[i].wait(10)

    def bootstrap(self) -> subprocess.CompletedProcess[str]:
        """The Job's script, its NODES made the local ports."""
        env = {e["name"]: e["value"] for e in self.job["env"]}
        env["NODES"] = " ".join(f"127.0.0.1:{port}" for port in self.ports)
        script = _moved(self.job["command"][2], {"/secrets/": self.shared["/secrets/"]})
        return subprocess.run(
            ["sh", "-ec", script], env={**env, "PATH": self.path}, capture_output=True, text=True, timeout=120
        )

    def admin(self, i: int) -> Redis:
        return Redis(
            port=self.ports[i],
            username="admin",
            password=self.passwords["admin-password"],
            decode_responses=True,
        )

    def cluster_info(self, i: int) -> dict[str, str]:
        client = self.admin(i)
        try:
            info: dict[str, str] = client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
            return info
        except (OSError, RedisError):
            return {}
        finally:
            client.close()

    def replication(self, i: int) -> dict[str, Any]:
        client = self.admin(i)
        try:
            return client.info("replication")
        finally:
            client.close()


async def test_redis_cluster_scripts_form_a_cluster_breakwater_runs_on(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The overlay's shell and config, run as written (paths and ports moved to this machine): the
    init container renders the ACL and node config for 6 nodes, the bootstrap Job forms the cluster
    (and a second run changes nothing), replicas authenticate to their primaries, a request runs as
    the gateway and worker users with replica acknowledgement, and the metrics user reads what KEDA
    and redis_exporter read. Then a node's stale peer IPs are corrected from their names."""
    objects = renders[CLUSTER]
    pods = _PodsHere(objects, tmp_path)
    for i in range(pods.count):
        pods.init(i)
        runtime = pods.moved[i]["/etc/redis/runtime/"]
        acl = (runtime / "users.acl").read_text()
        assert "_PASSWORD@" not in acl and all(value in acl for value in pods.passwords.values())
        node_conf = (runtime / "node.conf").read_text()
        assert f"masterauth {pods.passwords['replication-password']}\n" in node_conf
        assert "cluster-announce-ip 127.0.0.1\n" in node_conf
        assert f"cluster-announce-hostname {pods.fqdn(i)}\n" in node_conf
        pods.configure(i)
    try:
        for i in range(pods.count):
            pods.start(i)
        first = pods.bootstrap()
        assert first.returncode == 0 and "cluster created" in first.stdout, first.stdout + first.stderr

        def formed() -> bool:  # every node has heard of every other (gossip, on a busy machine: seconds)
            info = [pods.cluster_info(i) for i in range(pods.count)]
            return len({x.get("cluster_current_epoch") for x in info}) == 1 and all(
                x.get("cluster_state") == "ok" and int(x.get("cluster_known_nodes", 0)) == pods.count
                for x in info
            )

        wait_for(formed, 30, 0.1, "every node: cluster_state ok, all 6 nodes known, one epoch")
        info = [pods.cluster_info(i) for i in range(pods.count)]
        assert all(int(x["cluster_size"]) == pods.count // 2 for x in info)  # 3 primaries
        # Every replica authenticated to its primary as `replication` (masteruser/masterauth).
        roles = [pods.replication(i)["role"] for i in range(pods.count)]
        assert roles.count("master") == roles.count("slave") == pods.count // 2
        replicas = [i for i in range(pods.count) if roles[i] == "slave"]

        def linked() -> bool:
            return all(pods.replication(i)["master_link_status"] == "up" for i in replicas)

        wait_for(linked, 20, 0.1, "replicas linked to their primaries")
        again = pods.bootstrap()
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
        assert "cluster created" not in again.stdout
        assert [pods.cluster_info(i)["cluster_current_epoch"] for i in range(pods.count)] == [
            x["cluster_current_epoch"] for x in info
        ]
        await _serve_a_request_as_the_acl_users(objects, pods)
        _metrics_user_reads_what_keda_and_the_exporter_read(objects, pods)

        # Node 5 restarts with stale peer IPs in nodes.conf: the init container corrects them.
        pods.stop(5)
        nodes_conf = pods.moved[5]["/data/"] / "nodes.conf"
        text = nodes_conf.read_text()
        stale = re.sub(r"^(\w+ )127\.0\.0\.1:(?!.*myself)", r"\g<1>10.255.255.1:", text, flags=re.M)
        assert stale.count("10.255.255.1:") == pods.count - 1, text
        nodes_conf.write_text(stale)
        fixed = pods.init(5)
        assert fixed.stdout.count("127.0.0.1 10.255.255.1 -> 127.0.0.1") == pods.count - 1, fixed.stdout
        assert "10.255.255.1" not in nodes_conf.read_text()
        pods.configure(5)
        pods.start(5)
        wait_for(lambda: pods.cluster_info(5).get("cluster_state") == "ok", 30, 0.2, "node 5 back")
    finally:
        for i in list(pods.servers):
            pods.stop(i)


async def _serve_a_request_as_the_acl_users(objects: list[dict[str, Any]], pods: _PodsHere) -> None:
    """Breakwater on the local cluster, seeded as the config seeds it, as the gateway and worker
    ACL users, with the config's replica acknowledgement: a request answered, then one streamed
    (sharded Pub/Sub)."""
    config = _one(objects, "ConfigMap", "breakwater")["data"]
    parsed = ClusterUrl.parse(config["BREAKWATER_REDIS_URL"])
    assert parsed is not None
    ordinal = {f"{CLUSTER}-{i}.{pods.sts['spec']['serviceName']}": i for i in range(pods.count)}
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{pods.ports[ordinal[h]]}" for h, _ in parsed.seeds)
    ack = int(config["BREAKWATER_REPLICA_ACK"])
    prefix, password = config["BREAKWATER_KEY_PREFIX"], pods.passwords
    async with inproc_gateway(
        url, prefix, redis_username="gateway", redis_password=password["gateway-password"], replica_ack=ack
    ) as gw:
        await gw.add_worker(
            redis_username="worker", redis_password=password["worker-password"], replica_ack=ack
        )
        for stream in (False, True):
            body = {
                "model": "sim",
                "messages": [{"role": "user", "content": f"cluster {stream}"}],
                "max_tokens": 6,
                "seed": 1,
                "stream": stream,
            }
            resp = await gw.http.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            if stream:
                assert resp.text.rstrip().endswith("data: [DONE]"), resp.text
            else:
                expected, _, _ = expected_sim(messages=body["messages"], seed=1, max_tokens=6)  # type: ignore[arg-type]
                assert resp.json()["choices"][0]["message"]["content"] == expected


def _metrics_user_reads_what_keda_and_the_exporter_read(
    objects: list[dict[str, Any]], pods: _PodsHere
) -> None:
    """As `metrics`, with a cluster client as KEDA's: the job stream's group and lag, CLUSTER INFO."""
    config = _one(objects, "ConfigMap", "breakwater")["data"]
    metrics = RedisCluster(
        host="127.0.0.1",
        port=pods.ports[0],
        username="metrics",
        password=pods.passwords["metrics-password"],
        decode_responses=True,
    )
    try:
        groups = metrics.xinfo_groups(Keys(config["BREAKWATER_KEY_PREFIX"]).jobs("sim", "interactive"))
        assert [(g["name"], g["lag"]) for g in groups] == [(GROUP, 0)]
        assert metrics.cluster_info()["cluster_state"] == "ok"
    finally:
        metrics.close()
