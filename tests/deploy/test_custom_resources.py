"""PodMonitor, PrometheusRule and ScaledObject validate against the vendored schemas
(tests/deploy/schemas/, hand-written from the CRDs' documented fields), and the autoscalers
and the scrape agree with each other and with what the server exports."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
import yaml
from attnserve.metrics import ServerMetrics

from .conftest import DEPLOY, only, render
from .test_manifests import dev_tool

SCHEMAS = pathlib.Path(__file__).parent / "schemas"
SCHEMA_OF = {
    "PodMonitor": "podmonitor-monitoring.coreos.com-v1.json",
    "PrometheusRule": "prometheusrule-monitoring.coreos.com-v1.json",
    "ScaledObject": "scaledobject-keda.sh-v1alpha1.json",
}
WAITING = "attnserve_scheduler_requests_waiting"


def exported_names() -> set[str]:
    metrics = ServerMetrics(version="test")
    metrics.request_queued("m", "e")
    return {
        line.split()[2] for line in metrics.exposition().decode().splitlines() if line.startswith("# TYPE")
    }


@pytest.mark.parametrize(
    ("tree", "kind"),
    [("monitoring", "PodMonitor"), ("monitoring", "PrometheusRule"), ("autoscaling/keda", "ScaledObject")],
)
def test_custom_resource_matches_its_schema(tree, kind, tmp_path):
    resource = only(render(tree), kind)
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(resource))
    result = subprocess.run(
        [dev_tool("check-jsonschema"), "--schemafile", str(SCHEMAS / SCHEMA_OF[kind]), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_podmonitor_scrapes_the_pods_metrics_port():
    monitor = only(render("monitoring"), "PodMonitor")
    deployment = only(render("overlays/cpu"), "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels[monitor["spec"]["jobLabel"]] == "attnserve"  # the alerts' job="attnserve"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    assert endpoint["port"] in {port["name"] for port in main["ports"]}


def test_hpa_and_keda_scale_the_deployment_on_waiting_requests():
    assert WAITING in exported_names()
    hpa = only(render("autoscaling/hpa"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "attnserve",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"

    adapter = yaml.safe_load((DEPLOY / "autoscaling" / "hpa" / "prometheus-adapter-rules.yaml").read_text())
    (rule,) = adapter["rules"]
    assert rule["seriesQuery"].startswith(WAITING + "{")
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}

    scaled = only(render("autoscaling/keda"), "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "attnserve"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert WAITING in trigger["metadata"]["query"]
    assert trigger["metadata"]["threshold"] == metric["pods"]["target"]["averageValue"]

    # Scale-down waits and goes one replica at a time, in both.
    keda_behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    for behavior in (hpa["spec"]["behavior"], keda_behavior):
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
        assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
