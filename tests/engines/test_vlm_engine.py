"""The transformers engine serving tiny-llava: images through the vision tower at prefill, image
tokens in the prompt, and selectors over them resolved to the right key positions.

The reference is transformers' own LlavaForConditionalGeneration.generate() with the model's
processor (which expands the image tokens itself), on the same saved weights.
"""

from __future__ import annotations

import asyncio
import io

import pytest
import torch
from attnserve.api.inputs import to_engine_request, to_score_request
from attnserve.engines.hf.engine import TransformersEngine
from attnserve.models.config import Limits
from attnserve.models.registry import ServedModel
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import intervention_pb2 as ipb
from PIL import Image

QUESTIONS = ("what is in the image?", "describe the picture.")
COLOURS = ("red", "blue", "green")


def encoded(colour: str, fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", (48, 40), colour)
    image.paste((255, 255, 0), (8, 8, 20, 20))  # a square, so patches differ
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def chat(question: str, *colours: str) -> pb.Chat:
    parts = [pb.ContentPart(image=encoded(c)) for c in colours] + [pb.ContentPart(text=question)]
    return pb.Chat(messages=[pb.ChatMessage(role="user", parts=parts)])


def image_keys(*images: int, tokens=ipb.VISUAL_TOKENS_ALL) -> ipb.KeySelector:
    return ipb.KeySelector(image_tokens=ipb.ImageTokens(images=images, tokens=tokens))


@pytest.fixture(scope="module")
async def served(tiny_llava_path):
    engine = TransformersEngine(tiny_llava_path, max_batch_size=8)
    await engine.start()
    yield ServedModel("tiny-llava", "vlm", "transformers", engine, Limits(max_images=3), {})
    await engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llava_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_llava_path, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path, local_files_only=True).eval()

    @torch.inference_mode()
    def generate(question: str, colours, max_tokens: int) -> list[int]:
        content = [{"type": "image"} for _ in colours] + [{"type": "text", "text": question}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        images = [Image.open(io.BytesIO(encoded(c))).convert("RGB") for c in colours]
        inputs = processor(images=images, text=text, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    return generate


async def tokens(served, chat_: pb.Chat, interventions=(), max_tokens: int = 8) -> list[int]:
    request = pb.GenerateRequest(
        model=served.name,
        chat=chat_,
        sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        interventions=ipb.InterventionSpec(interventions=list(interventions)),
    )
    return [out.token_id async for out in served.engine.generate(to_engine_request(request, served))]


async def test_image_tokens_are_expanded_per_image(served):
    request = to_engine_request(pb.GenerateRequest(model=served.name, chat=chat("hi", "red", "blue")), served)
    vision = served.engine.info.vision
    assert vision.tokens_per_image == 64 and vision.grid_size == 8
    assert len(request.images) == 2 and len(request.image_spans) == 2
    for start, end in request.image_spans:
        assert end - start == 64
        assert set(request.prompt_token_ids[start:end]) == {vision.image_token_id}
    assert request.prompt_token_ids.count(vision.image_token_id) == 128


async def test_greedy_tokens_equal_transformers_generate_in_a_mixed_batch(served, reference):
    cases = [(q, cs) for q in QUESTIONS for cs in (("red",), ("blue",), ("green", "red"))]
    # Every case at once: they share prefill and decode batches (with text-only rows beside).
    text_only = pb.Chat(messages=[pb.ChatMessage(role="user", content="the cat sat on the mat")])
    results = await asyncio.gather(
        *(tokens(served, chat(q, *cs)) for q, cs in cases), tokens(served, text_only)
    )
    for (question, colours), got in zip(cases, results):
        assert got == reference(question, colours, 8), (question, colours)
    assert len({tuple(r) for r in results[:3]}) == 3  # the image changes the answer


async def test_masking_the_image_tokens_makes_the_answer_independent_of_the_image(served):
    mask = ipb.Intervention(selector=ipb.Selector(keys=image_keys()), key_mask=ipb.KeyMask())
    plain = [await tokens(served, chat(QUESTIONS[0], c)) for c in COLOURS]
    masked = [await tokens(served, chat(QUESTIONS[0], c), [mask]) for c in COLOURS]
    assert len({tuple(t) for t in plain}) == 3
    assert len({tuple(t) for t in masked}) == 1


async def test_image_k_selects_that_image_only(served):
    mask_first = ipb.Intervention(selector=ipb.Selector(keys=image_keys(0)), key_mask=ipb.KeyMask())
    # With image 0 masked, changing image 0 changes nothing, changing image 1 does.
    base = await tokens(served, chat(QUESTIONS[1], "red", "blue"), [mask_first])
    assert await tokens(served, chat(QUESTIONS[1], "green", "blue"), [mask_first]) == base
    assert await tokens(served, chat(QUESTIONS[1], "red", "green"), [mask_first]) != base


async def test_identity_settings_are_bit_identical(served):
    identity = ipb.Intervention(
        selector=ipb.Selector(keys=image_keys()), logit_rescale=ipb.LogitRescale(alpha=0.0)
    )
    emphasis = ipb.Intervention(
        selector=ipb.Selector(keys=image_keys()), key_emphasis=ipb.KeyEmphasis(alpha=1.0)
    )
    plain = await tokens(served, chat(QUESTIONS[0], "red"))
    assert await tokens(served, chat(QUESTIONS[0], "red"), [identity, emphasis]) == plain


async def test_score_with_an_image_matches_a_plain_forward(served, tiny_llava_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    request = pb.ScoreRequest(
        model=served.name, chat=chat(QUESTIONS[0], "red"), candidates=["yes", "the cat"]
    )
    score_request = to_score_request(request, served)
    scores = await served.engine.score(score_request)

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_path, local_files_only=True)
    pixels = processor.image_processor(images=list(score_request.images), return_tensors="pt")["pixel_values"]
    for candidate, score in zip(score_request.candidate_token_ids, scores):
        ids = torch.tensor([score_request.prompt_token_ids + candidate])
        with torch.inference_mode():
            logits = model(input_ids=ids, pixel_values=pixels).logits[0].log_softmax(-1)
        n = len(score_request.prompt_token_ids)
        expected = sum(float(logits[n - 1 + i, t]) for i, t in enumerate(candidate))
        assert score == pytest.approx(expected, abs=1e-4)


def paint_preset(alpha: float, beta: float):
    """PAINT as a preset: the authors' rescale on local and summary image tokens, the last
    query row, language model layers 2..N-1."""
    from attnserve.models.registry import preset_proto

    def rescale(part: str, value: float) -> dict:
        return {
            "layers": [2, 3],
            "queries": "last",
            "keys": {"image_tokens": {"tokens": part}},
            "logit_rescale": {"alpha": value},
        }

    return preset_proto("paint", "PAINT", [rescale("paint_local", alpha), rescale("paint_summary", beta)], {})


async def test_paint_with_the_authors_defaults_in_a_mixed_batch(served):
    import dataclasses

    painted = dataclasses.replace(served, presets={"paint": paint_preset(0.7, 0.3)})
    spec = ipb.InterventionSpec(presets=["paint"])

    async def run(model, question, colour, interventions=None):
        request = pb.GenerateRequest(
            model=model.name,
            chat=chat(question, colour),
            sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True),
            interventions=interventions,
        )
        return [out.token_id async for out in model.engine.generate(to_engine_request(request, model))]

    cases = [(q, c) for q in QUESTIONS for c in COLOURS]
    solo_plain = [await run(served, q, c) for q, c in cases]
    solo_painted = [await run(painted, q, c, spec) for q, c in cases]
    mixed = await asyncio.gather(
        *(run(served, q, c) for q, c in cases), *(run(painted, q, c, spec) for q, c in cases)
    )
    assert mixed[: len(cases)] == solo_plain  # plain rows beside painted ones are untouched
    assert mixed[len(cases) :] == solo_painted
    assert solo_painted != solo_plain


async def test_image_attention_maps_are_the_rows_image_columns(served):
    from attnserve.readouts import READOUTS
    from attnserve_client.v1 import readout_pb2 as rpb

    async def run(interventions=()):
        request = pb.GenerateRequest(
            model=served.name,
            chat=chat(QUESTIONS[0], "red", "blue"),
            sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True),
            interventions=ipb.InterventionSpec(interventions=list(interventions)),
            readouts=rpb.ReadoutSpec(
                image_attention=rpb.ImageAttentionSpec(layers=[1, 3], per_head=True),
                attention_rows=rpb.AttentionRowsSpec(layers=[1, 3], steps=[0, 1, 2]),
            ),
        )
        engine_request = to_engine_request(request, served)
        written = []
        async for out in served.engine.generate(engine_request):
            token = pb.GeneratedToken(index=out.index)
            for name, state in out.step_readouts.items():
                READOUTS[name].write_token(token, state)
            written.append(token)
        return engine_request.image_spans, written

    spans, written = await run()
    for token in written:
        rows = {(r.layer, r.head): r.weights for r in token.attention_rows}
        assert len(token.image_attention) == 2 * 2 * 2  # images x layers x heads
        for m in token.image_attention:
            start, end = spans[m.image]
            assert m.grid_size == 8 and m.step == token.index
            assert list(m.weights) == pytest.approx(list(rows[(m.layer, m.head)][start:end]), abs=1e-7)
            assert sum(m.weights) > 0
    # With the images' keys masked out, the maps read the final map: no attention on the images.
    mask = ipb.Intervention(selector=ipb.Selector(keys=image_keys()), key_mask=ipb.KeyMask())
    _, masked = await run([mask])
    assert all(max(m.weights) == 0 for token in masked for m in token.image_attention)


