"""tiny-llava on the vLLM engine against the transformers engine: images through vLLM's own
multimodal processor and vision tower, image tokens on the same positions, and the same greedy
tokens for plain requests and under every operation on image-token keys, in one mixed batch;
image attention maps, image statistics and Score's candidate log-probabilities equal to 1e-4; the visual recipes (CARVE, Visual Funnel) give the same
tokens, masks and crops, and a CARVE recipe equals its passes sent as ordinary requests. PAINT's
tokens are chosen from vLLM's own tower pass in its worker and from the engine's hooked tower on
transformers: the tokens its rescale acts on (read from image attention maps) are the same and
are those the tower's attention selects, also for an image served from vLLM's encoder cache."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import pytest_asyncio
import torch
from attnserve.api.inputs import to_engine_request, to_score_request
from attnserve.api.visual_recipes import seen_square, to_visual_recipe
from attnserve.attention import carve
from attnserve.engines.hf.engine import TransformersEngine
from attnserve.engines.vllm.engine import VllmEngine
from attnserve.models.config import Limits, VllmSettings
from attnserve.models.registry import ServedModel
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import readout_pb2 as rpb
from attnserve_client.v1 import visual_recipe_pb2 as vpb
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


def paint(layers=(2, 3), local: float = 0.7, summary: float = 0.3) -> list[ipb.Intervention]:
    """PAINT's rescales (a part with alpha 0 is left out), the last query row."""
    parts = ((ipb.VISUAL_TOKENS_PAINT_LOCAL, local), (ipb.VISUAL_TOKENS_PAINT_SUMMARY, summary))
    return [
        ipb.Intervention(
            selector=ipb.Selector(
                layers=list(layers),
                queries=ipb.QUERY_SCOPE_LAST,
                keys=ipb.KeySelector(image_tokens=ipb.ImageTokens(tokens=tokens)),
            ),
            logit_rescale=ipb.LogitRescale(alpha=alpha),
        )
        for tokens, alpha in parts
        if alpha
    ]


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
    # tau 0.2, not 0.05: tiny-llava's many image-token probabilities crowd around 0.05, where
    # the engines' 1e-6 differences flipped a key across the threshold in one full CI run.
    "sink_calibration": op(
        selector=ipb.Selector(layers=[1, 2]), sink_calibration=ipb.SinkCalibration(tau=0.2)
    ),
    "paint": paint(local=2.0, summary=1.0),
}
READOUTS = rpb.ReadoutSpec(
    image_attention=rpb.ImageAttentionSpec(layers=[1, 3], per_head=True), layer_statistics=True
)


#: The prefill's last row in layer 2, per head: where a rescale on layer 2 shows which keys it took.
CHOICE_READOUTS = rpb.ReadoutSpec(
    image_attention=rpb.ImageAttentionSpec(layers=[2], per_head=True, steps=[0])
)
#: Each PAINT part alone on layer 2, strong enough to move every key it takes.
CHOICES = {
    "plain": [],
    "paint_local": paint(layers=[2], local=5.0, summary=0),
    "paint_summary": paint(layers=[2], local=0, summary=5.0),
}

RECIPES = {
    "carve": {"carve": vpb.CarveRecipe()},
    "carve_set": {
        "carve": vpb.CarveRecipe(
            general_query="say what you see.",
            layers=[1, 3],
            top_fraction=0.3,
            min_components=1,
            pass_max_tokens=5,
        )
    },
    "visual_funnel": {"visual_funnel": vpb.VisualFunnelRecipe()},
    "visual_funnel_set": {
        "visual_funnel": vpb.VisualFunnelRecipe(layers=[2], crops=2, smallest_crop=0.1, largest_crop=0.5)
    },
}


def score_request(question, colours, interventions) -> pb.ScoreRequest:
    parts = [pb.ContentPart(image=encoded(c)) for c in colours] + [pb.ContentPart(text=question)]
    return pb.ScoreRequest(
        model="tiny-llava",
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", parts=parts)]),
        candidates=["red", "a blue square"],
        interventions=ipb.InterventionSpec(interventions=interventions),
    )


