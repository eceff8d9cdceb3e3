"""Past the waiting limit a request gets RESOURCE_EXHAUSTED with RetryInfo at once, and every
request that was accepted completes."""

from __future__ import annotations

import concurrent.futures

import grpc
import yaml
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from .conftest import running_server
from .helpers import chat_request

STREAMS = 16
MAX_TOKENS = 8


def _generate(target: str) -> tuple[str, object]:
    """("ok", completion tokens) or ("refused", the RetryInfo delay in seconds)."""
    request = chat_request("Count from one to fifty.", max_tokens=MAX_TOKENS)
    request.sampling.ignore_eos = True
    with grpc.insecure_channel(target) as channel:
        try:
            responses = list(pb_grpc.InferenceServiceStub(channel).Generate(request, timeout=300))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            retry = error_details_pb2.RetryInfo()
            (detail,) = rpc_status.from_call(error).details
            assert detail.Unpack(retry)
            return "refused", retry.retry_delay.seconds
    return "ok", responses[-1].complete.usage.completion_tokens


def test_overload_refuses_with_retry_info_and_loses_no_accepted_request(smollm2_path, tmp_path):
    model = {"name": "smollm2", "kind": "llm", "engine": "transformers", "path": str(smollm2_path)}
    config = {"limits": {"max_batch_size": 2, "max_waiting_requests": 2}, "models": [model]}
    path = tmp_path / "attnserve.yaml"
    path.write_text(yaml.safe_dump(config))
    with (
        running_server(path, tmp_path / "server.log") as server,
        concurrent.futures.ThreadPoolExecutor(STREAMS) as pool,
    ):
        results = list(pool.map(_generate, [server["target"]] * STREAMS))
    outcomes = [outcome for outcome, _ in results]
    assert "refused" in outcomes and "ok" in outcomes, outcomes
    assert all(value == MAX_TOKENS for outcome, value in results if outcome == "ok")
    assert all(value >= 1 for outcome, value in results if outcome == "refused")
