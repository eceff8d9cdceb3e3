"""Client and AsyncClient over real gRPC against the fake service."""

import grpc
import pytest
from attnserve_client import AsyncClient, AttnserveError, Client, Usage
from attnserve_client.v1 import inference_service_pb2 as service_pb2
from attnserve_client.v1 import intervention_pb2
from fake_inference_service import ANSWER, NUM_LAYERS, PROMPT_TOKENS

BAD_LAYER = {"interventions": [{"layers": [99], "sink_calibration": {}}]}


def test_models(fake_target):
    with Client(fake_target, timeout=10) as client:
        assert [m.name for m in client.list_models()] == ["smollm2"]
        assert client.get_model("smollm2").num_layers == NUM_LAYERS
        with pytest.raises(AttnserveError) as raised:
            client.get_model("nope")
    assert raised.value.code is grpc.StatusCode.NOT_FOUND
    assert "'nope' is not served" in str(raised.value)


def test_generate_streams_tokens_then_complete(fake_target, fake_service):
    with Client(fake_target, timeout=10) as client:
        events = list(
            client.generate(
                "smollm2",
                messages=[("system", "Be brief."), {"role": "user", "content": "Capital of France?"}],
                max_tokens=16,
                temperature=0.0,
                stop=["\n"],
                presets=["act"],
                interventions=[intervention_pb2.Intervention(key_mask=intervention_pb2.KeyMask())],
                request_id="r1",
            )
        )
    assert [e.WhichOneof("event") for e in events] == ["token"] * len(ANSWER) + ["complete"]
    assert "".join(e.token.text for e in events[:-1]) == events[-1].complete.text

    request = fake_service.requests[-1]
    assert [(m.role, m.content) for m in request.chat.messages] == [
        ("system", "Be brief."),
        ("user", "Capital of France?"),
    ]
    assert request.sampling.max_tokens == 16 and request.sampling.HasField("temperature")
    assert not request.sampling.HasField("top_p")
    assert list(request.interventions.presets) == ["act"]
    assert request.request_id == "r1"


def test_complete_collects_readouts(fake_target):
    with Client(fake_target) as client:
        result = client.complete(
            "smollm2",
            prompt="The capital of France is",
            readouts={
                "layer_statistics": True,
                "summary": True,
                "attention_rows": {"layers": [5], "heads": [0, 1]},
            },
        )
    assert result.text == "".join(ANSWER)
    assert result.token_ids == [100 + i for i in range(len(ANSWER))]
    assert result.finish_reason == "eos"
    assert result.usage == Usage(PROMPT_TOKENS, len(ANSWER))
    assert len(result.layer_statistics) == NUM_LAYERS
    assert "France" in result.summary.text
    assert [(r.layer, r.head, r.step) for r in result.attention_rows] == [(5, 0, 0), (5, 1, 0)]


def test_generate_needs_exactly_one_input(fake_target):
    with Client(fake_target) as client, pytest.raises(ValueError, match="exactly one"):
        client.generate("smollm2")


def test_invalid_request_carries_field_violations(fake_target):
    with Client(fake_target) as client, pytest.raises(AttnserveError) as raised:
        client.complete("smollm2", prompt="hi", interventions=BAD_LAYER)
    error = raised.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations] == ["interventions.interventions[0].selector.layers[0]"]
    assert "selector.layers[0]: layer 99 is out of range" in str(error)


def test_leaving_the_stream_early(fake_target):
    with Client(fake_target) as client:
        stream = client.generate("smollm2", prompt="hi")
        first = next(stream)
        stream.close()
        assert first.token.index == 0
        assert client.get_model("smollm2").name == "smollm2"  # the channel is still usable


def test_unreachable_server():
    with Client("127.0.0.1:1", timeout=5) as client, pytest.raises(AttnserveError) as raised:
        client.list_models()
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE


async def test_async_client(fake_target):
    async with AsyncClient(fake_target, timeout=10) as client:
        assert [m.name for m in await client.list_models()] == ["smollm2"]
        assert (await client.get_model("smollm2")).num_layers == NUM_LAYERS
        events = [e async for e in client.generate("smollm2", prompt="hi", max_tokens=4)]
        result = await client.complete("smollm2", messages=[("user", "hi")], readouts={"summary": True})
    assert isinstance(events[-1], service_pb2.GenerateResponse) and events[-1].HasField("complete")
    assert result.text == "".join(ANSWER)
    assert result.summary is not None


async def test_async_errors(fake_target):
    async with AsyncClient(fake_target) as client:
        with pytest.raises(AttnserveError) as raised:
            await client.complete("smollm2", prompt="hi", interventions=BAD_LAYER)
        assert "selector.layers[0]" in str(raised.value)
        with pytest.raises(AttnserveError) as raised:
            await client.get_model("nope")
        assert raised.value.code is grpc.StatusCode.NOT_FOUND


def test_score_sends_candidates_and_presets(fake_target, fake_service):
    with Client(fake_target, timeout=10) as client:
        response = client.score(
            "smollm2", ["yes", "no way"], prompt="Is it?", presets=["act"], request_id="s1"
        )
    assert [(s.candidate, s.logprob, s.num_tokens) for s in response.scores] == [
        ("yes", pytest.approx(-0.3), 1),
        ("no way", pytest.approx(-0.6), 2),
    ]
    request = fake_service.requests[-1]
    assert isinstance(request, service_pb2.ScoreRequest)
    assert request.prompt == "Is it?" and list(request.interventions.presets) == ["act"]
    assert request.request_id == "s1"


async def test_async_score_with_chat(fake_target, fake_service):
    async with AsyncClient(fake_target, timeout=10) as client:
        response = await client.score(
            "smollm2", ["a", "b"], messages=[("user", "Pick one.")], interventions=BAD_LAYER
        )
    assert [s.candidate for s in response.scores] == ["a", "b"]
    request = fake_service.requests[-1]
    assert [(m.role, m.content) for m in request.chat.messages] == [("user", "Pick one.")]
    assert request.interventions.interventions[0].selector.layers == [99]
    with pytest.raises(ValueError, match="exactly one of prompt"):
        Client(fake_target).score("smollm2", ["a"])
    with pytest.raises(TypeError, match="not one string"):
        Client(fake_target).score("smollm2", "ab", prompt="x")
