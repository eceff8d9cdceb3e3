"""Layout binding on tiny-pixart: each cross-attention layer's grid is the transformer's grid of
patches; in the real run, the bound request's cross-attention puts more of the image tokens'
attention on the span inside the box and less outside than the plain request does; a mixed batch
gives each request what it gets alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from attnserve.api.image_inputs import to_image_request
from attnserve.attention.core import attend_rows
from attnserve.attention.layout import MaskKind, RowLayout
from attnserve.attention.plan import RowPlan
from attnserve.spec.geometry import AttentionKind
from attnserve_client.v1 import image_generation_pb2 as gpb

from .helpers import GUIDANCE, PROMPT, SIZE, STEPS
from .test_pixart import generate, image_request, pag

BOX = {"x0": 0.5, "y0": 0.0, "x1": 1.0, "y1": 1.0}  # the right half
CAT = 4  # "cat" in "a photo of a cat </s>"


def bound_request(served_model, seed=0, **binding):
    request = gpb.GenerateImageRequest(
        model="tiny-pixart",
        prompt=PROMPT,
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=seed,
        layout=[gpb.LayoutBinding(**(BOX | {"words": ["cat"], "strength": 20.0} | binding))],
    )
    return to_image_request(request, served_model, served_model.engine)


def cross_layers(geometry):
    return [layer for layer in geometry.layers if layer.kind is AttentionKind.CROSS]


@pytest.mark.parametrize(("height", "width"), [(32, 32), (40, 24)])
def test_query_grids_are_the_transformers_patches(pixart_served_model, height, width):
    engine = pixart_served_model.engine
    transformer = engine.pipe.transformer
    seen = {}
    hooks = [
        transformer.get_submodule(layer.name).register_forward_pre_hook(
            lambda module, args, index=layer.index: seen.__setitem__(index, args[0].shape[1])
        )
        for layer in cross_layers(engine.info.geometry)
    ]
    scale = engine.pipe.vae_scale_factor
    latent = (height // scale, width // scale)
    try:
        with torch.inference_mode():
            transformer(
                torch.zeros(1, 4, *latent),
                encoder_hidden_states=torch.zeros(1, 300, 32),
                timestep=torch.tensor([10]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            )
    finally:
        for hook in hooks:
            hook.remove()
    grids = engine.query_grids(height, width)
    assert set(grids.values()) == {(latent[0] // 2, latent[1] // 2)}  # patch 2, rows follow the height
    assert {layer: rows * cols for layer, (rows, cols) in grids.items()} == seen


def captured_queries_and_keys(denoiser, geometry, request):
    """Run the request alone; per step and cross-attention layer, its conditional row's (q, k)
    over its unpadded T5 keys."""
    transformer = denoiser.pipe.transformer
    num_keys = len(request.prompt_token_ids)
    captured = []
    hooks = []
    for layer in cross_layers(geometry):
        module = transformer.get_submodule(layer.name)

        def keep(index, output, heads=module.heads):
            row = output[1]  # batch [unconditional, conditional]
            captured.append((index, row.view(row.shape[0], heads, -1).transpose(0, 1).clone()))

        for projection in (module.to_q, module.to_k):
            hooks.append(projection.register_forward_hook(lambda m, a, out, i=layer.index, f=keep: f(i, out)))
    try:
        [images] = generate(denoiser, [request])
    finally:
        for hook in hooks:
            hook.remove()
    per_step = 2 * len(cross_layers(geometry))
    calls = []
    for step in range(STEPS):
        chunk = captured[step * per_step : (step + 1) * per_step]
        for (layer, q), (_, k) in zip(chunk[::2], chunk[1::2]):
            calls.append((step, layer, q, k[:, :num_keys]))
    return calls, images


def span_mass_inside_and_outside(calls, request, grids):
    """Mean over steps, layers, heads and image tokens of the map's mass on "cat", for the
    tokens inside the box and outside it (attention.core with values 1 on its key)."""
    inside, outside = [], []
    for step, layer, q, k in calls:
        v = torch.zeros_like(k)
        v[:, CAT, 0] = 1.0
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


def test_the_box_draws_the_spans_attention_and_the_rest_loses_it(pixart_served, pixart_served_model):
    denoiser, geometry = pixart_served
    grids = pixart_served_model.engine.query_grids(SIZE, SIZE)
    bound = bound_request(pixart_served_model)
    plain = image_request(denoiser)
    assert bound.prompt_token_ids == plain.prompt_token_ids
    bound_calls, bound_images = captured_queries_and_keys(denoiser, geometry, bound)
    plain_calls, plain_images = captured_queries_and_keys(denoiser, geometry, plain)
    assert len(bound_calls) == len(plain_calls) == STEPS * len(grids)
    bound_in, bound_out = span_mass_inside_and_outside(bound_calls, bound, grids)
    plain_in, plain_out = span_mass_inside_and_outside(plain_calls, plain, grids)
    assert bound_in > 2 * plain_in
    assert bound_out < plain_out / 2
    assert not np.allclose(bound_images, plain_images, atol=1e-3)


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(pixart_served, pixart_served_model):
    denoiser, geometry = pixart_served
    requests = [
        image_request(denoiser, seed=1, prompt="a red house by the sea"),
        bound_request(pixart_served_model, seed=2),
        image_request(denoiser, pag(geometry), seed=3, num_images=2),
        bound_request(pixart_served_model, seed=4, x0=0.0, x1=0.5, strength=3.0),
    ]
    together = generate(denoiser, requests)
    for request, images in zip(requests, together):
        [alone] = generate(denoiser, [request])
        np.testing.assert_allclose(images, alone, atol=1e-5, rtol=0)
