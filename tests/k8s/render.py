"""Rendering and reading the Kubernetes manifests under deploy/k8s for the tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# Compositions docs/deploy.md tells GPU users to write: overlay + components.
COMPOSITIONS: dict[str, tuple[str, list[str]]] = {
    "gpu-vllm+keda": ("gpu-vllm", ["keda"]),
    "gpu-vllm+hpa+hpa-gpu": ("gpu-vllm", ["hpa", "hpa-gpu"]),
    "gpu-vllm-inprocess+keda+monitoring": ("gpu-vllm-inprocess", ["keda", "monitoring"]),
    "redis-cluster+keda+keda-redis-cluster": ("redis-cluster", ["keda", "keda-redis-cluster"]),
}
K8S_VENV = ROOT / ".venv-k8s" / "bin"
CRD_VALIDATOR = ROOT / "tests" / "k8s" / "crd" / "validate.mjs"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


def tool(name: str) -> str:
    """A required tool's path; the tests fail (not skip) without it: `make k8s-env` installs them."""
    local = K8S_VENV / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    assert found, f"{name} not found: run `make k8s-env` (and apt-get install prometheus)"
    return found


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def render_overlay(name: str) -> list[dict[str, Any]]:
    return kustomize(K8S / "overlays" / name)


def render_composition(name: str, workdir: Path) -> list[dict[str, Any]]:
    """Write the kustomization a GPU user would write and render it."""
    overlay, components = COMPOSITIONS[name]
    here = workdir / name.replace("+", "_")
    here.mkdir(parents=True, exist_ok=True)
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "breakwater",
        "resources": [_relative(K8S / "overlays" / overlay, here)],
        "components": [_relative(K8S / "components" / c, here) for c in components],
    }
    (here / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    return kustomize(here)


def _relative(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


def all_renders(workdir: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for name in OVERLAYS:
        yield name, render_overlay(name)
    for name in COMPOSITIONS:
        yield name, render_composition(name, workdir)


def validate_crds(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the CRD-schema validator (KEDA, Prometheus Operator) over ``objects``."""
    out = subprocess.run(
        [tool("node"), str(CRD_VALIDATOR)],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip(), f"CRD validator printed nothing: {out.stderr}"
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["returncode"] = out.returncode
    return result


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def prometheus_rules() -> dict[str, Any]:
    doc = yaml.safe_load((K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    return {"groups": doc["spec"]["groups"]}
