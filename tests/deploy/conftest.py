"""Rendering the kustomize trees under deploy/ (kubectl's built-in kustomize, offline)."""

from __future__ import annotations

import functools
import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "tensor-parallel")
#: Every kustomization a user applies: the overlays, the autoscalers, the monitoring.
KUSTOMIZATIONS = (
    *(f"overlays/{name}" for name in OVERLAYS),
    "autoscaling/hpa",
    "autoscaling/keda",
    "monitoring",
)


@functools.cache
def render_text(tree: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / tree)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize deploy/{tree}:\n{result.stderr}"
    return result.stdout


def render(tree: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(render_text(tree)) if doc]


def only(documents: list[dict], kind: str) -> dict:
    matches = [doc for doc in documents if doc["kind"] == kind]
    assert len(matches) == 1, f"{len(matches)} {kind} objects"
    return matches[0]


DASHBOARD = DEPLOY / "monitoring" / "dashboard" / "attnserve.json"
RULES = DEPLOY / "monitoring" / "prometheusrule.yaml"
#: What Grafana puts in place of the dashboard's variables when every model is selected.
ALL_MODELS = {"$model": ".*", "$engine": ".*", "$__rate_interval": "5m"}


def dashboard_queries(variables: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the committed dashboard, variables substituted."""
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            queries.append((panel["title"], expr))
    return queries


def recording_rules() -> dict[str, str]:
    """Recording rule name -> expr (a name recorded several times, once per quantile: its first)."""
    groups = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    rules: dict[str, str] = {}
    for group in groups:
        for rule in group["rules"]:
            if "record" in rule:
                rules.setdefault(rule["record"], rule["expr"])
    return rules


def metric_names(expr: str) -> set[str]:
    """The attnserve series names (exported or recorded) an expression reads."""
    return set(re.findall(r"\battnserve[a-z0-9_:]*", expr))


def exported_sample_names(exposition: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}
