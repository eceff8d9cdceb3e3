"""Generate over a real socket with the real SmolLM2."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import model_pb2
from attnserve_client.v1 import readout_pb2 as rpb

from .helpers import QUESTION, act, chat_request, run


@pytest.fixture(scope="module")
def stub(server_target):
    with grpc.insecure_channel(server_target) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


ENGINE_KINDS = {"transformers": model_pb2.ENGINE_KIND_TRANSFORMERS, "vllm": model_pb2.ENGINE_KIND_VLLM}


def test_list_and_get_model(stub, engine_name):
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.name for m in models] == ["smollm2"]
    model = stub.GetModel(pb.GetModelRequest(name="smollm2")).model
    assert (model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim) == (30, 9, 3, 64)
    assert [layer.name for layer in model.layers] == [f"model.layers.{i}.self_attn" for i in range(30)]
    assert all(layer.kind == ipb.ATTENTION_KIND_SELF and layer.causal for layer in model.layers)
    assert model.kind == model_pb2.MODEL_KIND_LLM and model.engine == ENGINE_KINDS[engine_name]
    assert ipb.OPERATION_KIND_SINK_CALIBRATION in model.supported_operations
    assert [p.name for p in model.presets] == ["act-l5"]
    assert model.presets[0].interventions[0].selector.layers == [5]


def test_greedy_answer_contains_paris(stub):
    tokens, complete = run(stub, chat_request())
    assert "Paris" in complete.text
    assert complete.text == "".join(t.text for t in tokens)
    assert complete.usage.completion_tokens == len(tokens)
    assert complete.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
    assert [t.index for t in tokens] == list(range(len(tokens)))


def test_max_tokens_and_stop_strings(stub):
    tokens, complete = run(stub, chat_request(max_tokens=3))
    assert len(tokens) == 3 and complete.finish_reason == pb.FINISH_REASON_LENGTH
    request = chat_request()
    request.sampling.stop.append("Paris")
    _, complete = run(stub, request)
    assert complete.finish_reason == pb.FINISH_REASON_STOP_STRING
    assert "Paris" not in complete.text and complete.text.strip()


def test_sink_calibration_changes_logits(stub):
    plain, _ = run(stub, chat_request(max_tokens=4, top_logprobs=5))
    request = chat_request(
        max_tokens=4,
        top_logprobs=5,
        interventions=ipb.InterventionSpec(interventions=[act(list(range(2, 30)))]),
    )
    calibrated, complete = run(stub, request)
    assert complete.interventions_applied == 1
    plain_lp = [t.logprob for t in plain[0].top_logprobs]
    calibrated_lp = [t.logprob for t in calibrated[0].top_logprobs]
    assert max(abs(a - b) for a, b in zip(plain_lp, calibrated_lp)) > 1e-3


def test_identity_settings_equal_plain(stub):
    plain, _ = run(stub, chat_request(max_tokens=6, top_logprobs=3))
    identity = ipb.InterventionSpec(interventions=[act(list(range(30)), beta=1.0)])
    same, complete = run(stub, chat_request(max_tokens=6, top_logprobs=3, interventions=identity))
    assert complete.interventions_applied == 0
    assert [t.token_id for t in same] == [t.token_id for t in plain]
    assert [t.logprob for t in same] == [t.logprob for t in plain]


def test_preset_by_name(stub):
    spec = ipb.InterventionSpec(presets=["act-l5"])
    _, complete = run(stub, chat_request(max_tokens=4, interventions=spec))
    assert complete.interventions_applied == 1


def test_plain_request_in_intervened_batch_equals_solo(stub):
    """A request without a spec returns the same tokens alone and beside intervened requests."""
    plain = chat_request("Name three primary colours.", max_tokens=24)
    solo, _ = run(stub, plain)
    intervened = [
        chat_request(
            max_tokens=24, interventions=ipb.InterventionSpec(interventions=[act(list(range(2, 30)))])
        ),
        chat_request(
            "Write a haiku about rain.",
            max_tokens=24,
            interventions=ipb.InterventionSpec(
                interventions=[
                    ipb.Intervention(
                        selector=ipb.Selector(
                            keys=ipb.KeySelector(ranges=[ipb.TokenRange(start=0, end=5)], invert=True)
                        ),
                        key_emphasis=ipb.KeyEmphasis(alpha=0.01),
                    )
                ]
            ),
        ),
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(run, stub, r) for r in [*intervened, plain, *intervened]]
        results = [f.result() for f in futures]
    batched_tokens = results[2][0]
    assert [t.token_id for t in batched_tokens] == [t.token_id for t in solo]


def test_readouts(stub):
    readouts = rpb.ReadoutSpec(
        layer_statistics=True,
        mass_ranges=[ipb.TokenRange(start=0, end=1)],
        attention_rows=rpb.AttentionRowsSpec(layers=[3, 7], heads=[0, 4], steps=[0, 2]),
        summary=True,
    )
    tokens, complete = run(stub, chat_request(max_tokens=8, readouts=readouts))
    stats = complete.layer_statistics
    assert [s.layer for s in stats] == list(range(30))
    for s in stats:
        assert 0 < s.normalized_entropy <= 1 and 0 <= s.sink_mass <= s.sink_mass_first4 <= 1 + 1e-5
        assert s.range_mass[0] == pytest.approx(s.sink_mass, abs=1e-5)
        assert s.query_count > 0
    rows = [(r.layer, r.head, r.step) for t in tokens for r in t.attention_rows]
    assert sorted(rows) == sorted((l, h, s) for l in (3, 7) for h in (0, 4) for s in (0, 2))
    for t in tokens:
        for r in t.attention_rows:
            assert r.step == t.index and len(r.weights) == r.query_position + 1
            assert sum(r.weights) == pytest.approx(1.0, abs=1e-4)
    assert complete.summary.spans and "attended most to" in complete.summary.text
    # The key axis's labels: the prompt's tokens, one text each, the chat template's among them.
    assert len(complete.prompt_token_texts) == complete.usage.prompt_tokens
    assert "".join(complete.prompt_token_texts).count(QUESTION) == 1
