"""A real Prometheus scrapes a real local stack under load, and every PromQL expression the
manifests use returns data: KEDA's Prometheus triggers, the prometheus-adapter rules behind the
HPA, the recording rules, the alerts and the Grafana dashboard.

The stack is the one the manifests describe, run as processes: Redis from deploy's redis.conf
with the ACL users rendered from users.acl.tmpl (the default user off), the gateway and the
llama.cpp worker with the base ConfigMap's settings, each logging in as its own ACL user, and
redis_exporter as the `metrics` user. Targets carry `namespace` and `pod` labels as the
Prometheus Operator adds them. KEDA's redis-streams triggers are read with the `metrics` user.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from redis import Redis
from redis.exceptions import AuthenticationError, NoPermissionError

from breakwater.redis_server import find_redis_server, free_port
from tests.helpers import Proc, wait_for
from tests.k8s.render import K8S, ROOT, prometheus_rules, render_overlay, tool

pytestmark = pytest.mark.timeout(600)

NAMESPACE = "breakwater"
# The GPU series come from NVIDIA's DCGM exporter, which needs a GPU: checked to parse only.
NEEDS_GPU = {"DCGM_FI_DEV_GPU_UTIL"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "inf", "nan",
}  # fmt: skip


@dataclass
class Live:
    prometheus: str
    gateway: str
    redis_port: int
    passwords: dict[str, str]
    model: str
    procs: list[Any] = field(default_factory=list)
    keda: list[dict[str, int]] = field(default_factory=list)  # per trigger, sampled under load

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert result, expr
        return float(result[0]["value"][1])

    def series(self, match: str) -> list[dict[str, str]]:
        r = httpx.get(f"{self.prometheus}/api/v1/series", params={"match[]": match}, timeout=10)
        assert r.status_code == 200, (match, r.text)
        found: list[dict[str, str]] = r.json()["data"]
        return found


def _config_map() -> dict[str, str]:
    objects = render_overlay("cpu")
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "breakwater")
    data: dict[str, str] = cm["data"]
    return data


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:  # the child keeps its own descriptor
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env)


def _start_redis(tmp: Path, port: int, passwords: dict[str, str]) -> subprocess.Popen[bytes]:
    acl = (K8S / "base" / "redis" / "users.acl.tmpl").read_text()
    for user, pw in passwords.items():
        acl = acl.replace(f"@{user.upper()}_PASSWORD@", pw)
    # An admin user for the test's own inspection (ACL LOG); the manifests have none.
    acl += f"user admin on >{passwords['admin']} ~* &* +@all\n"
    (tmp / "users.acl").write_text(acl)
    conf = (K8S / "base" / "redis" / "redis.conf").read_text()
    local = {"bind": "127.0.0.1", "port": str(port), "dir": str(tmp), "aclfile": str(tmp / "users.acl")}
    conf = "\n".join(
        f"{line.split()[0]} {local[line.split()[0]]}" if line.split() and line.split()[0] in local else line
        for line in conf.splitlines()
    )
    (tmp / "redis.conf").write_text(conf + "\n")
    return _spawn([find_redis_server(), str(tmp / "redis.conf")], tmp / "redis.log")


def _prometheus_config(tmp: Path, targets: dict[str, tuple[str, str]]) -> Path:
    rules = prometheus_rules()
    for group in rules["groups"]:
        group["interval"] = "1s"  # evaluate the recording rules as often as we scrape
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": [address], "labels": {"namespace": NAMESPACE, "pod": pod}}],
            }
            for job, (address, pod) in targets.items()
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("live")
    cm = _config_map()
    model = cm["BREAKWATER_MODELS"]
    passwords = {u: secrets.token_hex(16) for u in ("gateway", "worker", "metrics", "admin")}
    redis_port, gw_port, worker_port, exporter_port, prom_port, probe_port = (free_port() for _ in range(6))
    procs: list[Any] = []
    try:
        redis_proc = _start_redis(tmp, redis_port, passwords)
        procs.append(redis_proc)
        admin = Redis(port=redis_port, username="admin", password=passwords["admin"])
        wait_for(lambda: _pings(admin), 15, 0.1, "redis with ACL users")

        def env(user: str, extra: dict[str, str] | None = None) -> dict[str, str]:
            (tmp / f"{user}-password").write_text(passwords[user] + "\n")
            return {
                **cm,  # the Deployment's envFrom: the base ConfigMap, as is
                "BREAKWATER_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "BREAKWATER_REDIS_USERNAME": user,
                "BREAKWATER_REDIS_PASSWORD_FILE": str(tmp / f"{user}-password"),
                **(extra or {}),
            }

        gateway = Proc(["gateway", "--port", str(gw_port)], env("gateway"), tmp / "gateway.log")
        procs.append(gateway)
        worker = Proc(
            ["worker", "--engine", "llamacpp", "--metrics-port", str(worker_port)],
            env(
                "worker",
                {"BREAKWATER_CAPACITY": "8", "BREAKWATER_N_THREADS": "2", "BREAKWATER_HEARTBEAT_S": "0.5"},
            ),
            tmp / "worker.log",
        )
        procs.append(worker)
        exporter = _spawn(
            [
                tool("prometheus-redis-exporter"),
                f"--redis.addr=redis://127.0.0.1:{redis_port}",
                "--redis.user=metrics",
                f"--web.listen-address=127.0.0.1:{exporter_port}",
            ],
            tmp / "exporter.log",
            {"REDIS_PASSWORD": passwords["metrics"]},
        )
        procs.append(exporter)
        # The black-box probe (the monitoring component's Deployment), through the gateway.
        probe_args = ["probe", "--url", f"http://127.0.0.1:{gw_port}", "--model", model, "--interval", "1"]
        probe_args += ["--max-tokens", "8", "--drop-after", "4", "--metrics-port", str(probe_port)]
        procs.append(Proc(probe_args, {}, tmp / "probe.log"))
        targets = {
            "gateway": (f"127.0.0.1:{gw_port}", "gateway-7d9f-abcde"),
            "worker": (f"127.0.0.1:{worker_port}", "worker-5c4b-fghij"),
            "redis": (f"127.0.0.1:{exporter_port}", "redis-0"),
            "probe": (f"127.0.0.1:{probe_port}", "probe-6f7d-klmno"),
        }
        prometheus = _spawn(
            [
                tool("prometheus"),
                f"--config.file={_prometheus_config(tmp, targets)}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            tmp / "prometheus.log",
        )
        procs.append(prometheus)
        gw_url = f"http://127.0.0.1:{gw_port}"
        wait_for(lambda: _ok(f"http://127.0.0.1:{worker_port}/readyz"), 120, 0.2, "worker loaded")
        wait_for(lambda: _ok(f"{gw_url}/readyz"), 30, 0.1, "gateway ready")
        # An alias over the model, guarded (the rollout series: breakwater_alias_*), set as the
        # gateway's ACL user would from a gateway pod.
        alias = [
            sys.executable,
            "-m",
            "breakwater",
            "models",
            "alias",
            "set",
            "chat",
            f"{model}=100",
            "--guard",
        ]
        done = subprocess.run(
            alias, env={**os.environ, **env("gateway")}, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        wait_for(lambda: _ok(f"http://127.0.0.1:{prom_port}/-/ready"), 30, 0.2, "prometheus ready")
        yield Live(f"http://127.0.0.1:{prom_port}", gw_url, redis_port, passwords, model, procs)
    finally:
        for proc in reversed(procs):
            if isinstance(proc, Proc):
                proc.stop()
            elif proc.poll() is None:
                proc.terminate()
                proc.wait(15)


def _pings(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def loaded(live: Live, tmp_path_factory: pytest.TempPathFactory) -> Live:
    """A burst above one worker's capacity (the queue builds), then Prometheus has every series.
    Meanwhile, the KEDA ScaledObject's triggers are evaluated as KEDA would, every half second."""
    out = tmp_path_factory.mktemp("bench")
    with open(out / "bench.log", "wb") as log:
        bench = subprocess.Popen(
            [sys.executable, "-m", "breakwater", "bench", "--url", live.gateway, "--model", live.model,
             "--profile", "burst", "--peak", "12", "--ramp", "3", "--hold", "3", "--decay", "3",
             "--input-tokens", "32", "--output-tokens", "24", "--metrics-url", "off", "--out", str(out)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    scaled = next(o for o in render_overlay("keda") if o["kind"] == "ScaledObject")
    metrics = Redis(
        port=live.redis_port, username="metrics", password=live.passwords["metrics"], decode_responses=True
    )
    try:
        while bench.poll() is None:
            live.keda.append(_keda_replicas(live, scaled, metrics))
            time.sleep(0.5)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)  # (reaped: a fixture that failed left it to the next test's ResourceWarning)
        metrics.close()
    assert bench.wait(10) == 0, (out / "bench.log").read_text()[-2000:]
    summary = json.loads((out / "result.json").read_text())
    assert summary["completed"] > 50 and summary["failed"] == 0, summary
    # Recording rules see a full window of the load once Prometheus has evaluated them.
    wait_for(lambda: bool(live.query("breakwater:ttft_seconds:p99")), 60, 0.5, "recording rules")
    return live


def _keda_replicas(live: Live, scaled: dict[str, Any], metrics: Redis) -> dict[str, int]:
    """Replicas each trigger asks for, as KEDA computes them: ceil(value / target per replica). A
    group's lag must be a number at every sample: Redis answered null (KEDA reads -1) while jobs
    ended out of order, until ack.lua kept it known."""
    wanted: dict[str, int] = {}
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        if trigger["type"] == "redis-streams":
            group = next(
                g for g in metrics.xinfo_groups(meta["stream"]) if g["name"] == meta["consumerGroup"]
            )
            assert group["lag"] is not None, group
            value, target = float(group["lag"]), float(meta["lagCount"])
        else:
            result = live.query(meta["query"])
            value, target = (float(result[0]["value"][1]) if result else 0.0), float(meta["threshold"])
        wanted[trigger["name"]] = math.ceil(value / target)
    return wanted


def _selectors(expr: str) -> list[str]:
    """Every vector selector in an expression (metric name plus its label matchers)."""
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = []
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", expr):
        name, labels = m.group(1), m.group(2) or ""
        if name.lower() in PROMQL_WORDS or expr[m.end() :].lstrip().startswith("("):
            continue  # an operator keyword or a function
        found.append(name + labels)
    return found


def _require_data(live: Live, expr: str, where: str) -> None:
    """The expression returns samples, or (an alert's condition is false now) every selector in it
    does: the metrics it compares exist with the labels it names."""
    if live.query(expr):
        return
    selectors = _selectors(expr)
    assert selectors, (where, expr)
    for selector in selectors:
        if selector.split("{")[0] in NEEDS_GPU:
            continue
        assert live.query(selector), f"{where}: no data for {selector} (in {expr})"


def test_keda_prometheus_triggers_return_data(loaded: Live) -> None:
    scaled = next(o for o in render_overlay("keda") if o["kind"] == "ScaledObject")
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    assert len(queries) == 2
    for q in queries:
        result = loaded.query(q)
        assert result and float(result[0]["value"][1]) > 0, (q, result)  # tokens flowed; workers wanted


def test_keda_triggers_ask_for_more_workers_under_the_burst(loaded: Live) -> None:
    """One worker cannot keep up with the burst: KEDA sees the queue lag (never unreadable), the
    tokens/s, and the adaptive policy asking for more than one replica."""
    peak = {name: max(sample[name] for sample in loaded.keda) for name in loaded.keda[0]}
    record = ROOT / "results" / "k8s" / "keda-burst.json"  # for docs/deploy.md
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"peak": peak, "samples": loaded.keda}, indent=1))
    assert len(loaded.keda) >= 10, loaded.keda
    assert peak["interactive-lag"] >= 1, peak  # jobs waited for a worker, and KEDA saw them
    assert peak["desired-workers"] >= 2, peak  # the adaptive policy wants more than the one worker
    assert peak["output-tokens-per-second"] >= 1, peak
    assert peak["batch-lag"] == 0, peak  # the bench uses the interactive lane only
    assert max(peak.values()) <= 16  # maxReplicaCount holds anyway; the numbers are sane
    assert loaded.keda[-1]["interactive-lag"] == 0  # drained by the end


