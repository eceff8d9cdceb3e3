"""The PrometheusRule's rules pass `promtool check rules`, and `promtool test rules` makes each
alert fire on the synthetic series that should page and stay quiet on those that should not."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import yaml

from .conftest import DEPLOY

TESTS = pathlib.Path(__file__).parent / "promtool" / "attnserve_alerts_test.yaml"
ALERTS = (
    "AttnserveReplicaNotReady",
    "AttnserveMetricsDown",
    "AttnserveTimeToFirstTokenHigh",
    "AttnserveQueueGrowing",
    "AttnserveKvCacheNearlyFull",
    "AttnserveRequestsFailing",
    "AttnserveAttentionSinkMassDrift",
)


def rule_groups() -> list[dict]:
    rule = yaml.safe_load((DEPLOY / "monitoring" / "prometheusrule.yaml").read_text())
    return rule["spec"]["groups"]


def promtool(*args: str, cwd: pathlib.Path) -> None:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (make tools)")
    result = subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_promtool_check(tmp_path):
    (tmp_path / "attnserve.rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    promtool("check", "rules", "attnserve.rules.yaml", cwd=tmp_path)


def test_every_alert_has_a_firing_and_a_quiet_case():
    alerts = [rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule]
    assert sorted(alerts) == sorted(ALERTS)
    cases = yaml.safe_load(TESTS.read_text())["tests"]
    for alert in ALERTS:
        checks = [
            check
            for case in cases
            for check in case.get("alert_rule_test", ())
            if check["alertname"] == alert
        ]
        assert any(check["exp_alerts"] for check in checks), f"{alert} never fires in a test"
        assert any(not check["exp_alerts"] for check in checks), f"{alert} never stays quiet in a test"


def test_alert_unit_tests_pass(tmp_path):
    groups = rule_groups()
    for group in groups:
        for rule in group["rules"]:
            rule.get("annotations", {}).pop("description", None)
    (tmp_path / "attnserve.rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    promtool("test", "rules", TESTS.name, cwd=tmp_path)
