"""The PrometheusRule's groups pass `promtool check rules`, and every alert has a `promtool test
rules` unit test that fires it and one that keeps it quiet where it should be."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.k8s.render import prometheus_rules, tool

UNIT_TESTS = Path(__file__).with_name("breakwater-rules.test.yaml")


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _write_rules(tmp_path: Path, rules: dict[str, object]) -> None:
    (tmp_path / "breakwater.rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)


def test_promtool_check_rules(tmp_path: Path) -> None:
    _write_rules(tmp_path, prometheus_rules())
    out = _promtool("check", "rules", "breakwater.rules.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 25 rules found" in out.stdout


def test_promtool_unit_tests_cover_every_alert(tmp_path: Path) -> None:
    rules = prometheus_rules()
    _write_rules(tmp_path, rules)
    out = _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert alerts == tested and len(alerts) == 10


def test_unit_tests_fail_when_a_rule_changes(tmp_path: Path) -> None:
    """A control: with the queue threshold raised, the QueueGrowing test must fail."""
    rules = prometheus_rules()
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "BreakwaterQueueGrowing":
                rule["expr"] = rule["expr"].replace("> 50", "> 5000")
    _write_rules(tmp_path, rules)
    out = _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert out.returncode != 0 and "BreakwaterQueueGrowing" in out.stdout + out.stderr