def test_keda_redis_streams_triggers_read_the_queue_as_the_metrics_user(loaded: Live) -> None:
    scaled = next(o for o in render_overlay("keda") if o["kind"] == "ScaledObject")
    metrics = Redis(
        port=loaded.redis_port,
        username="metrics",
        password=loaded.passwords["metrics"],
        decode_responses=True,
    )
    for trigger in (t for t in scaled["spec"]["triggers"] if t["type"] == "redis-streams"):
        meta = trigger["metadata"]
        groups = metrics.xinfo_groups(meta["stream"])
        group = next(g for g in groups if g["name"] == meta["consumerGroup"])
        assert group["lag"] == 0, group  # the burst has drained: known, not null (what KEDA reads)
        assert metrics.xlen(meta["stream"]) == group["pending"]


def test_least_privilege_acl_users_were_enough(loaded: Live) -> None:
    """Nothing the gateway, worker or exporter did under load was refused by Redis's ACLs, and a
    role's user cannot do another's work."""
    admin = Redis(
        port=loaded.redis_port, username="admin", password=loaded.passwords["admin"], decode_responses=True
    )
    denied = [(e["username"], e["object"]) for e in admin.acl_log()]
    assert denied == [], denied
    worker = Redis(port=loaded.redis_port, username="worker", password=loaded.passwords["worker"])
    with pytest.raises(NoPermissionError):
        worker.flushall()
    with pytest.raises(NoPermissionError):
        worker.get("other-app:key")
    gateway = Redis(port=loaded.redis_port, username="gateway", password=loaded.passwords["gateway"])
    with pytest.raises(NoPermissionError):
        gateway.xreadgroup("workers", "x", {f"bw:jobs:{{{loaded.model}}}:interactive": ">"})
    metrics = Redis(port=loaded.redis_port, username="metrics", password=loaded.passwords["metrics"])
    with pytest.raises(NoPermissionError):
        metrics.xrange(f"bw:jobs:{{{loaded.model}}}:interactive")
    with pytest.raises(AuthenticationError):
        Redis(port=loaded.redis_port).ping()  # the default user is off
    assert loaded.value("max(redis_up)") == 1.0


