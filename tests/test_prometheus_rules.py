"""deploy/kubernetes/prometheusrule.yaml: Prometheus accepts its rules (`promtool check rules`) and each alert fires on
a series made for it, and not before (`promtool test rules`, tests/prometheus/camserve-rules.test.yaml). The image
test (make image-test) shows the same metric names in a Prometheus scraping the real container."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support import ROOT

RULE = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "camserve-rules.test.yaml"


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; make test installs it as root)")
    return found


@pytest.fixture
def rule_files(tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file, beside the tests that load it."""
    (rule,) = [document for document in yaml.safe_load_all(RULE.read_text()) if document]
    (tmp_path / "camserve-rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy2(RULE_TESTS, tmp_path / RULE_TESTS.name)
    return tmp_path


def test_promtool_accepts_the_rules(promtool: str, rule_files: Path) -> None:
    result = subprocess.run([promtool, "check", "rules", str(rule_files / "camserve-rules.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_every_alert_has_a_promtool_test(rule_files: Path) -> None:
    (rule,) = [document for document in yaml.safe_load_all(RULE.read_text()) if document]
    alerts = {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"] if not case["exp_alerts"]}
    assert alerts == tested == quiet, "each alert fires on its series and stays quiet before"


def test_promtool_unit_tests_pass(promtool: str, rule_files: Path) -> None:
    result = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=rule_files, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_catches_a_wrong_threshold(promtool: str, rule_files: Path) -> None:
    """The unit tests bite: the latency alert at 3 s instead of 2 s no longer fires on 2.5 s maps."""
    rules = yaml.safe_load((rule_files / "camserve-rules.yaml").read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule.get("alert") == "CamserveMapLatencyHigh":
            rule["expr"] = rule["expr"].replace("> 2000", "> 3000")
    (rule_files / "camserve-rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=rule_files, capture_output=True, text=True)
    assert result.returncode != 0
    assert "CamserveMapLatencyHigh" in result.stdout + result.stderr
