"""PAG and SoftPAG per request: against diffusers' own PAG pipeline, each other, the paper's
formula, and rows of a mixed batch against themselves alone."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from attnserve.engines.diffusers.denoise import Branch, DenoisingJob, _guide, guider_of
from attnserve.spec.guidance import PerturbedGuidance

from .helpers import GUIDANCE, generate, image_request, pag, reference_images, soft_pag

TOLERANCE = 1e-5


@pytest.mark.parametrize(("scale", "adaptive_scale"), [(3.0, 0.0), (5.0, 0.006)])
def test_pag_equals_diffusers_pag_pipeline(served, pag_pipe, scale, adaptive_scale):
    denoiser, geometry = served
    [ours] = generate(denoiser, [image_request(denoiser, pag(geometry, scale, adaptive_scale))])
    theirs = reference_images(pag_pipe, pag_scale=scale, pag_adaptive_scale=adaptive_scale)
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_soft_pag_u1_on_every_head_is_pag_and_u0_is_plain(served, plain_pipe):
    denoiser, geometry = served
    [hard] = generate(denoiser, [image_request(denoiser, pag(geometry))])
    [soft1] = generate(denoiser, [image_request(denoiser, soft_pag(geometry, 1.0, heads=tuple(range(8))))])
    [soft0] = generate(denoiser, [image_request(denoiser, soft_pag(geometry, 0.0))])
    assert np.abs(soft1 - hard).max() < TOLERANCE
    assert np.abs(soft0 - reference_images(plain_pipe)).max() < TOLERANCE
    [half] = generate(denoiser, [image_request(denoiser, soft_pag(geometry, 0.5, heads=(0, 3)))])
    assert np.abs(half - hard).max() > 1e-3 and np.abs(half - soft0).max() > 1e-3


def test_mixed_batch_gives_each_request_what_it_gives_alone(served):
    denoiser, geometry = served
    requests = [
        image_request(denoiser, seed=1),
        image_request(denoiser, pag(geometry), seed=2),
        image_request(denoiser, soft_pag(geometry, 0.5, heads=(1, 2)), seed=3, num_images=2),
        image_request(denoiser, pag(geometry, 4.0, 0.004), seed=4),
    ]
    together = generate(denoiser, requests)
    for request, images in zip(requests, together):
        [alone] = generate(denoiser, [request])
        assert images.shape == alone.shape
        assert np.abs(images - alone).max() < TOLERANCE


def test_guidance_combination_is_the_papers_formula(served):
    """eps = eps_u + w (eps_c - eps_u) + s(t) (eps_c - eps_ptb), s(t) = max(0, s - s_ad (1000 - t))."""
    denoiser, _ = served
    torch.manual_seed(0)
    eps_u, eps_c, eps_p = torch.randn(3, 2, 4, 4, 4).unbind()
    for t, adaptive in ((901, 0.0), (901, 0.01), (400, 0.01)):
        guidance = PerturbedGuidance(scale=3.0, adaptive_scale=adaptive, layer_ops={})
        request = image_request(denoiser, guidance, num_images=2)
        job = DenoisingJob(
            request=request,
            branches=(Branch.UNCONDITIONAL, Branch.CONDITIONAL, Branch.PERTURBED),
            text_embeddings=torch.empty(0),
            latents=torch.empty(0),
            generator=None,
            guider=guider_of(request),
        )
        s = max(0.0, 3.0 - adaptive * (1000 - t))
        expected = eps_u + GUIDANCE * (eps_c - eps_u) + s * (eps_c - eps_p)
        norms = []
        got = _guide(job, torch.cat([eps_u, eps_c, eps_p]), 0, torch.tensor(t), norms.append)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # The guidance norm metric: per image, sqrt(mean((eps_c - eps_ptb)^2)).
        for image, norm in enumerate(norms):
            difference = (eps_c[image] - eps_p[image]).flatten().tolist()
            assert norm == pytest.approx(
                math.sqrt(sum(d * d for d in difference) / len(difference)), rel=1e-6
            )
        assert len(norms) == 2


def test_guidance_without_the_unconditional_branch_is_the_pipelines_formula(served):
    """guidance_scale 1: eps = eps_c + s(t) (eps_c - eps_ptb), as diffusers' PAG pipelines (the
    guider's default formulation would start from eps_ptb)."""
    denoiser, _ = served
    torch.manual_seed(1)
    eps_c, eps_p = torch.randn(2, 1, 4, 4, 4).unbind()
    guidance = PerturbedGuidance(scale=3.0, adaptive_scale=0.0, layer_ops={})
    request = dataclasses.replace(image_request(denoiser, guidance), guidance_scale=1.0)
    job = DenoisingJob(
        request=request,
        branches=(Branch.CONDITIONAL, Branch.PERTURBED),
        text_embeddings=torch.empty(0),
        latents=torch.empty(0),
        generator=None,
        guider=guider_of(request),
    )
    got = _guide(job, torch.cat([eps_c, eps_p]), 0, torch.tensor(901))
    torch.testing.assert_close(got, eps_c + 3.0 * (eps_c - eps_p), atol=1e-5, rtol=0)
