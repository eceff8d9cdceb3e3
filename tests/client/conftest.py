"""An in-process fake InferenceService on a local port."""

from concurrent import futures

import grpc
import pytest
from attnserve_client.v1 import inference_service_pb2_grpc as service_grpc
from fake_inference_service import FakeInferenceService


@pytest.fixture(scope="session")
def fake_service() -> FakeInferenceService:
    return FakeInferenceService()


@pytest.fixture(scope="session")
def fake_target(fake_service):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_grpc.add_InferenceServiceServicer_to_server(fake_service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)
