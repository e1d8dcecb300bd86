"""The Kubernetes manifests: every overlay renders, validates against the Kubernetes and CRD
schemas, passes checkov, and keeps the promises docs/deploy.md makes (security, drain, contracts).

No cluster runs here, so everything a cluster would reject is checked without one.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis

from breakwater.config import GatewaySettings, WorkerSettings
from breakwater.keys import GROUP, LANES, Keys
from breakwater.redis_server import find_redis_server, free_port
from tests.helpers import wait_for
from tests.k8s.render import (
    COMPOSITIONS,
    CRD_GROUPS,
    K8S,
    OVERLAYS,
    ROOT,
    pod_specs,
    render_composition,
    render_overlay,
    tool,
    validate_crds,
)

pytestmark = pytest.mark.timeout(600)
KUBERNETES_VERSION = "1.30.0"  # the oldest minor the manifests promise (docs/deploy.md)


def kubernetes_validate(objects: list[dict[str, Any]], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump_all(objects))
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_overlay_and_composition_renders(renders: dict[str, list[dict[str, Any]]]) -> None:
    assert set(OVERLAYS) == {
        "cpu",
        "embedded",
        "gpu-vllm",
        "gpu-vllm-inprocess",
        "hpa",
        "keda",
        "monitoring",
        "redis-cluster",
        "spot",
    }
    assert set(renders) == set(OVERLAYS) | set(COMPOSITIONS)
    for name, objects in renders.items():
        kinds = {o["kind"] for o in objects}
        assert {"Namespace", "StatefulSet", "Deployment", "Service", "NetworkPolicy"} <= kinds, name
        assert all(
            o["metadata"].get("namespace") == "breakwater" for o in objects if o["kind"] != "Namespace"
        )
    assert "ScaledObject" in {o["kind"] for o in renders["keda"]}
    assert "ScaledObject" in {o["kind"] for o in renders["redis-cluster+keda+keda-redis-cluster"]}
    assert {"StatefulSet", "Job"} <= {o["kind"] for o in renders["redis-cluster"]}
    assert "HorizontalPodAutoscaler" in {o["kind"] for o in renders["hpa"]}
    assert {"PrometheusRule", "ServiceMonitor", "PodMonitor"} <= {o["kind"] for o in renders["monitoring"]}


def test_core_objects_validate_against_kubernetes_schemas(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    for name, objects in renders.items():
        core = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUPS)]
        out = kubernetes_validate(core, tmp_path / f"{name}.yaml")
        assert out.returncode == 0, f"{name}:\n{out.stdout}{out.stderr}"
        assert "ERROR" not in out.stdout and "WARN" not in out.stdout, f"{name}:\n{out.stdout}"


def test_schema_validation_catches_a_bad_object(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The validator is not a rubber stamp: an unknown field and a wrong type are refused."""
    deployment = copy.deepcopy(next(o for o in renders["cpu"] if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecond"] = 10
    assert kubernetes_validate([deployment], tmp_path / "bad.yaml").returncode != 0
    scaled = copy.deepcopy(next(o for o in renders["keda"] if o["kind"] == "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "one"
    result = validate_crds([scaled])
    assert result["returncode"] == 1 and "minReplicaCount" in " ".join(result["errors"])


def test_crd_objects_validate_against_keda_and_prometheus_operator_schemas(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    for name, objects in renders.items():
        custom = [o for o in objects if o["apiVersion"].startswith(CRD_GROUPS)]
        result = validate_crds(objects)
        assert result["returncode"] == 0, f"{name}: {result['errors']}"
        assert len(result["validated"]) == len(custom), (name, result)
    assert set(validate_crds(renders["keda"])["validated"]) == {
        "ScaledObject/worker",
        "TriggerAuthentication/redis-metrics",
    }


def test_checkov_reports_no_failed_checks(renders: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    for name, objects in renders.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(objects))
    for framework, directory in (("kubernetes", tmp_path), ("dockerfile", ROOT / "deploy" / "docker")):
        out = subprocess.run(
            [
                tool("checkov"),
                "-d",
                str(directory),
                "--framework",
                framework,
                "--skip-download",
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={"BC_SKIP_MAPPING": "TRUE", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        )
        report = json.loads(out.stdout)
        reports = report if isinstance(report, list) else [report]
        summary = [r["summary"] for r in reports]
        assert all(s["failed"] == 0 for s in summary), (framework, _failed(reports))
        assert sum(s["passed"] for s in summary) > 100, summary
        for r in reports:  # every skip says why, inline
            for skipped in r["results"].get("skipped_checks", []):
                why = skipped["check_result"].get("suppress_comment") or ""
                assert len(why) > 20, (skipped["check_id"], skipped["resource"])


def _failed(reports: list[dict[str, Any]]) -> list[str]:
    return [
        f"{c['check_id']} {c['resource']}" for r in reports for c in r["results"].get("failed_checks", [])
    ]


def test_security_model(renders: dict[str, list[dict[str, Any]]]) -> None:
    for objects in renders.values():
        namespace = next(o for o in objects if o["kind"] == "Namespace")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
        assert all(a["automountServiceAccountToken"] is False for a in accounts.values())
        assert not [
            o for o in objects if o["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
        ]
        for where, spec in pod_specs(objects):
            assert spec["serviceAccountName"] in accounts, where  # its own, not `default`
            assert spec["automountServiceAccountToken"] is False, where
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            for c in spec.get("initContainers", []) + spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
                assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
                assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]), (where, c["name"])
                assert {"cpu", "memory"} <= set(c["resources"]["limits"]), (where, c["name"])
                assert not re.search(r":latest$|^[^:]+$", c["image"]), (where, c["image"])
        # No secret in a ConfigMap; every password is read from the Secret.
        for cm in (o for o in objects if o["kind"] == "ConfigMap"):
            for key, value in cm.get("data", {}).items():
                assert not re.search(r"(?i)password|token|api_key", key), (cm["metadata"]["name"], key)
                assert not re.search(r"redis://[^/@]*:[^/@]*@", value), (cm["metadata"]["name"], key)
        policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
        assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
        # The single Redis has no egress at all; a cluster's nodes reach only each other.
        assert ("redis" in policies) != ("redis-cluster" in policies)
        if "redis" in policies:
            assert policies["redis"]["egress"] == []
        else:
            assert policies["redis-cluster"]["egress"] == [
                {
                    "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "redis-cluster"}}}],
                    "ports": [{"protocol": "TCP", "port": 6379}, {"protocol": "TCP", "port": 16379}],
                }
            ]


def test_network_policies_allow_exactly_the_flows(renders: dict[str, list[dict[str, Any]]]) -> None:
    policies = {o["metadata"]["name"]: o["spec"] for o in renders["cpu"] if o["kind"] == "NetworkPolicy"}
    redis_from = [
        peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
        or peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in policies["redis"]["ingress"]
        for peer in rule["from"]
    ]
    assert sorted(redis_from) == ["gateway", "keda", "monitoring", "worker"]
    assert [p["port"] for p in policies["worker"]["ingress"][0]["ports"]] == [9400]  # metrics only
    for name in ("gateway", "worker"):
        egress = policies[name]["egress"]
        assert [r["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for r in egress] == [
            "redis"
        ]


def test_probes_and_drain_match_the_processes(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("cpu", "gpu-vllm", "gpu-vllm-inprocess"):
        objects = renders[name]
        config = next(
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "breakwater"
        )
        grace = float(config["data"]["BREAKWATER_DRAIN_GRACE_S"])
        specs = dict(pod_specs(objects))
        gateway = specs["Deployment/gateway"]["containers"][0]
        assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert gateway["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
        # preStop, the streams' grace and uvicorn's own 5 s (cli._serve) fit the pod's grace.
        stream_grace = float({e["name"]: e.get("value") for e in gateway["env"]}["BREAKWATER_STREAM_GRACE_S"])
        assert 5 + stream_grace + 5 < specs["Deployment/gateway"]["terminationGracePeriodSeconds"], name
        worker_spec = specs["Deployment/worker"]
        worker = next(c for c in worker_spec["containers"] if c["name"] == "worker")
        assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert "9400" in worker["args"]
        # The pod outlives the worker's drain grace, so in-flight work finishes or is released.
        assert worker_spec["terminationGracePeriodSeconds"] >= grace + 10, name
        vllm = [c for c in worker_spec["containers"] if c["name"] == "vllm"]
        if vllm:  # sidecar: vLLM keeps serving while the worker drains, and dies within the grace
            hold = float(vllm[0]["lifecycle"]["preStop"]["exec"]["command"][1])
            assert grace < hold < worker_spec["terminationGracePeriodSeconds"]
            assert vllm[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert (
                "--engine" in worker["args"]
                and worker["args"][worker["args"].index("--engine") + 1] == "openai"
            )
            assert worker["args"][worker["args"].index("--upstream-url") + 1] == "http://127.0.0.1:8001/v1"
            # The worker waits for vLLM's model load at least as long as vLLM's startup probe does.
            startup = vllm[0]["startupProbe"]
            waits = {e["name"]: e.get("value") for e in worker["env"]}
            assert (
                float(waits["BREAKWATER_UPSTREAM_WAIT_S"])
                >= startup["periodSeconds"] * startup["failureThreshold"]
            )
        if name == "gpu-vllm-inprocess":
            assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert worker["args"][worker["args"].index("--engine") + 1] == "vllm"


def test_the_embedded_shape_has_gateways_that_pull(renders: dict[str, list[dict[str, Any]]]) -> None:
    """overlays/embedded: no worker pods; the gateway runs the openai engine's worker itself, as
    the worker's ACL user, reaches the upstream and Redis only, and its pod outlives the drain."""
    objects = renders["embedded"]
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "breakwater")
    grace = float(config["data"]["BREAKWATER_DRAIN_GRACE_S"])
    specs = dict(pod_specs(objects))
    assert sorted(specs) == ["Deployment/gateway", "StatefulSet/redis"]
    assert not [o for o in objects if o["metadata"]["name"] == "worker"]
    spec = specs["Deployment/gateway"]
    [gateway] = spec["containers"]
    args = gateway["args"]
    assert args[args.index("--embed-engine") + 1] == "openai"
    upstream = args[args.index("--upstream-url") + 1]
    assert args[args.index("--model") + 1] == config["data"]["BREAKWATER_MODELS"]
    hold = float(gateway["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] >= hold + grace + 10
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["BREAKWATER_REDIS_USERNAME"] == "gateway"
    assert env["BREAKWATER_EMBED_REDIS_USERNAME"] == "worker"
    policy = next(
        o["spec"] for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "gateway"
    )
    [redis_rule, upstream_rule] = policy["egress"]
    assert redis_rule["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "redis"}}}]
    [peer] = upstream_rule["to"]
    host = upstream.split("//")[1].split("/")[0]  # vllm.inference.svc.cluster.local:8000
    service, namespace = host.split(".")[:2]
    assert peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == namespace
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == service
    assert upstream_rule["ports"] == [{"protocol": "TCP", "port": int(host.rsplit(":", 1)[1])}]


def test_spot_pool_beside_the_on_demand_pool(renders: dict[str, list[dict[str, Any]]]) -> None:
    """overlays/spot: the spot worker is the base worker on spot nodes, its grace inside the
    providers' 30 s notice; the on-demand worker stays off them; KEDA scales the spot pool from 0."""
    objects = renders["spot"]
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    on_demand, spot = deployments["worker"], deployments["worker-spot"]
    base = next(o for o in renders["cpu"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "worker")
    # Each Deployment selects its own pool's pods; both are `worker` pods to policies and monitors.
    assert on_demand["spec"]["selector"]["matchLabels"]["breakwater.dev/pool"] == "on-demand"
    assert spot["spec"]["selector"]["matchLabels"]["breakwater.dev/pool"] == "spot"
    for d in (on_demand, spot):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "worker"
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spot_terms = spot["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    spot_labels = {t["matchExpressions"][0]["key"] for t in spot_terms}
    assert spot_labels == {
        "cloud.google.com/gke-spot",
        "karpenter.sh/capacity-type",
        "eks.amazonaws.com/capacityType",
        "kubernetes.azure.com/scalesetpriority",
    }
    avoid = on_demand["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert len(avoid) == 1 and {e["key"] for e in avoid[0]["matchExpressions"]} == spot_labels
    assert all(e["operator"] in ("NotIn", "DoesNotExist") for e in avoid[0]["matchExpressions"])
    tolerated = {t["key"] for t in spot["spec"]["template"]["spec"]["tolerations"]}
    assert tolerated == {"cloud.google.com/gke-spot", "kubernetes.azure.com/scalesetpriority"}
    # The grace fits the shortest notice (30 s), with the drain grace and a margin inside it.
    pod = spot["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert pod["terminationGracePeriodSeconds"] < 30
    assert float(env["BREAKWATER_DRAIN_GRACE_S"]) + 5 <= pod["terminationGracePeriodSeconds"]
    assert "lifecycle" not in worker  # no preStop: it would only spend the notice
    # Otherwise the very worker of the base (no drift): image (and tag), args, probes, security, ...
    base_worker = base["spec"]["template"]["spec"]["containers"][0]
    for field in ("image", "args", "ports", "envFrom", "startupProbe", "livenessProbe", "readinessProbe",
                  "securityContext", "resources", "volumeMounts"):  # fmt: skip
        assert worker[field] == base_worker[field], field
    base_env = {e["name"]: e.get("value") for e in base_worker["env"]}
    assert {k: v for k, v in env.items() if k in base_env} == base_env
    assert set(env) - set(base_env) == {"BREAKWATER_DRAIN_GRACE_S", "BREAKWATER_HOURLY_COST_USD"}
    assert pod["volumes"] == base["spec"]["template"]["spec"]["volumes"]
    assert pod["securityContext"] == base["spec"]["template"]["spec"]["securityContext"]
    # KEDA scales the spot pool, from zero, on the very streams the broker uses.
    scaled = next(o for o in objects if o["kind"] == "ScaledObject")
    assert (
        scaled["spec"]["scaleTargetRef"]["name"] == "worker-spot" and scaled["spec"]["minReplicaCount"] == 0
    )
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "breakwater")
    keys = Keys(config["data"]["BREAKWATER_KEY_PREFIX"])
    streams = sorted(t["metadata"]["stream"] for t in scaled["spec"]["triggers"])
    assert streams == sorted(keys.jobs(config["data"]["BREAKWATER_MODELS"], lane) for lane in LANES)
    assert spot["spec"]["replicas"] == 0 and on_demand["spec"]["replicas"] >= 1


def test_keda_triggers_follow_the_key_contract(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The redis-streams triggers name the very streams and group the broker uses (DESIGN §4)."""
    objects = renders["keda"]
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "breakwater")
    model = config["data"]["BREAKWATER_MODELS"]
    keys = Keys(config["data"]["BREAKWATER_KEY_PREFIX"])
    scaled = next(o for o in objects if o["kind"] == "ScaledObject")
    streams = [t["metadata"] for t in scaled["spec"]["triggers"] if t["type"] == "redis-streams"]
    assert sorted(m["stream"] for m in streams) == sorted(keys.jobs(model, lane) for lane in LANES)
    assert all(m["consumerGroup"] == GROUP and "lagCount" in m for m in streams)
    host = config["data"]["BREAKWATER_REDIS_URL"].split("//")[1].split("/")[0]
    assert all(m["address"] == host for m in streams)
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    assert all(f'model="{model}"' in q for q in queries) and len(queries) == 2
    assert scaled["spec"]["maxReplicaCount"] == int(config["data"]["BREAKWATER_AUTOSCALE_MAX_WORKERS"])


def test_secret_keys_referenced_are_the_ones_created() -> None:
    # The base's script, and an overlay's own (overlays/redis-cluster: its internal users).
    script = "\n".join(p.read_text() for p in sorted(K8S.rglob("create-secrets.sh")))
    created = set(re.findall(r"--from-literal=([a-z-]+)=", script))
    referenced: set[str] = set()
    for name in list(OVERLAYS):
        text = yaml.safe_dump_all(render_overlay(name))
        referenced |= set(re.findall(r"key: ([a-z-]+-(?:password|username))", text))
    assert referenced and referenced <= created, (referenced, created)
    acl = (K8S / "base" / "redis" / "users.acl.tmpl").read_text()
    assert "user default off" in acl
    for user in ("gateway", "worker", "metrics"):
        assert re.search(rf"^user {user} on >@{user.upper()}_PASSWORD@ ", acl, re.M), user
        assert f"{user}-password" in created


def test_compositions_are_the_documented_ones(tmp_path: Path) -> None:
    for name, (overlay, components) in COMPOSITIONS.items():
        objects = render_composition(name, tmp_path)
        assert any(o["kind"] == "Deployment" for o in objects)
        docs = (ROOT / "docs" / "deploy.md").read_text()
        assert f"../{overlay}" in docs and all(f"components/{c}" in docs for c in components), name


def _breakwater_containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        c
        for _, spec in pod_specs(objects)
        for c in spec["containers"]
        if "/breakwater-" in c["image"] or c["image"].startswith("breakwater-")
    ]


def test_container_args_are_valid_breakwater_commands(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Every command line the manifests give a Breakwater container parses (typos fail here)."""
    seen: set[tuple[str, ...]] = set()
    for objects in renders.values():
        for container in _breakwater_containers(objects):
            seen.add(tuple(container["args"]))
    assert len(seen) >= 4  # gateway, llamacpp worker, openai sidecar worker, vllm worker
    for args in seen:
        out = subprocess.run(
            [sys.executable, "-m", "breakwater", *args, "--help"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, (args, out.stdout[-500:], out.stderr[-1500:])
    bad = subprocess.run(
        [sys.executable, "-m", "breakwater", "worker", "--metrics-prot", "9400", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0  # the control: a misspelt option is refused


def test_every_breakwater_variable_is_a_setting(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Settings ignore unknown variables, so a misspelt BREAKWATER_* in a manifest would be silently
    dropped: each one must name a real field of the process it configures."""
    fields = {
        "gateway": set(GatewaySettings.model_fields),
        "worker": set(WorkerSettings.model_fields),
    }
    shared = fields["gateway"] & fields["worker"]
    for name, objects in renders.items():
        config = next(
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "breakwater"
        )
        for key in config["data"]:
            field = key.removeprefix("BREAKWATER_").lower()
            assert key.startswith("BREAKWATER_") and field in fields["gateway"] | fields["worker"], (
                name,
                key,
            )
        for container in _breakwater_containers(objects):
            role = container["args"][0]
            known = fields.get(role, set()) | shared
            if "--embed-engine" in container["args"]:  # its worker reads the worker's settings
                known |= fields["worker"]
            for var in container.get("env", []):
                if var["name"].startswith("BREAKWATER_"):
                    field = var["name"].removeprefix("BREAKWATER_").lower()
                    assert field in known, (name, container["name"], var["name"])


def test_redis_pod_scripts_render_the_acl_and_probe_it(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The StatefulSet's shell snippets, run as written (paths moved into a temp folder): the
    init container renders users.acl from the Secret files, Redis starts with it, and the probe
    command answers only while Redis is up."""
    redis = next(o for o in renders["cpu"] if o["kind"] == "StatefulSet")
    spec = redis["spec"]["template"]["spec"]
    moved = {
        "/secrets/": tmp_path / "secrets",
        "/config/": tmp_path / "config",
        "/etc/redis/acl/": tmp_path / "acl",
    }
    for folder in moved.values():
        folder.mkdir()

    def local(command: str) -> str:
        for path, folder in moved.items():
            command = command.replace(path, f"{folder}/")
        return command

    passwords = {
        key: secrets.token_hex(24) for key in ("gateway-password", "worker-password", "metrics-password")
    }
    for key, value in passwords.items():
        (moved["/secrets/"] / key).write_text(value)  # as a Secret volume mounts it: no newline
    config = next(
        o for o in renders["cpu"] if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("redis")
    )
    for name, text in config["data"].items():
        (moved["/config/"] / name).write_text(text)
    init = spec["initContainers"][0]["command"]
    assert init[:2] == ["sh", "-ec"]
    subprocess.run(["sh", "-ec", local(init[2])], check=True, timeout=10)
    acl = (moved["/etc/redis/acl/"] / "users.acl").read_text()
    assert "_PASSWORD@" not in acl  # every placeholder filled
    assert all(value in acl for value in passwords.values())

    port = free_port()
    conf = (moved["/config/"] / "redis.conf").read_text()
    conf = re.sub(r"^(bind|port|dir|aclfile) .*$", "", conf, flags=re.M)
    conf += f"bind 127.0.0.1\nport {port}\ndir {tmp_path}\naclfile {moved['/etc/redis/acl/']}/users.acl\n"
    (tmp_path / "redis.conf").write_text(conf)
    probe = local(spec["containers"][0]["readinessProbe"]["exec"]["command"][2])
    probe = probe.replace("redis-cli ", f"{tool('redis-cli')} -p {port} ", 1)
    assert subprocess.run(["sh", "-c", probe], timeout=10).returncode != 0  # not up yet
    with open(tmp_path / "redis.log", "wb") as log:
        server = subprocess.Popen([find_redis_server(), str(tmp_path / "redis.conf")], stdout=log, stderr=log)
    try:
        wait_for(lambda: subprocess.run(["sh", "-c", probe], timeout=10).returncode == 0, 10, 0.1, "probe")
        for user in ("gateway", "worker", "metrics"):
            client = Redis(port=port, username=user, password=passwords[f"{user}-password"])
            assert client.ping()
            client.close()
        assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    finally:
        server.terminate()
        server.wait(10)


def test_each_process_reads_its_own_redis_password(renders: dict[str, list[dict[str, Any]]]) -> None:
    """BREAKWATER_REDIS_PASSWORD_FILE points into a mounted Secret volume that projects exactly
    that role's key, and the username matches the role's ACL user."""
    for name, objects in renders.items():
        for where, spec in pod_specs(objects):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for container in spec["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                if "BREAKWATER_REDIS_PASSWORD_FILE" not in env:
                    continue
                # A gateway's embedded worker (overlays/embedded) connects as the worker.
                roles = {"": container["args"][0]}
                if "--embed-engine" in container["args"]:
                    roles["EMBED_"] = "worker"
                for prefix, role in roles.items():
                    assert env[f"BREAKWATER_{prefix}REDIS_USERNAME"] == role, (name, where)
                    path = Path(env[f"BREAKWATER_{prefix}REDIS_PASSWORD_FILE"] or "")
                    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
                    secret = volumes[mount["name"]]["secret"]
                    assert secret["secretName"] == "breakwater-redis"
                    assert secret["items"] == [{"key": f"{role}-password", "path": path.name}], (name, where)
