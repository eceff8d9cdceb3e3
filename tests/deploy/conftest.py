"""Rendering the kustomize trees under deploy/ (kubectl's built-in kustomize, offline)."""

from __future__ import annotations

import functools
import pathlib
import shutil
import subprocess

import pytest
import yaml

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
