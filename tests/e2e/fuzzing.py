"""Requests a careless or hostile client sends, as hypothesis strategies, and the rule every
answer must follow. Shared by the CI fuzz test (tests/e2e/test_fuzz.py) and the long run
(bench/fuzz.py).

The rule: a request gets OK, or INVALID_ARGUMENT naming its fields (a BadRequest; bytes that
do not parse: an ErrorInfo), or one of the refusals a valid request may get (NOT_FOUND,
FAILED_PRECONDITION, RESOURCE_EXHAUSTED); never INTERNAL, UNKNOWN or a dropped connection.
Generation is kept short (max_tokens mostly 1 or 2) so that thousands of requests stay cheap.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Self

import grpc
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import readout_pb2 as rpb
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import strategies as st

MODEL = "smollm2"
ACCEPTED_REFUSALS = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Every float32 edge: 0, -0, the smallest subnormal, the largest finite, inf, NaN.
_FLOAT_EDGES = [0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan")]
floats = st.one_of(
    st.sampled_from(_FLOAT_EDGES),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1.0, width=32),  # mostly valid settings
)
ints32 = st.one_of(
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]), st.integers(min_value=-(2**31), max_value=2**31 - 1)
)
small_ints = st.one_of(st.integers(min_value=-2, max_value=40), ints32)
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "Hi!", "What is the capital of France?", "\x00", "🙂" * 30]),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "🙂"]), st.integers(0, 20_000)),
)
# Mostly the served model, so that most requests get as far as its checks and many reach it.
names = st.one_of(st.just(MODEL), st.just(MODEL), st.just(MODEL), texts)


def few(strategy, max_size: int):
    """Often nothing, otherwise up to max_size of strategy."""
    return st.one_of(st.just([]), st.just([]), st.lists(strategy, max_size=max_size))


@st.composite
def token_ranges(draw) -> ipb.TokenRange:
    return ipb.TokenRange(start=draw(small_ints), end=draw(small_ints))


@st.composite
def selectors(draw) -> ipb.Selector:
    return ipb.Selector(
        layers=draw(st.lists(small_ints, max_size=40)),
        heads=draw(st.lists(small_ints, max_size=12)),
        layer_names=draw(st.lists(st.one_of(texts, st.just("model.layers.1*")), max_size=20)),
        attention=draw(st.integers(0, 4)),
        queries=draw(st.integers(0, 3)),
        **(
            {
                "keys": ipb.KeySelector(
                    ranges=draw(st.lists(token_ranges(), max_size=4)), invert=draw(st.booleans())
                )
            }
            if draw(st.booleans())
            else {}
        ),
        **(
            {"steps": ipb.StepRange(start=draw(small_ints), end=draw(small_ints))}
            if draw(st.booleans())
            else {}
        ),
    )


_OPERATIONS = {
    "sink_calibration": lambda d: ipb.SinkCalibration(
        tau=d(floats), beta=d(floats), min_queries=d(small_ints)
    ),
    "key_emphasis": lambda d: ipb.KeyEmphasis(alpha=d(floats)),
    "logit_rescale": lambda d: ipb.LogitRescale(alpha=d(floats)),
    "head_output_scale": lambda d: ipb.HeadOutputScale(scale=d(floats)),
    "identity_blend": lambda d: ipb.IdentityBlend(weight=d(floats)),
    "temperature": lambda d: ipb.Temperature(temperature=d(floats)),
    "key_mask": lambda d: ipb.KeyMask(),
}


@st.composite
def interventions(draw) -> ipb.Intervention:
    operation = draw(st.sampled_from([None, *_OPERATIONS]))
    fields = {} if operation is None else {operation: _OPERATIONS[operation](draw)}
    return ipb.Intervention(selector=draw(selectors()), **fields)


@st.composite
def readout_specs(draw) -> rpb.ReadoutSpec:
    spec = rpb.ReadoutSpec(
        layer_statistics=draw(st.booleans()),
        mass_ranges=draw(st.lists(token_ranges(), max_size=3)),
        summary=draw(st.booleans()),
    )
    if draw(st.booleans()):
        spec.attention_rows.CopyFrom(
            rpb.AttentionRowsSpec(
                layers=draw(st.lists(small_ints, max_size=30)),
                heads=draw(st.lists(small_ints, max_size=10)),
                steps=draw(st.lists(small_ints, max_size=10)),
            )
        )
    return spec


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    params = pb.SamplingParams(
        max_tokens=draw(st.one_of(st.integers(1, 2), ints32)),
        stop=draw(few(texts, 10)),
        top_logprobs=draw(st.one_of(st.integers(0, 3), ints32)),
        ignore_eos=draw(st.booleans()),
    )
    for name in ("temperature", "top_p"):
        if draw(st.booleans()):
            setattr(params, name, draw(floats))
    if draw(st.booleans()):
        params.top_k = draw(ints32)
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**64 - 1))
    return params


@st.composite
def inputs(draw) -> dict:
    if draw(st.booleans()):
        return {"prompt": draw(st.one_of(st.just("What is the capital of France?"), texts))}
    messages = draw(
        st.lists(
            st.builds(
                pb.ChatMessage,
                role=st.one_of(st.sampled_from(["user", "system", "assistant"]), texts),
                content=texts,
            ),
            max_size=6,
        )
    )
    return {"chat": pb.Chat(messages=messages)}


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=draw(names),
        sampling=draw(sampling_params()),
        interventions=ipb.InterventionSpec(
            presets=draw(few(st.one_of(texts, st.just("act-l5")), 4)),
            interventions=draw(few(interventions(), 4)),
        ),
        readouts=draw(st.one_of(st.just(rpb.ReadoutSpec()), readout_specs())),
        request_id=draw(texts),
        **draw(inputs()),
    )


@st.composite
def plausible_generate_requests(draw) -> pb.GenerateRequest:
    """Requests a careful client sends (SmolLM2: 30 layers of 9 heads): most are valid and run."""
    operation = draw(st.sampled_from(list(_OPERATIONS)))
    unit = st.floats(min_value=0.0625, max_value=0.9375, width=32)
    parameters = {
        "sink_calibration": lambda: ipb.SinkCalibration(tau=draw(unit), beta=draw(unit)),
        "key_emphasis": lambda: ipb.KeyEmphasis(alpha=draw(unit)),
        "logit_rescale": lambda: ipb.LogitRescale(alpha=draw(unit)),
        "head_output_scale": lambda: ipb.HeadOutputScale(scale=draw(unit)),
        "identity_blend": lambda: ipb.IdentityBlend(weight=draw(unit)),
        "temperature": lambda: ipb.Temperature(temperature=draw(unit) * 4),
        "key_mask": lambda: ipb.KeyMask(),
    }[operation]()
    layers = draw(st.lists(st.integers(0, 29), max_size=4))
    heads = draw(st.lists(st.integers(0, 8), max_size=3))
    intervention = ipb.Intervention(
        selector=ipb.Selector(layers=layers, heads=heads), **{operation: parameters}
    )
    return pb.GenerateRequest(
        model=MODEL,
        prompt=draw(st.sampled_from(["What is the capital of France?", "Hi!", "Write a haiku about rain."])),
        sampling=pb.SamplingParams(
            max_tokens=draw(st.integers(1, 3)), temperature=draw(st.sampled_from([0.0, 0.5, 1.0]))
        ),
        interventions=ipb.InterventionSpec(interventions=draw(few(st.just(intervention), 1))),
        readouts=rpb.ReadoutSpec(layer_statistics=draw(st.booleans()), summary=draw(st.booleans())),
    )


@st.composite
def score_requests(draw) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        model=draw(names),
        candidates=draw(st.lists(texts, max_size=5)),
        interventions=ipb.InterventionSpec(interventions=draw(few(interventions(), 3))),
        request_id=draw(texts),
        **draw(inputs()),
    )


def _corrupted(data: bytes, draw) -> bytes:
    """data with bytes overwritten, cut short or made invalid UTF-8."""
    how = draw(st.sampled_from(["cut", "flip", "utf8", "garbage"]))
    if how == "cut" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if how == "utf8":
        return pb.GenerateRequest(model=MODEL).SerializeToString().replace(MODEL.encode(), b"smo\xffl")
    return draw(st.binary(max_size=200))


@dataclasses.dataclass(frozen=True)
class Call:
    """One fuzzed call: the method and either a message or raw bytes."""

    method: str
    message: object = None
    raw: bytes | None = None


@st.composite
def calls(draw) -> Call:
    kind = draw(
        st.sampled_from(["Generate", "Generate", "plausible", "plausible", "Score", "GetModel", "raw"])
    )
    if kind == "Generate":
        return Call("Generate", draw(generate_requests()))
    if kind == "plausible":
        return Call("Generate", draw(plausible_generate_requests()))
    if kind == "Score":
        return Call("Score", draw(score_requests()))
    if kind == "GetModel":
        return Call("GetModel", pb.GetModelRequest(name=draw(names)))
    method = draw(st.sampled_from(["Generate", "Score", "GetModel"]))
    message = draw(generate_requests()) if method == "Generate" else pb.GetModelRequest(name=MODEL)
    return Call(method, raw=_corrupted(message.SerializeToString(), draw))


_STREAMING = {"Generate"}


def send(channel: grpc.Channel, call: Call, timeout: float = 120) -> grpc.StatusCode:
    """Make the call; its status code (OK when it succeeded). Asserts the error rule."""
    path = f"/attnserve.v1.InferenceService/{call.method}"
    serializer = None if call.raw is not None else type(call.message).SerializeToString
    stub = (channel.unary_stream if call.method in _STREAMING else channel.unary_unary)(
        path, request_serializer=serializer
    )
    payload = call.raw if call.raw is not None else call.message
    try:
        result = stub(payload, timeout=timeout)
        if call.method in _STREAMING:
            for _ in result:
                pass
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        check_error(error)
        return error.code()


def check_error(error: grpc.RpcError) -> None:
    code = error.code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT or code in ACCEPTED_REFUSALS, (code, error.details())
    if code != grpc.StatusCode.INVALID_ARGUMENT:
        return
    status = rpc_status.from_call(error)
    assert status is not None, "INVALID_ARGUMENT without google.rpc details"
    kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
    if "google.rpc.BadRequest" in kinds:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                assert bad.field_violations and all(v.field for v in bad.field_violations), bad
    else:
        assert "google.rpc.ErrorInfo" in kinds, kinds


def greedy_tokens(channel: grpc.Channel) -> list[int]:
    """The known prompt's greedy tokens: the same before, beside and after the fuzzed calls."""
    request = pb.GenerateRequest(
        model=MODEL,
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="What is the capital of France?")]),
        sampling=pb.SamplingParams(max_tokens=24),
    )
    stream = channel.unary_stream(
        "/attnserve.v1.InferenceService/Generate",
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )(request, timeout=300)
    return [response.token.token_id for response in stream if response.HasField("token")]


class StreamsBeside:
    """The known prompt's greedy stream, run again and again in a thread for as long as the
    context lasts (so it always shares the batch with the fuzzed calls); counts the runs whose
    tokens differ from `expected`."""

    def __init__(self, channel: grpc.Channel, expected: list[int]):
        self._channel = channel
        self._expected = expected
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.runs = 0
        self.mismatches = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            tokens = greedy_tokens(self._channel)
            self.runs += 1
            self.mismatches += tokens != self._expected

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=300)


class Tally:
    """Status codes seen, for reports."""

    def __init__(self) -> None:
        self.codes: collections.Counter[str] = collections.Counter()

    def add(self, code: grpc.StatusCode) -> None:
        self.codes[code.name] += 1

    @property
    def total(self) -> int:
        return sum(self.codes.values())
