"""A real attnserve server in a subprocess, serving the real SmolLM2 on a real socket."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "attnserve.v1.InferenceService"
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def channel_to(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)


def wait_serving(
    target: str, timeout: float, service: str = SERVICE, credentials: grpc.ChannelCredentials | None = None
) -> None:
    deadline = time.monotonic() + timeout
    with channel_to(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{target} not SERVING after {timeout} s")


#: Every end-to-end test runs against a server on each engine.
ENGINES = {
    "transformers": {},
    # Eager mode starts in about 40 s instead of minutes; 1 GiB of KV cache fits the tests.
    "vllm": {"vllm": {"enforce_eager": True, "kv_cache_gib": 1}},
}


@pytest.fixture(scope="session", params=list(ENGINES))
def engine_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def server_config(tmp_path_factory, smollm2_path, engine_name):
    config = {
        "limits": {"max_tokens": 256, "max_batch_size": 16},
        "statistics": {"sample_rate": 0.25},
        "models": [
            {
                "name": "smollm2",
                "kind": "llm",
                "engine": engine_name,
                **ENGINES[engine_name],
                "path": str(smollm2_path),
                "presets": [
                    {
                        "name": "act-l5",
                        "description": "sink calibration on layer 5 (test preset)",
                        "interventions": [{"layers": [5], "sink_calibration": {"tau": 0.1, "beta": 0.4}}],
                        "provenance": {"source": "tests"},
                    }
                ],
            }
        ],
    }
    path = tmp_path_factory.mktemp(f"config-{engine_name}") / "attnserve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def running_server(
    config_path,
    log_path,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    env: dict | None = None,
    grace: float = 25.0,
) -> Iterator[dict]:
    """`attnserve serve` on config_path in a subprocess, SERVING on free ports; stopped on exit.

    credentials reach a TLS server; env adds environment variables; grace is the drain's."""
    port, metrics_port = _free_port(), _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "attnserve.cli",
                "serve",
                "--config",
                str(config_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                "--log-format",
                "text",
                "--grace",
                str(grace),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        target = f"127.0.0.1:{port}"
        try:
            wait_serving(target, START_TIMEOUT_S, credentials=credentials)
        except TimeoutError:
            proc.kill()
            raise RuntimeError(f"server did not start; log:\n{log_path.read_text()}") from None
        try:
            yield {
                "target": target,
                "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
                "log": log_path,
                "proc": proc,
            }
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def diffusion_server(folder, name: str, model_path, max_denoising_steps: int = 50) -> Iterator[dict]:
    """A server (running_server) serving one diffusion model on the diffusers engine, its config
    and log in folder."""
    config = {
        "limits": {"max_image_size": 256, "max_denoising_steps": max_denoising_steps},
        "models": [{"name": name, "kind": "diffusion", "engine": "diffusers", "path": str(model_path)}],
    }
    (folder / "attnserve.yaml").write_text(yaml.safe_dump(config))
    with running_server(folder / "attnserve.yaml", folder / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def server_process(server_config, tmp_path_factory):
    with running_server(server_config, tmp_path_factory.mktemp("logs") / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def server_target(server_process) -> str:
    return server_process["target"]


@pytest.fixture(scope="session")
def metrics_url(server_process) -> str:
    return server_process["metrics_url"]
