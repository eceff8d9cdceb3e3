"""Small helpers for end-to-end tests: raw stubs, so the tests do not depend on the client SDK."""

from __future__ import annotations

import grpc
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2 as ipb
from google.rpc import error_details_pb2
from grpc_status import rpc_status

QUESTION = "What is the capital of France?"


def chat_request(text: str = QUESTION, *, max_tokens: int = 16, **kwargs) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="smollm2",
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=text)]),
        sampling=pb.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, top_logprobs=kwargs.pop("top_logprobs", 0)
        ),
        **kwargs,
    )


def run(stub: pb_grpc.InferenceServiceStub, request: pb.GenerateRequest, timeout: float = 120):
    """(tokens, complete) of one streamed Generate."""
    tokens, complete = [], None
    for response in stub.Generate(request, timeout=timeout):
        if response.HasField("token"):
            tokens.append(response.token)
        else:
            complete = response.complete
    return tokens, complete


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    out = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def act(layers, tau=0.1, beta=0.4) -> ipb.Intervention:
    return ipb.Intervention(
        selector=ipb.Selector(layers=layers),
        sink_calibration=ipb.SinkCalibration(tau=tau, beta=beta),
    )
