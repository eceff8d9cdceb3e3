"""The cross-attention share metric's samples on the tiny pipeline: in each sampled step, the
shares of the start token, the prompt's words and the end token with the padding are those of
the cross-attention diffusers' own attention computes (averaged over the UNet's cross-attention
layers); sampling leaves the images bit-identical and follows the sample rate."""

from __future__ import annotations

import numpy as np
import pytest
from attnserve.engines.diffusers.denoise import Denoiser
from diffusers.models.attention_processor import AttnProcessor

from .helpers import STEPS, image_request, reference_images
from .test_word_heatmaps import CapturingProcessor


def sampling(served, rate):
    """A Denoiser over the served pipeline that samples shares at this rate."""
    denoiser, geometry = served
    return Denoiser(denoiser.pipe, denoiser.call, geometry, statistics_sample_rate=rate)


def run(denoiser, requests):
    shares = []
    jobs = [denoiser.start(request) for request in requests]
    denoiser.run(jobs, STEPS, lambda job, step, timestep: None, on_cross_attention_shares=shares.append)
    return shares, [denoiser.images(job, "np") for job in jobs]


def diffusers_shares(plain_pipe, num_prompt_tokens):
    """Per step, the shares from diffusers' eager cross-attention probabilities of the
    conditional row, averaged over every cross-attention layer."""
    captured = []
    processors = {
        name: CapturingProcessor(name, captured) if ".attn2" in name else AttnProcessor()
        for name in plain_pipe.unet.attn_processors
    }
    original = plain_pipe.unet.attn_processors
    plain_pipe.unet.set_attn_processor(processors)
    try:
        reference_images(plain_pipe)
    finally:
        plain_pipe.unet.set_attn_processor(original)
    per_step = len(captured) // STEPS
    end = num_prompt_tokens - 1
    steps = []
    for step in range(STEPS):
        layers = captured[step * per_step : (step + 1) * per_step]
        parts = np.zeros(3)
        for probs in layers:
            mass = probs.double().mean(dim=(0, 1))
            parts += [float(mass[0]), float(mass[1:end].sum()), float(mass[end:].sum())]
        steps.append(parts / len(layers))
    return steps


def test_sampled_shares_are_diffusers_cross_attention_shares(served, plain_pipe):
    denoiser = sampling(served, 1.0)
    request = image_request(denoiser)
    shares, [images] = run(denoiser, [request])
    expected = diffusers_shares(plain_pipe, len(request.prompt_token_ids))
    assert len(shares) == STEPS
    np.testing.assert_allclose(np.array(shares), np.array(expected), atol=1e-5, rtol=0)
    assert all(abs(sum(step) - 1) < 1e-5 for step in shares)
    assert np.array_equal(images, reference_images(plain_pipe))


@pytest.mark.parametrize(("rate", "samples"), [(0.0, 0), (0.5, 1), (1.0, STEPS)])
def test_steps_are_sampled_at_the_rate(served, rate, samples):
    denoiser = sampling(served, rate)
    requests = [image_request(denoiser, seed=1), image_request(denoiser, seed=2, num_images=2)]
    shares, _ = run(denoiser, requests)
    assert len(shares) == samples
