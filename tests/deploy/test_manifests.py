"""The kustomize overlays render, pass Kubernetes' own schemas, and keep the server's contract:
gRPC probes on the right services, a grace period longer than the drain, a locked-down pod,
selectors that find the pods, GPUs that match the config's parallelism."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml
from attnserve.models.config import load_config

from .conftest import DEPLOY, KUSTOMIZATIONS, OVERLAYS, ROOT, only, render

SERVICE = "attnserve.v1.InferenceService"
#: Kinds of the Prometheus Operator and KEDA: checked against vendored schemas instead.
CUSTOM_KINDS = {"PodMonitor", "PrometheusRule", "ScaledObject"}


def dev_tool(name: str) -> str:
    search_path = os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ["PATH"]])
    binary = shutil.which(name, path=search_path)
    if binary is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return binary


def container(documents: list[dict]) -> dict:
    (main,) = only(documents, "Deployment")["spec"]["template"]["spec"]["containers"]
    return main


def served_config(documents: list[dict], tmp_path: pathlib.Path):
    config_map = only(documents, "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    return load_config(path)


@pytest.mark.parametrize("tree", KUSTOMIZATIONS)
def test_builtin_kinds_pass_kubernetes_strict_schemas(tree, tmp_path):
    documents = [doc for doc in render(tree) if doc["kind"] not in CUSTOM_KINDS]
    if not documents:
        pytest.skip(f"deploy/{tree} holds custom resources only")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(documents))
    result = subprocess.run(
        [dev_tool("kubernetes-validate"), "--strict", "--quiet", "-k", "1.30.0", str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_drain(overlay):
    main = container(render(f"overlays/{overlay}"))
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert f"--port={ports['grpc']}" in main["args"] and f"--metrics-port={ports['metrics']}" in main["args"]
    for probe in ("startupProbe", "readinessProbe"):
        assert main[probe]["grpc"] == {"port": ports["grpc"], "service": SERVICE}, probe
    assert main["livenessProbe"]["grpc"].get("service", "") == ""
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load needs minutes"

    (grace,) = [float(arg.split("=", 1)[1]) for arg in main["args"] if arg.startswith("--grace=")]
    pod = only(render(f"overlays/{overlay}"), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= grace + 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_locked_down_and_sized(overlay):
    documents = render(f"overlays/{overlay}")
    pod = only(documents, "Deployment")["spec"]["template"]["spec"]
    main = container(documents)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    for kind in ("cpu", "memory"):
        assert kind in main["resources"]["requests"] and kind in main["resources"]["limits"], kind
    # A read-only root: every path the server writes is a volume.
    mounts = {mount["mountPath"] for mount in main["volumeMounts"]}
    assert {"/tmp", "/var/cache/attnserve", "/etc/attnserve"} <= mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_find_the_pods(overlay):
    documents = render(f"overlays/{overlay}")
    deployment = only(documents, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        only(documents, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    services = [doc for doc in documents if doc["kind"] == "Service"]
    assert sorted(service["metadata"]["name"] for service in services) == ["attnserve", "attnserve-headless"]
    selectors += [service["spec"]["selector"] for service in services]
    for selector in selectors:
        assert selector and selector.items() <= pod_labels.items()
    port_names = {port["name"] for port in container(documents)["ports"]}
    assert {port["targetPort"] for service in services for port in service["spec"]["ports"]} <= port_names
    headless = next(service for service in services if service["metadata"]["name"] == "attnserve-headless")
    assert headless["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_is_a_valid_server_config(overlay, tmp_path):
    documents = render(f"overlays/{overlay}")
    config = served_config(documents, tmp_path)
    assert config.models
    volumes = only(documents, "Deployment")["spec"]["template"]["spec"]["volumes"]
    config_volume = next(volume for volume in volumes if volume["name"] == "config")
    assert config_volume["configMap"]["name"] == only(documents, "ConfigMap")["metadata"]["name"]


def test_cpu_overlay_serves_the_builtin_model_anywhere(tmp_path):
    documents = render("overlays/cpu")
    pod = only(documents, "Deployment")["spec"]["template"]["spec"]
    assert container(documents)["image"] == "attnserve:cpu"
    assert "nodeSelector" not in pod and "nvidia.com/gpu" not in container(documents)["resources"]["limits"]
    (model,) = served_config(documents, tmp_path).models.values()
    assert model.builtin == "smollm2-135m-instruct"


@pytest.mark.parametrize("overlay", ["gpu", "tensor-parallel"])
def test_gpu_overlays_request_the_gpus_the_config_uses(overlay, tmp_path):
    documents = render(f"overlays/{overlay}")
    pod = only(documents, "Deployment")["spec"]["template"]["spec"]
    main = container(documents)
    assert main["image"] == "attnserve:gpu"
    gpus = main["resources"]["limits"]["nvidia.com/gpu"]
    assert main["resources"]["requests"]["nvidia.com/gpu"] == gpus
    (model,) = served_config(documents, tmp_path).models.values()
    assert model.vllm.tensor_parallel_size == gpus
    assert model.device == "cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # The model comes from the shared claim, under the mount the config names.
    claim = only(documents, "PersistentVolumeClaim")["metadata"]["name"]
    cache = next(volume for volume in pod["volumes"] if volume["name"] == "model-cache")
    assert cache == {"name": "model-cache", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    assert str(model.path).startswith("/var/cache/attnserve/")


def test_tensor_parallel_replica_has_shared_memory():
    documents = render("overlays/tensor-parallel")
    pod = only(documents, "Deployment")["spec"]["template"]["spec"]
    shm = next(mount for mount in container(documents)["volumeMounts"] if mount["mountPath"] == "/dev/shm")
    volume = next(volume for volume in pod["volumes"] if volume["name"] == shm["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert container(documents)["resources"]["limits"]["nvidia.com/gpu"] > 1


def test_yamllint_deploy():
    result = subprocess.run(
        [
            dev_tool("yamllint"),
            "--strict",
            "-c",
            str(ROOT / ".yamllint.yaml"),
            str(DEPLOY),
            str(ROOT / "tests" / "deploy" / "promtool"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
