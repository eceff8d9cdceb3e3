"""DAAM word heatmaps on tiny-sd3: the paper's aggregation of the image queries' probabilities at
the text keys of every joint attention call, as diffusers' own joint attention computes them;
free of side effects on the images, and the same for a request in a mixed batch as alone."""

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0

from .helpers import SIZE, generate, reference_images
from .test_sd3 import pag
from .test_word_heatmaps import heatmap_request, heatmaps_of


class CapturingJointProcessor(JointAttnProcessor2_0):
    """diffusers' joint processor, keeping the conditional row's (batch [u, c]) probabilities of
    the image queries over every key, written out, at the text keys."""

    def __init__(self, captured):
        super().__init__()
        self.captured = captured

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        image, text = hidden_states[1], encoder_hidden_states[1]
        q = torch.cat([attn.to_q(image), attn.add_q_proj(text)]).double()
        k = torch.cat([attn.to_k(image), attn.add_k_proj(text)]).double()
        q, k = (x.view(x.shape[0], attn.heads, -1).transpose(0, 1) for x in (q, k))
        probs = torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1)
        n = image.shape[0]
        self.captured.append(probs[:, :n, n:].float())
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)


def daam_reference(plain_pipe, positions):
    captured = []
    original = plain_pipe.transformer.attn_processors
    plain_pipe.transformer.set_attn_processor(CapturingJointProcessor(captured))
    try:
        reference_images(plain_pipe)
    finally:
        plain_pipe.transformer.set_attn_processor(original)
    latent = SIZE // plain_pipe.vae_scale_factor
    per_step = 2  # joint layers
    total = torch.zeros(captured[0].shape[-1], latent, latent)
    for probs in captured:
        heads, queries, keys = probs.shape
        side = int(queries**0.5)
        for h in range(heads):
            grid = probs[h].T.reshape(keys, 1, side, side)
            total += (
                F.interpolate(grid, size=(latent, latent), mode="bicubic").clamp_min(0)[:, 0]
                / heads
                / per_step
            )
    word = total[list(positions)].mean(0)
    image = F.interpolate(word[None, None], size=(SIZE, SIZE), mode="bicubic")[0, 0]
    return (image - image.min()) / (image.max() - image.min())


def test_heatmaps_are_daams_aggregation_of_diffusers_joint_maps(sd3_served, sd3_plain_pipe):
    denoiser, _ = sd3_served
    request = heatmap_request(denoiser)
    [[maps]] = heatmaps_of(denoiser, [request])
    for word, heatmap in zip(request.heatmap_words, maps):
        expected = daam_reference(sd3_plain_pipe, word.positions)
        assert heatmap.shape == (SIZE, SIZE)
        torch.testing.assert_close(heatmap, expected, atol=1e-5, rtol=0)


def test_heatmaps_leave_the_images_alone_and_are_those_alone_in_a_batch(sd3_served, sd3_plain_pipe):
    denoiser, geometry = sd3_served
    [images] = generate(denoiser, [heatmap_request(denoiser)])
    assert np.array_equal(images, reference_images(sd3_plain_pipe))
    requests = [
        heatmap_request(denoiser, perturbed=pag(geometry), seed=3),
        heatmap_request(denoiser, seed=2, num_images=2),
    ]
    together = heatmaps_of(denoiser, requests)
    for request, maps in zip(requests, together):
        [alone] = heatmaps_of(denoiser, [request])
        for image_maps, alone_maps in zip(maps, alone):
            for a, b in zip(image_maps, alone_maps):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