async def test_layer_statistics_report_the_image_mass(served):
    from attnserve.readouts import READOUTS, ResponseContext
    from attnserve_client.v1 import readout_pb2 as rpb

    async def statistics(interventions=(), mass_ranges=()):
        request = pb.GenerateRequest(
            model=served.name,
            chat=chat(QUESTIONS[0], "red", "blue"),
            sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True),
            interventions=ipb.InterventionSpec(interventions=list(interventions)),
            readouts=rpb.ReadoutSpec(layer_statistics=True, mass_ranges=list(mass_ranges)),
        )
        engine_request = to_engine_request(request, served)
        outs = [out async for out in served.engine.generate(engine_request)]
        complete = pb.GenerateComplete()
        (settings,) = engine_request.plan.readouts
        response = ResponseContext(engine_request.prompt_token_ids, served.engine.tokenizer)
        READOUTS["layer_statistics"].write_complete(
            complete, settings, outs[-1].readouts["layer_statistics"], response
        )
        return engine_request.image_spans, complete.layer_statistics

    spans, layers = await statistics()
    # The image mass is the mass on the image spans, as asked explicitly through mass_ranges, but
    # averaged over the query rows that see an image token (the rows before the first image
    # have none, and count 0 in range_mass's mean over every row).
    _, explicit = await statistics(mass_ranges=[ipb.TokenRange(start=s, end=e) for s, e in spans])
    first_image = spans[0][0]
    for plain, asked in zip(layers, explicit):
        assert plain.HasField("image_mass") and list(plain.range_mass) == []
        assert plain.image_query_count == plain.query_count - first_image
        assert 0 < plain.image_mass < 1 and 0 < plain.image_entropy <= 1
        seeing_share = plain.image_query_count / asked.query_count
        assert plain.image_mass * seeing_share == pytest.approx(sum(asked.range_mass), abs=1e-6)
        assert asked.image_mass == pytest.approx(plain.image_mass, abs=1e-6)
        assert asked.image_entropy == pytest.approx(plain.image_entropy, abs=1e-6)
    mask = ipb.Intervention(selector=ipb.Selector(keys=image_keys()), key_mask=ipb.KeyMask())
    _, masked = await statistics([mask])
    # Masked image keys keep only the image tokens' own keys (a query keeps its own key).
    assert all(m.image_mass < p.image_mass for m, p in zip(masked, layers))


