"""The committed dashboard is what generate.py writes, ships as a sidecar ConfigMap, has the
rows and variables users look for, and every query is valid PromQL over series that the server
exports or the PrometheusRule records."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import grpc
import pytest
import yaml
from attnserve.metrics import ServerMetrics

from .conftest import (
    ALL_MODELS,
    DASHBOARD,
    dashboard_queries,
    exported_sample_names,
    metric_names,
    only,
    recording_rules,
    render,
)

ROWS = [
    "Traffic and latency",
    "Capacity",
    "Errors",
    "Interventions",
    "Attention statistics per layer",
]


def generator():
    spec = importlib.util.spec_from_file_location("generate_dashboard", DASHBOARD.parent / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def every_series_name() -> set[str]:
    """Each sample name a server exports once a model has served, been refused and sampled."""
    metrics = ServerMetrics(version="test")
    metrics.request_queued("m", "e")
    metrics.request_rejected("m", "e", grpc.StatusCode.INVALID_ARGUMENT)
    metrics.attention_statistics("m", "e", 0, sink_mass=0.5, normalized_entropy=0.5, hidden_sinks=1.0)
    return exported_sample_names(metrics.exposition().decode())


def test_committed_dashboard_is_fresh():
    assert generator().render() == DASHBOARD.read_text(), (
        "stale: run python deploy/monitoring/dashboard/generate.py"
    )


def test_dashboard_ships_as_a_sidecar_config_map():
    config_map = only(render("monitoring"), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {"attnserve.json": DASHBOARD.read_text()}


def test_rows_and_variables():
    board = json.loads(DASHBOARD.read_text())
    assert [panel["title"] for panel in board["panels"] if panel["type"] == "row"] == ROWS
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert {"datasource", "model", "engine"} <= variables.keys()
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            for target in panel["targets"]:
                assert 'model=~"$model"' in target["expr"] and 'engine=~"$engine"' in target["expr"]


def test_every_query_uses_exported_or_recorded_series():
    exported = every_series_name()
    recorded = recording_rules()
    for record, expr in recorded.items():
        unknown = {name for name in metric_names(expr) if name not in exported and name not in recorded}
        assert not unknown, f"recording rule {record} reads {unknown}, which the server does not export"
    for title, expr in dashboard_queries(ALL_MODELS):
        unknown = {name for name in metric_names(expr) if name not in exported and name not in recorded}
        assert not unknown, f"panel {title!r} reads {unknown}"


def test_every_query_is_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make tools)")
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expr}
        for index, (_, expr) in enumerate(dashboard_queries(ALL_MODELS))
    ]
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
