"""The Dockerfiles' commands, run outside Docker (no engine here): every ENTRYPOINT + CMD parses as
a Breakwater command, and every HEALTHCHECK passes against a live process and fails without one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from breakwater.redis_server import RedisServer, free_port
from tests.helpers import StackProcs
from tests.k8s.render import ROOT

DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("*Dockerfile"))


def _stages(path: Path) -> dict[str, dict[str, list[str]]]:
    """Per stage: its ENTRYPOINT, CMD and HEALTHCHECK CMD (exec form), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    stages: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        if m := re.match(r"FROM \S+(?: AS (\S+))?", line):
            current = stages.setdefault(m.group(1) or path.name, {})
        elif m := re.match(r"(ENTRYPOINT|CMD) (\[.*\])$", line):
            current[m.group(1)] = json.loads(m.group(2))
        elif m := re.match(r"HEALTHCHECK .*?CMD (\[.*\])$", line):
            current["HEALTHCHECK"] = json.loads(m.group(1))
    return {name: s for name, s in stages.items() if "ENTRYPOINT" in s}


def test_every_image_command_parses() -> None:
    images = {name: s for path in DOCKERFILES for name, s in _stages(path).items()}
    assert set(images) == {"gateway", "worker", "worker-vllm.Dockerfile"}
    for name, stage in images.items():
        assert stage["ENTRYPOINT"] == ["breakwater"], name
        assert "HEALTHCHECK" in stage, name
        out = subprocess.run(
            [sys.executable, "-m", "breakwater", *stage["CMD"], "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, (name, out.stderr[-1500:])


@pytest.mark.parametrize("image", ["gateway", "worker"])
def test_healthchecks_pass_on_a_live_process_and_fail_without(
    image: str, redis_server: RedisServer, log_dir: Path
) -> None:
    stage = _stages(ROOT / "deploy" / "docker" / "Dockerfile")[image]
    check = stage["HEALTHCHECK"]
    image_port = {"gateway": "8000", "worker": "9400"}[image]
    assert f"127.0.0.1:{image_port}/healthz" in check[-1]

    def command(port: int) -> list[str]:
        return [sys.executable, *check[1:-1], check[-1].replace(f":{image_port}/", f":{port}/")]

    assert (
        subprocess.run(command(free_port()), capture_output=True, timeout=30).returncode != 0
    )  # no listener
    procs = StackProcs(redis_server.url, f"d{free_port()}", log_dir)
    try:
        url = procs.add_gateway()
        port = int(url.rsplit(":", 1)[1])
        if image == "worker":
            port = free_port()
            procs.add_worker(metrics_port=port, heartbeat_s=0.5)
            procs.wait_workers(url)
        out = subprocess.run(command(port), capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    finally:
        procs.stop()