async def test_scanpath_follows_the_mean_image_map(served):
    from attnserve.readouts import READOUTS, ResponseContext
    from attnserve_client.v1 import readout_pb2 as rpb

    request = pb.GenerateRequest(
        model=served.name,
        chat=chat(QUESTIONS[1], "green", "red"),
        sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True),
        readouts=rpb.ReadoutSpec(
            scanpath=rpb.ScanpathSpec(layers=[1, 2]), image_attention=rpb.ImageAttentionSpec(layers=[1, 2])
        ),
    )
    engine_request = to_engine_request(request, served)
    outs = [out async for out in served.engine.generate(engine_request)]
    complete = pb.GenerateComplete()
    settings = next(s for s in engine_request.plan.readouts if s.name == "scanpath")
    response = ResponseContext(engine_request.prompt_token_ids, served.engine.tokenizer)
    READOUTS["scanpath"].write_complete(complete, settings, outs[-1].readouts["scanpath"], response)
    assert [p.step for p in complete.scanpath] == [0, 1, 2, 3]
    for out, point in zip(outs, complete.scanpath):
        token = pb.GeneratedToken(index=out.index)
        READOUTS["image_attention"].write_token(token, out.step_readouts["image_attention"])
        best = max(
            ((m.image, k, w) for m in token.image_attention for k, w in enumerate(m.weights)),
            key=lambda x: x[2],
        )
        assert (point.image, point.row * 8 + point.column) == best[:2]
        assert point.weight == pytest.approx(best[2], abs=1e-6)
