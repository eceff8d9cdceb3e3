"""Drain on SIGTERM, under load: health NOT_SERVING at once, new calls UNAVAILABLE, the streams in
flight finish, and the process exits 0."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import yaml
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import SERVICE, running_server
from .helpers import chat_request

STREAMS = 4
MAX_TOKENS = 16
#: Long enough for the streams to finish on a loaded 2-core machine.
GRACE_SECONDS = 180


def _stream(target: str, started: concurrent.futures.Future | None) -> list:
    request = chat_request("Count from one to fifty.", max_tokens=MAX_TOKENS)
    request.sampling.ignore_eos = True
    with grpc.insecure_channel(target) as channel:
        responses = []
        for response in pb_grpc.InferenceServiceStub(channel).Generate(request, timeout=GRACE_SECONDS):
            responses.append(response)
            if started is not None and not started.done():
                started.set_result(True)
        return responses


def test_sigterm_drains_in_flight_streams(smollm2_path, tmp_path):
    config = {
        "models": [{"name": "smollm2", "kind": "llm", "engine": "transformers", "path": str(smollm2_path)}]
    }
    path = tmp_path / "attnserve.yaml"
    path.write_text(yaml.safe_dump(config))
    with (
        running_server(path, tmp_path / "server.log", grace=GRACE_SECONDS) as server,
        concurrent.futures.ThreadPoolExecutor(STREAMS) as pool,
    ):
        target, proc = server["target"], server["proc"]
        started = [concurrent.futures.Future() for _ in range(STREAMS)]
        streams = [pool.submit(_stream, target, s) for s in started]
        concurrent.futures.wait(started, timeout=120)
        proc.send_signal(signal.SIGTERM)

        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while True:  # the signal is handled between two engine steps
                status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
                refused = None
            except grpc.RpcError as err:
                refused = err.code()
            assert refused == grpc.StatusCode.UNAVAILABLE

        for stream in streams:
            responses = stream.result(timeout=GRACE_SECONDS)
            assert responses[-1].HasField("complete")
            assert responses[-1].complete.usage.completion_tokens == MAX_TOKENS
        assert proc.wait(timeout=GRACE_SECONDS) == 0