def test_prometheus_adapter_rules_return_data(loaded: Live) -> None:
    values = yaml.safe_load((K8S / "components" / "hpa" / "prometheus-adapter-rules.yaml").read_text())
    rules = values["rules"]
    checked = 0
    for kind in ("custom", "external"):
        for rule in rules[kind]:
            series = rule["seriesQuery"].strip("'")
            name = series.split("{")[0]
            matchers = f'namespace="{NAMESPACE}"'
            if kind == "custom":
                pods = {s["pod"] for s in loaded.series(series)} if name not in NEEDS_GPU else {"none"}
                matchers += f',pod=~"{"|".join(sorted(pods))}"'
                group_by = "pod"
            else:
                matchers += f',model="{loaded.model}"'
                group_by = "model"
            query = (
                rule["metricsQuery"]
                .replace("<<.Series>>", name)
                .replace("<<.LabelMatchers>>", matchers)
                .replace("<<.GroupBy>>", group_by)
            )
            if name in NEEDS_GPU:
                loaded.query(query)  # parses and runs; no GPU here to give it data
                continue
            assert loaded.series(series), f"adapter seriesQuery {series} finds nothing"
            assert loaded.query(query), f"adapter metricsQuery returns nothing: {query}"
            checked += 1
    assert checked == 4


