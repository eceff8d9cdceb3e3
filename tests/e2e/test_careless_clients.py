"""What a careless client sends: numbers at the edges of float32, long strings and lists, bytes
that do not parse. Each gets the server's own status with the field named, in trailers a default
grpcio client accepts, and the server goes on serving."""

from __future__ import annotations

import grpc
import pytest
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2 as ipb
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from .helpers import QUESTION, chat_request, field_violations, run
from .test_metrics_live import sample, scrape

FLOAT_MAX = 3.4e38
TINY = 1e-45  # the smallest float32 above 0


@pytest.fixture(scope="module")
def channel(server_target):
    with grpc.insecure_channel(server_target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.InferenceServiceStub(channel)


def _on_layers(**operation) -> ipb.InterventionSpec:
    return ipb.InterventionSpec(
        interventions=[ipb.Intervention(selector=ipb.Selector(layers=[3]), **operation)]
    )


def _sampled(temperature: float) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="smollm2", prompt="hi", sampling=pb.SamplingParams(temperature=temperature, max_tokens=4)
    )


OP = "interventions.interventions[0]"
EXTREME_NUMBERS = [
    ("sampling.temperature", _sampled(TINY)),
    ("sampling.temperature", _sampled(1e-38)),
    ("sampling.temperature", _sampled(FLOAT_MAX)),
    (
        "sampling.top_p",
        pb.GenerateRequest(model="smollm2", prompt="hi", sampling=pb.SamplingParams(top_p=-TINY)),
    ),
    (
        f"{OP}.head_output_scale.scale",
        chat_request(interventions=_on_layers(head_output_scale={"scale": FLOAT_MAX})),
    ),
    (f"{OP}.logit_rescale.alpha", chat_request(interventions=_on_layers(logit_rescale={"alpha": FLOAT_MAX}))),
    (
        f"{OP}.temperature.temperature",
        chat_request(interventions=_on_layers(temperature={"temperature": TINY})),
    ),
    (f"{OP}.key_emphasis.alpha", chat_request(interventions=_on_layers(key_emphasis={"alpha": TINY}))),
    (f"{OP}.key_emphasis.alpha", chat_request(interventions=_on_layers(key_emphasis={"alpha": FLOAT_MAX}))),
]


@pytest.mark.parametrize(("field", "request_"), EXTREME_NUMBERS, ids=[f for f, _ in EXTREME_NUMBERS])
def test_numbers_that_would_overflow_are_refused(stub, field, request_):
    with pytest.raises(grpc.RpcError) as info:
        run(stub, request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be" in field_violations(info.value)[field]


def test_the_ranges_are_listed_in_get_model(stub):
    ranges = {r.field: r for r in stub.GetModel(pb.GetModelRequest(name="smollm2")).model.parameter_ranges}
    temperature = ranges["sampling.temperature"]
    assert (temperature.min, temperature.max, temperature.zero_allowed) == (0.01, 100.0, True)
    assert ranges["head_output_scale.scale"].max == 100.0
    assert ranges["sink_calibration.tau"].min_exclusive and ranges["sink_calibration.tau"].max_exclusive


def _many_bad_layers() -> pb.GenerateRequest:
    return chat_request(
        interventions=ipb.InterventionSpec(
            interventions=[
                ipb.Intervention(selector=ipb.Selector(layers=[1000 + i for i in range(50)]), key_mask={})
            ]
        )
    )


HUGE_ERRORS = {
    "model name of 3,000 characters": pb.GenerateRequest(model="m" * 3000, prompt="hi"),
    "50 bad layers": _many_bad_layers(),
    "unknown preset names of 2,000 characters": chat_request(
        interventions=ipb.InterventionSpec(presets=[f"{i}" + "é" * 2000 for i in range(40)])
    ),
    "long stop strings": pb.GenerateRequest(
        model="smollm2", prompt="hi", sampling=pb.SamplingParams(stop=["x" * 5000] * 200)
    ),
    "many bad chat roles": pb.GenerateRequest(
        model="smollm2",
        chat=pb.Chat(messages=[pb.ChatMessage(role="r" * 500, content="hi") for _ in range(500)]),
    ),
}


@pytest.mark.parametrize("name", sorted(HUGE_ERRORS))
def test_error_details_fit_a_default_clients_metadata_limit(stub, name):
    with pytest.raises(grpc.RpcError) as info:
        run(stub, HUGE_ERRORS[name])
    error = info.value
    # The server's own status: a trailer over the client's limit would be RESOURCE_EXHAUSTED.
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), error.details()
    trailer_bytes = len(error.details().encode()) + sum(
        len(key) + len(value) for key, value in error.trailing_metadata()
    )
    assert trailer_bytes < 6 * 1024
    status = rpc_status.from_call(error)
    assert status is not None and status.details
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            assert 1 <= len(bad.field_violations) <= 8


def test_many_violations_say_how_many_were_left_out(stub):
    with pytest.raises(grpc.RpcError) as info:
        run(stub, _many_bad_layers())
    assert "and 47 more invalid field(s)" in info.value.details()
    (info_detail,) = [
        d for d in rpc_status.from_call(info.value).details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
    ]
    error_info = error_details_pb2.ErrorInfo()
    info_detail.Unpack(error_info)
    assert error_info.metadata["violations"] == "50"


def _raw(channel, method: str, streaming: bool):
    path = f"/attnserve.v1.InferenceService/{method}"
    return channel.unary_stream(path) if streaming else channel.unary_unary(path)


def _bad_utf8(message) -> bytes:
    data = message.SerializeToString()
    return data.replace(b"smollm2", b"smoll\xff\xfe")


UNDECODABLE = {
    "Generate with invalid UTF-8": ("Generate", True, _bad_utf8(chat_request())),
    "Generate truncated": ("Generate", True, chat_request().SerializeToString()[:7]),
    "Score with invalid UTF-8": (
        "Score",
        False,
        _bad_utf8(pb.ScoreRequest(model="smollm2", prompt="Is it good?", candidates=["yes"])),
    ),
    "GetModel with garbage": ("GetModel", False, b"\xff" * 64),
}


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_bytes_are_invalid_argument_with_one_quiet_log_line(channel, server_process, name):
    method, streaming, data = UNDECODABLE[name]
    log_path = server_process["log"]
    seen = len(log_path.read_text())
    with pytest.raises(grpc.RpcError) as info:
        call = _raw(channel, method, streaming)(data, timeout=30)
        list(call) if streaming else None
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid attnserve.v1." in info.value.details()
    new_log = log_path.read_text()[seen:]
    assert "Traceback" not in new_log
    assert sum("undecodable request" in line for line in new_log.splitlines()) == 1


def test_undecodable_health_check_is_invalid_argument(channel):
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    request = (
        health_pb2.HealthCheckRequest(service="attnserve").SerializeToString().replace(b"serve", b"\xff")
    )
    with pytest.raises(grpc.RpcError) as info:
        check(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rejections_are_counted_by_model(stub, metrics_url):
    before = sample(
        scrape(metrics_url), "attnserve_request_rejected_total", model="smollm2", code="INVALID_ARGUMENT"
    )
    with pytest.raises(grpc.RpcError):
        run(stub, _sampled(TINY))
    after = sample(
        scrape(metrics_url), "attnserve_request_rejected_total", model="smollm2", code="INVALID_ARGUMENT"
    )
    assert after == before + 1


def test_still_answers_a_known_prompt(stub):
    _, complete = run(stub, chat_request(QUESTION, max_tokens=12))
    assert "Paris" in complete.text