def request(question, colours, interventions, readouts=None, images=None, **recipe) -> pb.GenerateRequest:
    images = images if images is not None else [encoded(c) for c in colours]
    parts = [pb.ContentPart(image=data) for data in images] + [pb.ContentPart(text=question)]
    return pb.GenerateRequest(
        **recipe,
        model="tiny-llava",
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", parts=parts)]),
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

    async def recipe(kwargs):
        run = to_visual_recipe(request(*PROMPTS[0], [], **kwargs), served)
        outs = [out async for out in run.generate(engine)]
        return [o.token_id for o in outs], run

    results, recipes = await asyncio.gather(
        asyncio.gather(
            *(one(request(*PROMPTS[i], OPERATIONS[name])) for name, i in cases),
            *(one(request(*prompt, [], READOUTS)) for prompt in PROMPTS),
        ),
        asyncio.gather(*(recipe(kwargs) for kwargs in RECIPES.values())),
    )
    scores = await asyncio.gather(
        *(
            engine.score(to_score_request(score_request(*PROMPTS[i], OPERATIONS[name]), served))
            for name, i in cases
        )
    )
    solo_plain = [await one(request(*prompt, [])) for prompt in PROMPTS]
    choice_cases = [(name, i) for name in CHOICES for i in range(len(PROMPTS))]
    choices = await asyncio.gather(
        *(one(request(*PROMPTS[i], CHOICES[name], CHOICE_READOUTS)) for name, i in choice_cases)
    )
    return {
        "choices": {
            case: outs[0].step_readouts["image_attention"].maps
            for case, (_, outs) in zip(choice_cases, choices)
        },
        "choice_requests": {
            i: to_engine_request(request(*PROMPTS[i], paint()), served) for i in range(len(PROMPTS))
        },
        "cached_image": await cached_image_runs(one),
        "cases": dict(zip(cases, (r[0] for r in results))),
        "scores": dict(zip(cases, scores)),
        "maps": [r[1] for r in results[len(cases) :]],
        "solo_plain": [r[0] for r in solo_plain],
        "served": served,
        "recipes": dict(zip(RECIPES, recipes)),
        "carve_by_hand": await carve_by_hand(one, recipes[0][1]),
    }


async def cached_image_runs(one) -> list[tuple[list[int], dict]]:
    """PAINT on an image the tower already encoded for a plain request: two requests one after
    the other, then two together; vLLM serves the image's features from its encoder cache. Each
    run's tokens and its prefill's layer 2 maps (PAINT rescales that row)."""
    question, colours = PROMPTS[1]
    painted = request(question, colours, paint(local=2.0, summary=1.0), CHOICE_READOUTS)
    await one(request(question, colours, []))
    runs = [await one(painted), await one(painted), *await asyncio.gather(one(painted), one(painted))]
    return [(tokens, outs[0].step_readouts["image_attention"].maps) for tokens, outs in runs]


async def carve_by_hand(one, run) -> dict:
    """The default CARVE recipe's passes as ordinary requests, its map from attention.carve."""
    question, _ = PROMPTS[0]
    image = encoded("red")
    reading = rpb.ReadoutSpec(image_attention=rpb.ImageAttentionSpec(layers=[2, 3], per_layer=True))
    general = request(carve.GENERAL_QUERY, [], [], reading, images=[image])
    asked = request(question, [], [], reading, images=[image])
    for r in (general, asked):
        r.sampling.max_tokens, r.sampling.ignore_eos = 32, False
    (_, q_outs), (_, g_outs) = await asyncio.gather(one(asked), one(general))

    def maps(outs):
        grids = [
            [o.step_readouts["image_attention"].maps[(0, layer, None)] for layer in (2, 3)] for o in outs
        ]
        return torch.tensor(grids).reshape(len(outs), 2, 8, 8)

    width, height = run.image.size
    left, top, right, bottom = seen_square((width, height))
    scores = carve.contrast_map(maps(q_outs), maps(g_outs), (bottom - top, right - left))
    kept = carve.keep_components(scores, carve.top_fraction_mask(scores))
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = kept.numpy()
    ((_, crop_png),) = run.outcome.crops
    final, _ = await one(request(question, [], [], images=[image, crop_png]))
    return {"mask": mask, "box": carve.mask_box(torch.from_numpy(mask)), "final": final}


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
        max_images=4,
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


async def test_image_statistics_equal_across_engines(vllm_run, transformers_run):
    for ours, theirs in zip(vllm_run["maps"], transformers_run["maps"]):
        a, b = ours[-1].readouts["layer_statistics"], theirs[-1].readouts["layer_statistics"]
        assert a.keys() == b.keys() == {0, 1, 2, 3}
        for layer in a:
            assert a[layer].image_query_count == b[layer].image_query_count > 0
            for name in ("image_mass", "image_entropy"):
                mine, reference = (getattr(s[layer], name) / s[layer].image_query_count for s in (a, b))
                assert 0 < reference <= 1
                assert mine == pytest.approx(reference, abs=1e-4), (layer, name)


def recipe_outcome(run) -> dict:
    outcome = run[1].outcome
    return {
        "tokens": run[0],
        "passes": outcome.passes,
        "first_answer": outcome.first_answer,
        "boxes": [box for box, _ in outcome.crops],
        "mask": outcome.mask_png,
        "entropy": round(outcome.attention_entropy, 4),
    }


async def test_recipes_give_the_same_tokens_masks_and_crops(vllm_run, transformers_run):
    for name in RECIPES:
        ours, theirs = (
            recipe_outcome(vllm_run["recipes"][name]),
            recipe_outcome(transformers_run["recipes"][name]),
        )
        assert ours == theirs, name
        assert ours["passes"] == (3 if name.startswith("carve") else 2)
    funnel = vllm_run["recipes"]["visual_funnel"][1]
    assert len(funnel.outcome.crops) == 3 and len(funnel.final_request.images) == 4
    sides = [box[2] - box[0] for box, _ in funnel.outcome.crops]
    assert sides == sorted(sides) and sides[0] < sides[-1]  # focal to wide


async def test_carve_is_its_passes_as_ordinary_requests(vllm_run, transformers_run):
    for run in (vllm_run, transformers_run):
        tokens, recipe = run["recipes"]["carve"]
        by_hand = run["carve_by_hand"]
        mask = np.asarray(Image.open(io.BytesIO(recipe.outcome.mask_png))) > 0
        assert (mask == by_hand["mask"]).all() and mask.any()
        assert recipe.outcome.crops[0][0] == by_hand["box"]
        assert tokens == by_hand["final"]


def acted_on(painted: dict, plain: dict) -> dict[int, list[int]]:
    """Per image, the patches a rescale on the row took: a logit rescale multiplies the
    probability of each key it takes by its own factor and every other key's by the row's
    common renormalisation (the median ratio: a PAINT part takes under half the patches)."""
    taken: dict[int, list[int]] = {}
    for (image, layer, head), weights in plain.items():
        ratio = torch.tensor(painted[(image, layer, head)], dtype=torch.float64) / torch.tensor(weights)
        patches = ((ratio / ratio.median() - 1).abs() > 1e-3).nonzero().flatten().tolist()
        assert taken.setdefault(image, patches) == patches, "the rescale takes the same keys in every head"
    return taken


async def test_paint_takes_the_tokens_the_towers_attention_selects(
    vllm_run, transformers_run, tiny_llava_path
):
    from attnserve.engines.hf import vision

    processor, model = vision.load_vision_language_model(tiny_llava_path, dtype=torch.float32, device="cpu")
    tower = vision.VisionTower(model, processor, torch.device("cpu"))
    for i in range(len(PROMPTS)):
        engine_request = transformers_run["choice_requests"][i]
        _, (resolved,) = vision.encode_batch(
            tower, [(engine_request.images, engine_request.image_spans, engine_request.plan)]
        )
        (_, local), (_, summary) = resolved.layer_ops[2]
        for part, chosen in (("paint_local", local), ("paint_summary", summary)):
            expected = {
                image: [p - start for a, b in chosen.keys.ranges for p in range(a, b) if start <= p < end]
                for image, (start, end) in enumerate(engine_request.image_spans)
            }
            runs = [run["choices"] for run in (vllm_run, transformers_run)]
            for choices in runs:
                assert acted_on(choices[(part, i)], choices[("plain", i)]) == expected, (part, i)
        assert local.keys.ranges != ((0, 0),)  # PAINT takes some local tokens


async def test_an_image_from_the_encoder_cache_gets_the_same_paint(vllm_run, transformers_run):
    (tokens, maps), plain = transformers_run["cached_image"][0], transformers_run["choices"][("plain", 1)]
    assert maps.keys() == plain.keys()
    assert any(maps[key] != pytest.approx(plain[key], abs=1e-3) for key in maps)  # PAINT acted
    for our_tokens, our_maps in vllm_run["cached_image"]:
        assert our_tokens == tokens
        assert our_maps.keys() == maps.keys()
        for key in maps:
            assert our_maps[key] == pytest.approx(maps[key], abs=1e-4), key


async def test_paint_needs_the_towers_penultimate_layer(tiny_llava_path):
    """vLLM builds the tower up to the feature layer; the engine offers PAINT's selectors only
    where that includes the penultimate layer, and where each patch is one image token."""
    from attnserve.engines.vllm.engine import _tower_has_paint_layers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llava_path, local_files_only=True)
    assert config.vision_feature_layer == -2 and _tower_has_paint_layers(config)
    config.vision_feature_layer = -3
    assert not _tower_has_paint_layers(config)
    config.vision_feature_layer = [-3, -1]
    assert _tower_has_paint_layers(config)
    config.vision_feature_select_strategy = "full"  # the CLS token too
    assert not _tower_has_paint_layers(config)
