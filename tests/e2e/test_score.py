"""Score over a real socket, on each engine: agrees with Generate's log-probabilities, applies
interventions, and refuses bad input with the field named."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2 as ipb

from .helpers import QUESTION, act, chat_request, field_violations, run

CHAT = pb.Chat(messages=[pb.ChatMessage(role="user", content=QUESTION)])


@pytest.fixture(scope="module")
def stub(server_target):
    with grpc.insecure_channel(server_target) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def test_score_agrees_with_generated_logprobs(stub):
    """The greedy answer's first two tokens, scored as one candidate, have the summed log-probability
    Generate reported for them."""
    tokens, _ = run(stub, chat_request(max_tokens=2))
    answer = "".join(t.text for t in tokens)
    response = stub.Score(
        pb.ScoreRequest(model="smollm2", chat=CHAT, candidates=[answer, " Lyon"]), timeout=60
    )
    first, other = response.scores
    assert (first.candidate, first.num_tokens) == (answer, 2)
    assert first.logprob == pytest.approx(sum(t.logprob for t in tokens), abs=1e-4)
    assert other.logprob < first.logprob
    assert response.usage.prompt_tokens > 0 and response.interventions_applied == 0


def test_score_applies_interventions(stub):
    plain = stub.Score(pb.ScoreRequest(model="smollm2", chat=CHAT, candidates=["Paris"]), timeout=60)
    edited = stub.Score(
        pb.ScoreRequest(
            model="smollm2",
            chat=CHAT,
            candidates=["Paris"],
            interventions=ipb.InterventionSpec(interventions=[act(list(range(2, 30)))]),
        ),
        timeout=60,
    )
    assert edited.interventions_applied == 1
    assert abs(edited.scores[0].logprob - plain.scores[0].logprob) > 1e-3


def test_score_between_decode_steps_changes_nothing(stub):
    """Score requests run between (transformers: on the scheduler thread) or beside (vLLM: in
    the same batches) the steps of a running generation: both give what they give alone."""
    score_request = pb.ScoreRequest(model="smollm2", chat=CHAT, candidates=["Paris", "Lyon"])
    solo_score = stub.Score(score_request, timeout=60)
    solo_tokens, solo_complete = run(stub, chat_request(max_tokens=12))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        generation = pool.submit(run, stub, chat_request(max_tokens=12))
        scores = [stub.Score(score_request, timeout=60) for _ in range(3)]
        tokens, complete = generation.result(timeout=120)
    assert complete.text == solo_complete.text
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in solo_tokens], abs=1e-4)
    for response in scores:
        assert [s.logprob for s in response.scores] == pytest.approx(
            [s.logprob for s in solo_score.scores], abs=1e-5
        )


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"chat": CHAT}, "candidates"),
        ({"chat": CHAT, "candidates": ["Paris", ""]}, "candidates[1]"),
        ({"candidates": ["Paris"]}, "input"),
        (
            {"chat": CHAT, "candidates": ["Paris"], "interventions": ipb.InterventionSpec(presets=["nope"])},
            "interventions.presets[0]",
        ),
        (
            {
                "chat": CHAT,
                "candidates": ["Paris"],
                "interventions": ipb.InterventionSpec(interventions=[act([30])]),
            },
            "interventions.interventions[0].selector.layers[0]",
        ),
    ],
)
def test_bad_score_requests_name_the_field(stub, request_fields, field):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Score(pb.ScoreRequest(model="smollm2", **request_fields), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)


def test_score_unknown_model(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Score(pb.ScoreRequest(model="nope", prompt="hi", candidates=["a"]), timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_get_model_lists_the_rpcs_its_engine_serves(stub):
    model = stub.GetModel(pb.GetModelRequest(name="smollm2")).model
    assert list(model.supported_rpcs) == ["Generate", "Score"]
    assert list(model.input_modalities) == ["text"]