def test_recording_rules_and_alerts_return_data(loaded: Live) -> None:
    groups = prometheus_rules()["groups"]
    records = [r for g in groups for r in g["rules"] if "record" in r]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert len(records) == 15 and len(alerts) == 10
    for rule in records:
        assert loaded.query(rule["expr"]), f"recording rule {rule['record']} expression returns nothing"
        assert loaded.query(rule["record"]), f"recorded series {rule['record']} missing"
    for rule in alerts:
        _require_data(loaded, rule["expr"], rule["alert"])
    # Prometheus loaded the same rules and evaluates them without errors.
    body = httpx.get(f"{loaded.prometheus}/api/v1/rules", timeout=10).json()
    loaded_rules = [r for g in body["data"]["groups"] for r in g["rules"]]
    assert len(loaded_rules) == 25 and all(r["health"] == "ok" for r in loaded_rules), loaded_rules


def test_dashboard_queries_return_data(loaded: Live) -> None:
    dashboard = json.loads((K8S / "components" / "monitoring" / "dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert len(panels) == 19 and len(exprs) >= 31
    for expr in exprs:
        concrete = expr.replace("$model", loaded.model).replace("$__rate_interval", "1m")
        assert loaded.query(concrete), f"dashboard query returns nothing: {concrete}"
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    assert variable["definition"] == "label_values(breakwater_workers, model)"
    assert {s["model"] for s in loaded.series("breakwater_workers")} == {loaded.model}


def test_selector_extraction() -> None:
    """The fallback that checks an alert's inputs finds exactly the selectors."""
    expr = "breakwater:workers:max == 0 and on (model) breakwater:queue_depth:sum > 0"
    assert _selectors(expr) == ["breakwater:workers:max", "breakwater:queue_depth:sum"]
    expr = 'sum by (model) (increase(breakwater_dead_letters_total{model="a"}[10m])) > 0'
    assert _selectors(expr) == ['breakwater_dead_letters_total{model="a"}']
