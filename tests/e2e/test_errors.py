"""Bad input gets INVALID_ARGUMENT (or NOT_FOUND) with the field named, and never reaches the model."""

from __future__ import annotations

import math

import grpc
import pytest
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import readout_pb2 as rpb

from .helpers import act, chat_request, field_violations, run


@pytest.fixture(scope="module")
def stub(server_target):
    with grpc.insecure_channel(server_target) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def _spec(*interventions, presets=()):
    return ipb.InterventionSpec(interventions=list(interventions), presets=list(presets))


BAD_REQUESTS = {
    "input": pb.GenerateRequest(model="smollm2"),
    "prompt": pb.GenerateRequest(model="smollm2", prompt="   "),
    "chat.messages": pb.GenerateRequest(model="smollm2", chat=pb.Chat()),
    "chat.messages[0].role": pb.GenerateRequest(
        model="smollm2", chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="hi")])
    ),
    "sampling.max_tokens": chat_request(max_tokens=100_000),
    "sampling.temperature": pb.GenerateRequest(
        model="smollm2", prompt="hi", sampling=pb.SamplingParams(temperature=math.nan)
    ),
    "sampling.top_p": pb.GenerateRequest(model="smollm2", prompt="hi", sampling=pb.SamplingParams(top_p=0)),
    "interventions.interventions[0].selector.layers[0]": chat_request(interventions=_spec(act([30]))),
    "interventions.interventions[0].selector.heads[0]": chat_request(
        interventions=_spec(
            ipb.Intervention(
                selector=ipb.Selector(layers=[1], heads=[9]), head_output_scale=ipb.HeadOutputScale(scale=0.5)
            )
        )
    ),
    "interventions.interventions[0].sink_calibration.beta": chat_request(
        interventions=_spec(act([3], beta=-0.1))
    ),
    "interventions.interventions[0].sink_calibration.tau": chat_request(
        interventions=_spec(act([3], tau=math.nan))
    ),
    "interventions.interventions[0].key_emphasis.alpha": chat_request(
        interventions=_spec(ipb.Intervention(key_emphasis=ipb.KeyEmphasis(alpha=-1)))
    ),
    "interventions.interventions[0].operation": chat_request(interventions=_spec(ipb.Intervention())),
    "interventions.interventions[0].selector.keys.ranges[0]": chat_request(
        interventions=_spec(
            ipb.Intervention(
                selector=ipb.Selector(keys=ipb.KeySelector(ranges=[ipb.TokenRange(start=3, end=10_000)])),
                key_mask=ipb.KeyMask(),
            )
        )
    ),
    "interventions.presets[0]": chat_request(interventions=_spec(presets=["no-such-preset"])),
    "interventions": chat_request(interventions=_spec(*[act([1])] * 17)),
    "readouts.attention_rows": chat_request(
        max_tokens=256,
        readouts=rpb.ReadoutSpec(
            attention_rows=rpb.AttentionRowsSpec(layers=list(range(30)), steps=list(range(200)))
        ),
    ),
    "readouts.attention_rows.layers[0]": chat_request(
        readouts=rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layers=[-1]))
    ),
}


@pytest.mark.parametrize("field", sorted(BAD_REQUESTS))
def test_field_violation_names_field(stub, field):
    with pytest.raises(grpc.RpcError) as info:
        run(stub, BAD_REQUESTS[field])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(info.value)
    assert field in violations, violations
    assert violations[field]


def test_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as info:
        run(stub, pb.GenerateRequest(model="gpt-17", prompt="hi"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(pb.GetModelRequest(name="gpt-17"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_still_serves_after_bad_requests(stub):
    _, complete = run(stub, chat_request(max_tokens=4))
    assert complete.usage.completion_tokens == 4 or complete.finish_reason == pb.FINISH_REASON_EOS
