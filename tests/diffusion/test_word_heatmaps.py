"""DAAM word heatmaps on the tiny pipeline: equal to the paper's aggregation of the cross-attention
maps diffusers' own attention computes, free of side effects on the images, and the same for a
request in a mixed batch as alone."""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from attnserve.readouts.word_heatmaps import compile_words
from attnserve.spec.errors import Violations
from attnserve_client.v1 import image_generation_pb2 as gpb
from diffusers.models.attention_processor import AttnProcessor

from .helpers import PROMPT, SIZE, generate, image_request, pag, reference_images

WORDS = ["cat", "a photo"]


def heatmap_request(denoiser, **kwargs):
    request = image_request(denoiser, **kwargs)
    violations = Violations()
    words = compile_words(
        gpb.WordHeatmapsSpec(words=WORDS),
        request.prompt_token_ids,
        denoiser.pipe.tokenizer,
        4096,
        10**6,
        violations,
    )
    assert violations.items == []
    return dataclasses.replace(request, heatmap_words=words)


def heatmaps_of(denoiser, requests):
    jobs = [denoiser.start(request) for request in requests]
    denoiser.run(jobs, 3, lambda job, step, timestep: None)
    return [
        [accumulator.heatmaps(request.heatmap_words, (SIZE, SIZE)) for accumulator in job.heatmaps]
        for job, request in zip(jobs, requests)
    ]


class CapturingProcessor(AttnProcessor):
    """diffusers' eager processor, keeping the conditional row's probabilities (batch [u, c])."""

    def __init__(self, name, captured):
        self.name, self.captured = name, captured

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # (B * H, Lq, Lk)
        self.captured.append(probs.reshape(-1, attn.heads, *probs.shape[1:])[1].float())
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def daam_reference(plain_pipe, positions):
    """The paper's aggregation, eagerly, from diffusers' own cross-attention probabilities."""
    captured = []
    processors = {
        name: CapturingProcessor(name, captured)
        if ".attn2" in name and not name.startswith("mid_block")
        else proc
        for name, proc in plain_pipe.unet.attn_processors.items()
    }
    original = plain_pipe.unet.attn_processors
    plain_pipe.unet.set_attn_processor(processors)
    try:
        reference_images(plain_pipe)
    finally:
        plain_pipe.unet.set_attn_processor(original)
    latent = SIZE // plain_pipe.vae_scale_factor
    per_step = 2  # cross-attention layers outside the mid block
    total = torch.zeros(77, latent, latent)
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


def test_heatmaps_are_daams_aggregation_of_diffusers_maps(served, plain_pipe):
    denoiser, _ = served
    request = heatmap_request(denoiser)
    assert [w.positions for w in request.heatmap_words] == [(5,), (1, 2)]
    [[maps]] = heatmaps_of(denoiser, [request])
    for word, heatmap in zip(request.heatmap_words, maps):
        expected = daam_reference(plain_pipe, word.positions)
        assert heatmap.shape == (SIZE, SIZE)
        torch.testing.assert_close(heatmap, expected, atol=1e-5, rtol=0)


def test_heatmaps_leave_the_images_alone(served, plain_pipe):
    denoiser, _ = served
    [images] = generate(denoiser, [heatmap_request(denoiser)])
    assert np.array_equal(images, reference_images(plain_pipe))


def test_heatmaps_in_a_mixed_batch_are_those_alone(served):
    denoiser, geometry = served
    requests = [
        image_request(denoiser, pag(geometry), seed=1),
        heatmap_request(denoiser, seed=2, num_images=2),
        heatmap_request(denoiser, perturbed=pag(geometry), seed=3),
    ]
    together = heatmaps_of(denoiser, requests)
    for request, maps in zip(requests[1:], together[1:]):
        [alone] = heatmaps_of(denoiser, [request])
        for image_maps, alone_maps in zip(maps, alone):
            for a, b in zip(image_maps, alone_maps):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_words_missing_from_the_prompt_are_refused(served):
    denoiser, _ = served
    tokenizer = denoiser.pipe.tokenizer
    violations = Violations()
    ids = tokenizer(PROMPT).input_ids
    compile_words(gpb.WordHeatmapsSpec(words=["cat", "dog", " "]), ids, tokenizer, 1024, 10**6, violations)
    assert [v.field for v in violations.items] == ["word_heatmaps.words[1]", "word_heatmaps.words[2]"]
    violations = Violations()
    compile_words(gpb.WordHeatmapsSpec(words=["cat"] * 3), ids, tokenizer, 1024, 2048, violations)
    assert [v.field for v in violations.items] == ["word_heatmaps.words"]
