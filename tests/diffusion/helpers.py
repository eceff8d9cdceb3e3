"""Requests and reference images on the tiny pipeline, shared by the diffusion tests."""

from __future__ import annotations

import numpy as np
import torch
from attnserve.attention.plan import IdentityBlend, ScopedOp
from attnserve.engines.base import ImageRequest
from attnserve.spec.guidance import PerturbedGuidance

PROMPT = "a photo of a cat"
SIZE = 32
STEPS = 3
GUIDANCE = 7.5


def reference_images(pipe, seed=0, num_images=1, **kwargs):
    return pipe(
        PROMPT,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        guidance_scale=GUIDANCE,
        num_images_per_prompt=num_images,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images


def assert_seeds_reproduce(pipe, **kwargs):
    """The pipeline's images (2 steps) are the same for the same seed and differ for another."""

    def image(seed):
        return pipe(
            PROMPT,
            num_inference_steps=2,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            **kwargs,
        ).images

    first, again, other = image(0), image(0), image(1)
    assert first.shape == (1, SIZE, SIZE, 3)
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def image_request(denoiser, perturbed=None, seed=0, num_images=1, plan=None, prompt=PROMPT):
    tokenizer = denoiser.family.tokenizer  # as the engine tokenizes (PixArt lowercases the caption)
    extra = {} if plan is None else {"plan": plan}
    return ImageRequest(
        request_id=f"r{seed}",
        prompt_token_ids=tuple(tokenizer(prompt).input_ids),
        negative_token_ids=tuple(tokenizer("").input_ids),
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=seed,
        num_images=num_images,
        perturbed=perturbed,
        **extra,
    )


def generate(denoiser, requests):
    """Each request's images (float arrays), all denoised in one batch."""
    jobs = [denoiser.start(request) for request in requests]
    denoiser.run(jobs, STEPS, lambda job, step, timestep: None)
    return [denoiser.images(job, "np") for job in jobs]


def mid_self_layers(geometry):
    return [
        layer
        for layer in geometry.layers
        if layer.name.startswith("mid_block") and layer.kind.value == "self"
    ]


def pag(geometry, scale=3.0, adaptive_scale=0.0):
    return PerturbedGuidance(
        scale=scale,
        adaptive_scale=adaptive_scale,
        layer_ops={layer.index: (ScopedOp(IdentityBlend(1.0)),) for layer in mid_self_layers(geometry)},
    )


def soft_pag(geometry, u, heads=None, scale=3.0):
    return PerturbedGuidance(
        scale=scale,
        adaptive_scale=0.0,
        layer_ops={
            layer.index: (ScopedOp(IdentityBlend(u), heads=heads),) for layer in mid_self_layers(geometry)
        },
    )
