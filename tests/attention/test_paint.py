"""PAINT's visual token selection against an eager reference written from the paper's
description, on synthetic tensors; the resolution of selectors into key positions; and, on the
real tiny-llava, the tokens chosen from the engine's hooked vision tower against those chosen
from transformers' own eager attention probabilities."""

from __future__ import annotations

import math

import pytest
import torch
from attnserve.attention.paint import (
    cls_patch_attention,
    paint_head_gains,
    paint_tokens,
    resolve_visual_keys,
    runs,
    visual_share,
)
from attnserve.attention.plan import (
    ALL_STEPS,
    KeySet,
    LogitRescale,
    RequestPlan,
    ScopedOp,
    VisualKeys,
)


def reference_cls_patch_attention(query, key, scale):
    """Per image and head: softmax over every key of the CLS query's scaled dot products, the
    patch columns, averaged over heads. float64, loops."""
    images, heads, tokens, _ = query.shape
    out = torch.zeros(images, tokens - 1, dtype=torch.float64)
    for b in range(images):
        for h in range(heads):
            logits = [float(query[b, h, 0].double() @ key[b, h, j].double()) * scale for j in range(tokens)]
            top = max(logits)
            exps = [math.exp(s - top) for s in logits]
            total = sum(exps)
            for j in range(1, tokens):
                out[b, j - 1] += exps[j] / total / heads
    return out


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def reference_paint_tokens(first, penultimate):
    """Local: the top 25% of patches by first-layer CLS attention, minus the summary tokens;
    summary: penultimate-layer CLS attention above Q3 + 1.5 IQR."""
    first, penultimate = first.tolist(), penultimate.tolist()
    count = max(1, int(0.25 * len(first)))
    top = sorted(range(len(first)), key=lambda p: -first[p])[:count]
    q1, q3 = percentile(penultimate, 0.25), percentile(penultimate, 0.75)
    summary = [p for p, a in enumerate(penultimate) if a > q3 + 1.5 * (q3 - q1)]
    return sorted(set(top) - set(summary)), summary


