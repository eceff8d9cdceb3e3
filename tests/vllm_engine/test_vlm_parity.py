"""tiny-llava on the vLLM engine against the transformers engine: images through vLLM's own
multimodal processor and vision tower, image tokens on the same positions, and the same greedy
tokens for plain requests and under every operation on image-token keys, in one mixed batch;
image attention maps and Score's candidate log-probabilities equal to 1e-4. PAINT's tokens are chosen by a transformers copy of the
vision tower on vLLM and by the engine's hooked tower on transformers: the same tokens."""

from __future__ import annotations

import asyncio
import io

import pytest
import pytest_asyncio
from attnserve.api.inputs import to_engine_request, to_score_request
from attnserve.engines.hf.engine import TransformersEngine
from attnserve.engines.vllm.engine import VllmEngine
from attnserve.models.config import Limits, VllmSettings
from attnserve.models.registry import ServedModel
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import readout_pb2 as rpb
from PIL import Image

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_TOKENS = 6


def encoded(colour: str) -> bytes:
    image = Image.new("RGB", (48, 40), colour)
    image.paste((255, 255, 0), (8, 8, 20, 20))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


PROMPTS = [
    ("what is in the image?", ("red",)),
    ("describe the picture.", ("blue",)),
    ("which colour is the circle?", ("green", "red")),
]


def image_keys(*images: int) -> ipb.KeySelector:
    return ipb.KeySelector(image_tokens=ipb.ImageTokens(images=images))


def op(**kwargs) -> list[ipb.Intervention]:
    selector = kwargs.pop("selector", ipb.Selector(keys=image_keys()))
    return [ipb.Intervention(selector=selector, **kwargs)]


OPERATIONS = {
    "plain": [],
    "key_emphasis": op(key_emphasis=ipb.KeyEmphasis(alpha=0.05)),
    "logit_rescale": op(
        selector=ipb.Selector(layers=[2, 3], queries=ipb.QUERY_SCOPE_LAST, keys=image_keys(0)),
        logit_rescale=ipb.LogitRescale(alpha=3.0),
    ),
    "key_mask": op(key_mask=ipb.KeyMask()),
    "temperature": op(temperature=ipb.Temperature(temperature=0.3)),
    "head_output_scale": op(
        selector=ipb.Selector(layers=[1, 2], heads=[1]), head_output_scale=ipb.HeadOutputScale()
    ),
    "identity_blend": op(selector=ipb.Selector(layers=[1]), identity_blend=ipb.IdentityBlend(weight=0.7)),
    "sink_calibration": op(
        selector=ipb.Selector(layers=[1, 2]), sink_calibration=ipb.SinkCalibration(tau=0.05)
    ),
}
READOUTS = rpb.ReadoutSpec(image_attention=rpb.ImageAttentionSpec(layers=[1, 3], per_head=True))


def chat(question, colours) -> pb.Chat:
    parts = [pb.ContentPart(image=encoded(c)) for c in colours] + [pb.ContentPart(text=question)]
    return pb.Chat(messages=[pb.ChatMessage(role="user", parts=parts)])


def score_request(question, colours, interventions) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        model="tiny-llava",
        chat=chat(question, colours),
        candidates=["red", "a blue square"],
        interventions=ipb.InterventionSpec(interventions=interventions),
    )


def request(question, colours, interventions, readouts=None) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="tiny-llava",
        chat=chat(question, colours),
        sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
        interventions=ipb.InterventionSpec(interventions=interventions),
        readouts=readouts,
    )


async def run_all(engine) -> dict:
    """Every (operation, prompt) case and the readout cases, submitted together: one mixed batch."""
    served = ServedModel("tiny-llava", "vlm", "x", engine, Limits(), {})
    cases = [(name, i) for name in OPERATIONS for i in range(len(PROMPTS))]

    async def one(pb_request):
        outs = [out async for out in engine.generate(to_engine_request(pb_request, served))]
        return [o.token_id for o in outs], outs

    results = await asyncio.gather(
        *(one(request(*PROMPTS[i], OPERATIONS[name])) for name, i in cases),
        *(one(request(*prompt, [], READOUTS)) for prompt in PROMPTS),
    )
    scores = await asyncio.gather(
        *(
            engine.score(to_score_request(score_request(*PROMPTS[i], OPERATIONS[name]), served))
            for name, i in cases
        )
    )
    solo_plain = [await one(request(*prompt, [])) for prompt in PROMPTS]
    return {
        "cases": dict(zip(cases, (r[0] for r in results))),
        "scores": dict(zip(cases, scores)),
        "maps": [r[1] for r in results[len(cases) :]],
        "solo_plain": [r[0] for r in solo_plain],
        "served": served,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def transformers_run(tiny_llava_path) -> dict:
    engine = TransformersEngine(tiny_llava_path, max_batch_size=32)
    await engine.start()
    try:
        return await run_all(engine)
    finally:
        await engine.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vllm_run(tiny_llava_path, tmp_path_factory, transformers_run) -> dict:
    engine = VllmEngine(
        tiny_llava_path,
        max_batch_size=32,
        settings=VllmSettings(enforce_eager=True, kv_cache_gib=1, max_model_len=512),
        cache_dir=tmp_path_factory.mktemp("vllm-cache"),
        max_images=2,
    )
    await engine.start()
    try:
        yield await run_all(engine)
    finally:
        await engine.shutdown()


async def test_plain_and_every_operation_give_the_same_greedy_tokens(vllm_run, transformers_run):
    ours, theirs = vllm_run["cases"], transformers_run["cases"]
    assert ours.keys() == theirs.keys()
    mismatches = [case for case in ours if ours[case] != theirs[case]]
    assert mismatches == []
    for name in OPERATIONS:  # each operation acted on some prompt
        if name != "plain":
            assert any(ours[(name, i)] != ours[("plain", i)] for i in range(len(PROMPTS))), name


async def test_plain_rows_in_the_mixed_batch_equal_their_solo_run(vllm_run):
    assert [vllm_run["cases"][("plain", i)] for i in range(len(PROMPTS))] == vllm_run["solo_plain"]


async def test_image_maps_equal_across_engines(vllm_run, transformers_run):
    for ours, theirs in zip(vllm_run["maps"], transformers_run["maps"]):
        assert [o.token_id for o in ours] == [t.token_id for t in theirs]
        for o, t in zip(ours, theirs):
            a, b = o.step_readouts["image_attention"], t.step_readouts["image_attention"]
            assert a.maps.keys() == b.maps.keys() and a.maps
            for key in a.maps:
                assert a.maps[key] == pytest.approx(b.maps[key], abs=1e-4)


async def test_scores_equal_across_engines(vllm_run, transformers_run):
    ours, theirs = vllm_run["scores"], transformers_run["scores"]
    for case in ours:
        assert ours[case] == pytest.approx(theirs[case], abs=1e-4), case
    for name in OPERATIONS:  # each operation moved some score
        if name != "plain":
            assert any(
                abs(a - b) > 1e-4
                for i in range(len(PROMPTS))
                for a, b in zip(ours[(name, i)], ours[("plain", i)])
            ), name
