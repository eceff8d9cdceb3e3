"""DAAM word heatmaps on the tiny pipeline: equal to the paper's aggregation of the cross-attention
maps diffusers' own attention computes, free of side effects on the images, and the same for a
request in a mixed batch as alone; the content-vs-style IoU curve of two word sets' maps."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attnserve.api.image_inputs import to_image_request
from attnserve.attention.heatmaps import IOU_THRESHOLDS
from attnserve.readouts.word_heatmaps import compile_words
from attnserve.spec.errors import InvalidRequest, Violations
from attnserve_client.v1 import image_generation_pb2 as gpb
from attnserve_client.v1 import intervention_pb2 as ipb
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


def daam_token_maps(plain_pipe):
    """The paper's aggregation per text token, eagerly, from diffusers' own cross-attention
    probabilities: (77, latent, latent)."""
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
    return total


def normalised_image(latent_map):
    image = F.interpolate(latent_map[None, None], size=(SIZE, SIZE), mode="bicubic")[0, 0]
    return (image - image.min()) / (image.max() - image.min())


def daam_reference(plain_pipe, positions):
    return normalised_image(daam_token_maps(plain_pipe)[list(positions)].mean(0))


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


CONTENT, STYLE = ["cat"], ["photo", "a"]


def content_style_request(**word_heatmaps):
    return gpb.GenerateImageRequest(
        model="tiny-sd",
        prompt=PROMPT,
        width=SIZE,
        height=SIZE,
        steps=3,
        guidance_scale=7.5,
        seed=0,
        word_heatmaps=gpb.WordHeatmapsSpec(**word_heatmaps),
    )


def test_content_style_iou_is_the_overlap_of_diffusers_maps(served, served_model, plain_pipe):
    """Each set's map the normalised mean of its words' DAAM maps, from diffusers' own
    probabilities; the IoU from its definition at 0.1 .. 0.9."""
    denoiser, _ = served
    request = to_image_request(
        content_style_request(content_words=CONTENT, style_words=STYLE),
        served_model,
        served_model.engine,
    )
    assert request.heatmap_words == ()
    assert [w.positions for w in request.content_style.style] == [(2,), (1, 4)]
    jobs = [denoiser.start(request)]
    denoiser.run(jobs, 3, lambda job, step, timestep: None)
    [accumulator] = jobs[0].heatmaps
    got = accumulator.content_style_iou(request.content_style, (SIZE, SIZE))

    token_maps = daam_token_maps(plain_pipe)
    content = normalised_image(token_maps[5])
    style = normalised_image((token_maps[2] + token_maps[[1, 4]].mean(0)) / 2)
    expected = []
    for t in IOU_THRESHOLDS:
        a, b = content >= t, style >= t
        expected.append(float((a & b).sum()) / float((a | b).sum()))
    assert len(got) == 9
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert len(set(got)) > 1  # a curve, not a constant


@pytest.mark.parametrize(
    ("fields", "word_heatmaps"),
    [
        (["word_heatmaps.style_words"], {"content_words": CONTENT}),
        (["word_heatmaps.content_words[1]"], {"content_words": ["cat", "dog"], "style_words": STYLE}),
        (["word_heatmaps.style_words"], {"content_words": CONTENT, "style_words": ["a"] * 17}),
    ],
)
def test_content_style_violations_name_the_field(served_model, fields, word_heatmaps):
    with pytest.raises(InvalidRequest) as caught:
        to_image_request(content_style_request(**word_heatmaps), served_model, served_model.engine)
    assert [v.field for v in caught.value.violations] == fields


def test_content_style_is_refused_with_cross_attention_edits(served_model):
    request = content_style_request(content_words=CONTENT, style_words=STYLE)
    request.interventions.interventions.add(
        selector=ipb.Selector(attention=ipb.ATTENTION_KIND_CROSS), temperature=ipb.Temperature(temperature=2)
    )
    with pytest.raises(InvalidRequest) as caught:
        to_image_request(request, served_model, served_model.engine)
    assert [v.field for v in caught.value.violations] == ["word_heatmaps"]
