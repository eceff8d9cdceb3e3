"""HeadHunter on the tiny Stable-Diffusion pipeline: head sets scored through the diffusers
engine's batched requests equal each request generated alone, the greedy choice recomputed from
those single images agrees, and the clip-score objective equals CLIP's formula computed by hand."""

from __future__ import annotations

import asyncio
import dataclasses
import io

import numpy as np
import pytest
import torch
from attnserve.api.image_inputs import to_image_request
from attnserve.calibration.headhunter import headhunter
from attnserve.calibration.image_objectives import (
    ClipScore,
    ObjectiveError,
    load_objective,
    scores_of,
)
from attnserve.calibration.image_scorer import HeadSetScorer, ImageSettings
from attnserve.engines.base import GeneratedImages
from attnserve.engines.diffusers.engine import DiffusersEngine
from attnserve.models.config import Limits
from attnserve.models.registry import ServedModel
from PIL import Image

PROMPTS = ["a photo of a cat", "a red house on the moon"]
SETTINGS = ImageSettings(width=16, height=16, steps=2, guidance_scale=7.5, pag_scale=3.0, u=0.75, seed=4)
#: Heads of the self-attention layer of down_blocks.0 (a few, to keep the lone images few).
CANDIDATES = [(0, head) for head in range(4)]


@pytest.fixture(scope="module")
def served(tiny_sd_path):
    """(ServedModel on a started diffusers engine batching 8 requests, its event loop)."""
    loop = asyncio.new_event_loop()
    engine = DiffusersEngine(tiny_sd_path, max_batch_size=8)
    loop.run_until_complete(engine.start())
    yield ServedModel("tiny-sd", "diffusion", "diffusers", engine, Limits(), {}), loop
    loop.run_until_complete(engine.shutdown())
    loop.close()


#: A fixed random projection of the pixels: a score that depends on every pixel of the image.
_PROJECTION = np.random.default_rng(0).standard_normal((16, 16, 3))


def projection(images, prompts):
    return [float((np.asarray(image, dtype=np.float64) * _PROJECTION).mean()) for image in images]


def alone(served, request) -> Image.Image:
    """The image of one request that waits alone, so the engine denoises it alone."""
    model, loop = served

    async def generate():
        async for event in model.engine.generate_image(to_image_request(request, model, model.engine)):
            if isinstance(event, GeneratedImages):
                return Image.open(io.BytesIO(event.png[0])).convert("RGB")
        raise AssertionError("no images")

    return loop.run_until_complete(generate())


def test_batched_search_equals_head_sets_generated_alone(served, greedy_reference):
    model, loop = served
    seen = []

    def on_progress(description, progress):
        seen.append((description, dataclasses.astuple(progress)))

    scorer = HeadSetScorer(model, PROMPTS, SETTINGS, projection, loop, on_progress)
    result = headhunter(CANDIDATES, rounds=2, per_round=1, score=scorer)
    # Progress counts every image and head set of each call, up to its totals.
    final = {description: counts for description, counts in seen}
    assert list(final.values()) == [(2, 2, 1, 1), (8, 8, 4, 4), (6, 6, 3, 3), (2, 2, 1, 1)]
    assert len(seen) == sum(1 + images + sets for images, _, sets, _ in final.values())

    def alone_score(head_set) -> float:
        images = [alone(served, scorer.request(frozenset(head_set), i)) for i in range(len(PROMPTS))]
        return float(np.mean(projection(images, PROMPTS)))

    singles = {}

    def reference(head_set) -> float:
        key = frozenset(head_set)
        if key not in singles:
            singles[key] = alone_score(key)
        return singles[key]

    chosen, history = greedy_reference(reference, CANDIDATES, 2, 1)
    assert list(result.heads) == chosen
    assert [list(r.added) for r in result.rounds] == history
    for r in result.rounds:
        before = set(result.heads[: r.number - 1])
        for head, score in r.scores:
            # Batched convolutions round differently from lone ones: a pixel may move by one level.
            assert score == pytest.approx(reference(before | {head}), abs=0.01)
    assert result.baseline == pytest.approx(alone_score(()), abs=0.01)
    # SoftPAG changed the images: the candidates' scores differ from each other.
    assert len({score for _, score in result.rounds[0].scores}) > 1


def test_perturbed_requests_carry_the_head_set_as_soft_pag(served):
    model, loop = served
    scorer = HeadSetScorer(model, PROMPTS, SETTINGS, projection, loop)
    request = scorer.request(frozenset({(6, 3), (0, 1), (6, 0)}), 1)
    assert (request.prompt, request.seed, request.width, request.steps) == (PROMPTS[1], 5, 16, 2)
    assert request.pag.scale == 3.0 and request.pag.soft.u == 0.75
    assert [(lh.layer, list(lh.heads)) for lh in request.pag.soft.heads] == [(0, [1]), (6, [0, 3])]
    assert not scorer.request(frozenset(), 0).HasField("pag")


def test_clip_score_is_the_cosine_of_clip_embeddings(tiny_clip_path):
    objective = ClipScore(tiny_clip_path)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a photo of a cat", "a red house", "a painting of a river in the style of van gogh"]
    scores = objective(images, prompts)

    model, processor = objective.model, objective.processor
    with torch.inference_mode():
        for image, prompt, score in zip(images, prompts, scores):
            pixels = processor(images=[image], return_tensors="pt").pixel_values
            ids = processor(text=[prompt], return_tensors="pt").input_ids
            image_embedding = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[
                0
            ]
            text_embedding = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
            cosine = image_embedding @ text_embedding / (image_embedding.norm() * text_embedding.norm())
            assert score == pytest.approx(float(cosine), abs=1e-5)
    assert len(set(scores)) == 3


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([1.0], "returned 1 scores for 2 images"),
        ([1.0, float("nan")], "not finite"),
        (["high", "low"], "not a sequence of numbers"),
        (3.0, "not a sequence of numbers"),
    ],
)
def test_objective_answers_are_checked(answer, message):
    images = [Image.new("RGB", (8, 8))] * 2
    with pytest.raises(ObjectiveError, match=message):
        scores_of(lambda images, prompts: answer, images, ["a", "b"])


def test_objectives_load_from_a_module_or_a_file(tmp_path):
    file = tmp_path / "my_objective.py"
    file.write_text("def score(images, prompts):\n    return [1.5] * len(images)\nnot_callable = 3\n")
    assert load_objective(f"{file}:score", None)([None], ["p"]) == [1.5]
    assert load_objective("attnserve.calibration.image_objectives:scores_of", None) is scores_of


@pytest.mark.parametrize(
    ("name", "clip", "message"),
    [
        ("clip-score", None, "needs --clip-model"),
        ("FILE:score", "x", "--clip-model is for --objective clip-score"),
        ("no_colon", None, "neither clip-score nor a callable"),
        ("no_such_module_here:f", None, "cannot import 'no_such_module_here'"),
        ("FILE:not_callable", None, "has no callable 'not_callable'"),
        ("missing.py:f", None, "cannot import 'missing.py'"),
    ],
)
def test_bad_objectives(tmp_path, name, clip, message):
    file = tmp_path / "objective.py"
    file.write_text("not_callable = 3\n")
    with pytest.raises(ObjectiveError, match=message):
        load_objective(name.replace("FILE", str(file)), None if clip is None else tmp_path)