def test_cls_patch_attention_matches_the_reference():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 2, 17, 8, generator=generator)
    key = torch.randn(3, 2, 17, 8, generator=generator)
    got = cls_patch_attention(query, key, 8**-0.5)
    assert got.dtype == torch.float32 and got.shape == (3, 16)
    torch.testing.assert_close(
        got.double(), reference_cls_patch_attention(query, key, 8**-0.5), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("seed", range(20))
def test_token_selection_matches_the_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    patches = 64
    first = torch.rand(patches, generator=generator).softmax(0)
    penultimate = torch.rand(patches, generator=generator) ** 4  # skewed: a few outliers
    # Make some of the first layer's top patches summary outliers too, so local = top - summary matters.
    penultimate[first.topk(3).indices[:2]] = 5.0
    local, summary = paint_tokens(first, penultimate)
    assert (local, summary) == reference_paint_tokens(first, penultimate)
    assert summary and not set(local) & set(summary)


def test_a_flat_map_has_no_summary_tokens():
    local, summary = paint_tokens(torch.arange(16.0), torch.full((16,), 0.5))
    assert summary == [] and local == [12, 13, 14, 15]


def test_runs():
    assert runs([]) == ()
    assert runs([3, 4, 5, 9, 11, 12]) == ((3, 6), (9, 10), (11, 13))


def test_visual_keys_resolve_to_prompt_positions():
    local = ScopedOp(LogitRescale(0.7), keys=KeySet(visual=VisualKeys(images=(1,), part="paint_local")))
    summary = ScopedOp(
        LogitRescale(0.3), keys=KeySet(ranges=((0, 2),), visual=VisualKeys((0, 1), "paint_summary"))
    )
    untouched = ScopedOp(LogitRescale(0.5), keys=KeySet(ranges=((1, 3),)))
    plan = RequestPlan(layer_ops={2: ((ALL_STEPS, local), (ALL_STEPS, summary), (ALL_STEPS, untouched))})
    tokens = {"paint_local": [[0, 1], [2, 3, 7]], "paint_summary": [[], []]}
    resolved = resolve_visual_keys(plan, [(5, 15), (20, 30)], tokens)
    (_, a), (_, b), (_, c) = resolved.layer_ops[2]
    assert a.keys == KeySet(ranges=((22, 24), (27, 28)))
    assert b.keys == KeySet(ranges=((0, 2),))  # no summary token: the explicit range only
    assert c.keys == untouched.keys
    empty = resolve_visual_keys(
        RequestPlan(
            layer_ops={
                0: (
                    (
                        ALL_STEPS,
                        ScopedOp(LogitRescale(1.0), keys=KeySet(visual=VisualKeys((0,), "paint_summary"))),
                    ),
                )
            }
        ),
        [(5, 15)],
        tokens,
    )
    assert empty.layer_ops[0][0][1].keys == KeySet(ranges=((0, 0),))  # selects no key


def test_engine_selection_matches_transformers_eager_attention(tiny_llava_path):
    from attnserve.engines.hf import vision
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    processor, model = vision.load_vision_language_model(tiny_llava_path, dtype=torch.float32, device="cpu")
    tower = vision.VisionTower(model, processor, torch.device("cpu"))
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "navy")]
    for image in images:
        image.paste((250, 250, 0), (4, 4, 18, 14))
    spans = [(3, 67), (70, 134)]
    parts = ("paint_local", "paint_summary")
    plan = RequestPlan(
        layer_ops={
            2: tuple(
                (ALL_STEPS, ScopedOp(LogitRescale(0.7), keys=KeySet(visual=VisualKeys((0, 1), p))))
                for p in parts
            )
        }
    )
    features, (resolved,) = vision.encode_batch(tower, [(images, spans, plan)])
    assert len(features["image"].pooler_output) == 2

    eager = LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_path, local_files_only=True, attn_implementation="eager"
    ).eval()
    with torch.inference_mode():
        attentions = eager.model.vision_tower(tower.pixel_values(images), output_attentions=True).attentions
    first, penultimate = attentions[0][:, :, 0, 1:].mean(1), attentions[-2][:, :, 0, 1:].mean(1)
    expected = {part: [] for part in parts}
    for i, (start, _) in enumerate(spans):
        local, summary = reference_paint_tokens(first[i], penultimate[i])
        expected["paint_local"] += [start + p for p in local]
        expected["paint_summary"] += [start + p for p in summary]
    for (_, op), part in zip(resolved.layer_ops[2], parts):
        got = [p for start, end in op.keys.ranges for p in range(start, end)]
        assert got == expected[part], part
    assert expected["paint_local"]


def test_visual_share_sums_each_rows_image_columns():
    rows = torch.rand(2, 3, 10).softmax(dim=-1)
    image = torch.tensor([2, 3, 4, 7])
    got = visual_share(rows, image)
    for i in range(2):
        for h in range(3):
            expected = sum(float(rows[i, h, j]) for j in (2, 3, 4, 7))
            assert got[i, h].item() == pytest.approx(expected, abs=1e-6)


def test_paint_head_gains_follow_the_definition():
    torch.manual_seed(0)
    sensitivity = torch.rand(4, 6) * 0.5
    step, max_gain = 0.5, 2.0
    gains = paint_head_gains(sensitivity, step=step, max_gain=max_gain)
    mean = sum(sensitivity.flatten().tolist()) / sensitivity.numel()
    for (layer, head), s in zip(
        [(i, j) for i in range(4) for j in range(6)], sensitivity.flatten().tolist(), strict=True
    ):
        expected = min(max(round(s / mean / step) * step, 0.0), max_gain)
        assert gains[layer, head].item() == pytest.approx(expected, abs=1e-6)
    # A head at the mean sensitivity keeps PAINT's own rescale; none attending gets nothing.
    assert paint_head_gains(torch.tensor([[0.2, 0.2]]), step=0.5, max_gain=2.0).tolist() == [[1.0, 1.0]]
    assert paint_head_gains(torch.tensor([[0.0, 0.4]]), step=0.5, max_gain=4.0).tolist() == [[0.0, 2.0]]
    with pytest.raises(ValueError, match="no head attends"):
        paint_head_gains(torch.zeros(2, 2), step=0.5, max_gain=2.0)
