"""Layout binding on the tiny pipeline: the engine's grid of each cross-attention layer is the
UNet's own; in the real run, the final cross-attention of the bound request puts more of the image
tokens' attention on the span inside the box and less outside than the plain request does; other
requests of a mixed batch get what they get alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from attnserve.api.image_inputs import to_image_request
from attnserve.attention.core import attend_rows
from attnserve.attention.layout import MaskKind, RowLayout
from attnserve.attention.plan import RowPlan
from attnserve.engines.diffusers.attention import attention_modules
from attnserve.spec.errors import InvalidRequest
from attnserve.spec.geometry import AttentionKind
from attnserve_client.v1 import image_generation_pb2 as gpb

from .helpers import GUIDANCE, PROMPT, SIZE, STEPS, generate, image_request, pag

BOX = {"x0": 0.5, "y0": 0.0, "x1": 1.0, "y1": 1.0}  # the right half
SPAN = ((5, 6),)  # "cat" in "<start> a photo of a cat <end>"


def bound_request(served_model, seed=0, word_heatmaps=None, **binding):
    request = gpb.GenerateImageRequest(
        model="tiny-sd",
        prompt=PROMPT,
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=seed,
        layout=[gpb.LayoutBinding(**(BOX | {"words": ["cat"], "strength": 20.0} | binding))],
        word_heatmaps=word_heatmaps,
    )
    return to_image_request(request, served_model, served_model.engine)


def cross_layers(geometry):
    return [layer for layer in geometry.layers if layer.kind is AttentionKind.CROSS]


@pytest.mark.parametrize(("height", "width"), [(32, 32), (40, 24), (48, 16)])
def test_query_grids_are_the_unets_own(served_model, height, width):
    engine = served_model.engine
    unet = engine.pipe.unet
    modules = dict(attention_modules(unet))
    seen = {}
    hooks = [
        modules[layer.name].register_forward_pre_hook(
            lambda module, args, index=layer.index: seen.__setitem__(index, args[0].shape[1])
        )
        for layer in cross_layers(engine.info.geometry)
    ]
    latent = (height // engine.pipe.vae_scale_factor, width // engine.pipe.vae_scale_factor)
    try:
        with torch.inference_mode():
            unet(torch.zeros(1, 4, *latent), 10, encoder_hidden_states=torch.zeros(1, 77, 32))
    finally:
        for hook in hooks:
            hook.remove()
    grids = engine.query_grids(height, width)
    assert {layer: rows * cols for layer, (rows, cols) in grids.items()} == seen
    # Rows follow the height: the latent grid, and halved at the mid block.
    assert set(grids.values()) == {latent, (latent[0] // 2, latent[1] // 2)}


def captured_queries_and_keys(denoiser, geometry, request):
    """Run the request alone; per step and cross-attention layer, its conditional row's (q, k)."""
    modules = dict(attention_modules(denoiser.pipe.unet))
    captured = []
    hooks = []
    for layer in cross_layers(geometry):
        module = modules[layer.name]

        def keep(index, part, output, heads=module.heads):
            row = output[1]  # batch [unconditional, conditional]
            captured.append((index, part, row.view(row.shape[0], heads, -1).transpose(0, 1).clone()))

        hooks.append(
            module.to_q.register_forward_hook(lambda m, a, out, i=layer.index, f=keep: f(i, "q", out))
        )
        hooks.append(
            module.to_k.register_forward_hook(lambda m, a, out, i=layer.index, f=keep: f(i, "k", out))
        )
    try:
        [images] = generate(denoiser, [request])
    finally:
        for hook in hooks:
            hook.remove()
    calls = []
    per_step = 2 * len(cross_layers(geometry))
    for step in range(STEPS):
        chunk = captured[step * per_step : (step + 1) * per_step]
        for (layer, _, q), (_, _, k) in zip(chunk[::2], chunk[1::2]):
            calls.append((step, layer, q, k))
    return calls, images


def span_mass_inside_and_outside(denoiser, calls, request, grids):
    """Mean over steps, layers, heads and image tokens of the final map's mass on the span, for
    the tokens inside the box and outside it: attention.core's output with values 1 on the
    span's keys, with the request's plan of that call."""
    inside, outside = [], []
    for step, layer, q, k in calls:
        v = torch.zeros_like(k)
        for start, end in SPAN:
            v[:, start:end, 0] = 1.0
        plan = request.plan.for_call(layer, step) or RowPlan()
        layout = RowLayout(
            key_start=0, num_prompt_tokens=k.shape[1], mask=MaskKind.FULL, cross_attention=True
        )
        scale = 1 / math.sqrt(q.shape[-1])
        out, _ = attend_rows(q[None], k[None], v[None], scale=scale, layouts=[layout], plans=[plan])
        mass = out[0, :, :, 0].mean(dim=0)
        rows, cols = grids[layer]
        centre_x = (torch.arange(rows * cols) % cols + 0.5) / cols
        in_box = (centre_x >= BOX["x0"]) & (centre_x < BOX["x1"])
        inside.append(float(mass[in_box].mean()))
        outside.append(float(mass[~in_box].mean()))
    return np.mean(inside), np.mean(outside)


def test_the_box_draws_the_spans_attention_and_the_rest_loses_it(served, served_model):
    denoiser, geometry = served
    grids = served_model.engine.query_grids(SIZE, SIZE)
    bound = bound_request(served_model)
    plain = image_request(denoiser)
    bound_calls, bound_images = captured_queries_and_keys(denoiser, geometry, bound)
    plain_calls, plain_images = captured_queries_and_keys(denoiser, geometry, plain)
    assert len(bound_calls) == len(plain_calls) == STEPS * len(grids)
    bound_in, bound_out = span_mass_inside_and_outside(denoiser, bound_calls, bound, grids)
    plain_in, plain_out = span_mass_inside_and_outside(denoiser, plain_calls, plain, grids)
    assert bound_in > 2 * plain_in
    assert bound_out < plain_out / 2
    assert not np.allclose(bound_images, plain_images, atol=1e-3)


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(served, served_model):
    denoiser, geometry = served
    requests = [
        image_request(denoiser, seed=1),
        bound_request(served_model, seed=2),
        image_request(denoiser, pag(geometry), seed=3, num_images=2),
        bound_request(served_model, seed=4, x0=0.0, x1=0.5, strength=3.0),
    ]
    together = generate(denoiser, requests)
    for request, images in zip(requests, together):
        [alone] = generate(denoiser, [request])
        np.testing.assert_allclose(images, alone, atol=1e-5, rtol=0)


def test_heatmaps_are_refused_with_a_layout(served_model):
    """Heatmaps read the unedited cross-attention, which a layout edits."""
    with pytest.raises(InvalidRequest) as caught:
        bound_request(served_model, word_heatmaps=gpb.WordHeatmapsSpec(words=["cat"]))
    assert [v.field for v in caught.value.violations] == ["word_heatmaps"]
