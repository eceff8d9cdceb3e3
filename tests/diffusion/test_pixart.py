"""PixArt-Sigma (a DiT with cross-attention over T5 tokens) on the diffusers engine: the geometry,
requests without plans left as diffusers' pipeline computes them (text padding masked), PAG against
diffusers' PixArt-Sigma PAG pipeline, a mixed batch against its requests alone, word heatmaps."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attnserve.attention.plan import KeyEmphasis, KeySet, RequestPlan, RowPlan, ScopedOp, StepRange
from attnserve.engines.diffusers.attention import PlannedAttnProcessor, UNetCall
from attnserve.engines.diffusers.denoise import Denoiser
from attnserve.engines.diffusers.families import PixArtFamily
from attnserve.readouts.word_heatmaps import compile_words
from attnserve.spec.errors import Violations
from attnserve.spec.geometry import AttentionKind, Component
from attnserve.spec.guidance import compile_guidance
from attnserve_client.v1 import image_generation_pb2 as gpb
from diffusers.models.attention_processor import AttnProcessor2_0, PAGCFGIdentitySelfAttnProcessor2_0

from .helpers import GUIDANCE, PROMPT, SIZE, STEPS, generate, image_request

TOLERANCE = 1e-5
LAYERS = (
    "transformer_blocks.0.attn1",
    "transformer_blocks.0.attn2",
    "transformer_blocks.1.attn1",
    "transformer_blocks.1.attn2",
)
#: As attnserve runs PixArt: the asked size, the caption as it is.
PIPELINE_OPTIONS = {"use_resolution_binning": False, "clean_caption": False}


def reference_images(pipe, seed=0, num_images=1, prompt=PROMPT, **kwargs):
    return pipe(
        prompt,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        num_images_per_prompt=num_images,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **PIPELINE_OPTIONS,
        **({"guidance_scale": GUIDANCE} | kwargs),
    ).images


def pag(geometry, scale=3.0, adaptive_scale=0.0):
    violations = Violations()
    msg = gpb.PerturbedAttentionGuidance(scale=scale, adaptive_scale=adaptive_scale)
    guidance = compile_guidance(msg, "pag", geometry, violations)
    assert violations.items == []
    return guidance


def emphasis_plan(geometry, alpha=0.05, ranges=((1, 3),)) -> RequestPlan:
    """key_emphasis on T5 tokens 1..2 ("photo of") on every cross-attention layer."""
    ops = ((StepRange(), ScopedOp(KeyEmphasis(alpha), keys=KeySet(ranges=ranges))),)
    return RequestPlan(
        layer_ops={layer.index: ops for layer in geometry.layers if layer.kind is AttentionKind.CROSS}
    )


def test_geometry_lists_self_and_cross_attention_of_the_dit_blocks(pixart_served):
    denoiser, geometry = pixart_served
    assert [layer.name for layer in geometry.layers] == list(LAYERS)
    assert [layer.kind for layer in geometry.layers] == [AttentionKind.SELF, AttentionKind.CROSS] * 2
    assert {layer.component for layer in geometry.layers} == {Component.DIT_BLOCK}
    assert denoiser.family.max_text_tokens == 300


def test_image_sides_are_multiples_the_patches_tile(pixart_served):
    denoiser, _ = pixart_served
    assert denoiser.family.size_multiple == 8  # tiny-pixart: VAE 2 x patch 2
    pixart_shaped = SimpleNamespace(
        transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2)), vae_scale_factor=8
    )
    assert PixArtFamily(pixart_shaped).size_multiple == 16


def test_prompts_are_tokenized_as_the_pipeline_preprocesses_them(pixart_served):
    denoiser, _ = pixart_served
    tokenizer = denoiser.family.tokenizer
    assert tokenizer("  A Photo of a CAT ").input_ids == tokenizer(PROMPT).input_ids
    assert tokenizer(PROMPT).input_ids[-1] == denoiser.pipe.tokenizer.eos_token_id


def test_no_plans_is_bit_identical_to_the_unmodified_pipeline(pixart_served, pixart_plain_pipe):
    denoiser, _ = pixart_served
    for seed, num_images in ((0, 1), (3, 2)):
        [ours] = generate(denoiser, [image_request(denoiser, seed=seed, num_images=num_images)])
        assert np.array_equal(ours, reference_images(pixart_plain_pipe, seed=seed, num_images=num_images))


def test_default_pag_layers_are_diffusers_pixart_choice(pixart_served, pixart_pag_pipe):
    _, geometry = pixart_served
    chosen = {geometry.layers[index].name for index in pag(geometry).layer_ops}
    pipe = pixart_pag_pipe
    pipe._set_pag_attn_processor(pipe.pag_applied_layers, do_classifier_free_guidance=True)
    try:
        theirs = {
            name.removesuffix(".processor")
            for name, processor in pipe.transformer.attn_processors.items()
            if isinstance(processor, PAGCFGIdentitySelfAttnProcessor2_0)
        }
    finally:
        pipe.transformer.set_attn_processor(AttnProcessor2_0())
    assert chosen == theirs == {"transformer_blocks.1.attn1"}


@pytest.mark.parametrize("guidance_scale", [GUIDANCE, 1.0])
def test_pag_equals_diffusers_pixart_sigma_pag_pipeline(pixart_served, pixart_pag_pipe, guidance_scale):
    """A constant scale: diffusers' PixArt PAG pipeline fails with an adaptive one (it hands the
    guidance the timestep expanded to the batch)."""
    denoiser, geometry = pixart_served
    request = dataclasses.replace(image_request(denoiser, pag(geometry, 4.0)), guidance_scale=guidance_scale)
    [ours] = generate(denoiser, [request])
    theirs = reference_images(pixart_pag_pipe, pag_scale=4.0, guidance_scale=guidance_scale)
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_mixed_batch_gives_each_request_what_it_gives_alone(pixart_served, pixart_plain_pipe):
    """Prompts of different lengths (different text padding), plain, PAG and key_emphasis on the
    cross-attention keys."""
    denoiser, geometry = pixart_served
    requests = [
        image_request(denoiser, seed=1),
        image_request(denoiser, pag(geometry), seed=2, prompt="a red house by the sea at night"),
        image_request(denoiser, seed=3, num_images=2, plan=emphasis_plan(geometry)),
        image_request(denoiser, pag(geometry, 4.0, 0.004), seed=4, plan=emphasis_plan(geometry)),
    ]
    together = generate(denoiser, requests)
    for request, images in zip(requests, together):
        [alone] = generate(denoiser, [request])
        assert images.shape == alone.shape
        assert np.abs(images - alone).max() < TOLERANCE
    assert np.abs(together[0] - reference_images(pixart_plain_pipe, seed=1)).max() < TOLERANCE
    assert np.abs(together[2] - reference_images(pixart_plain_pipe, seed=3, num_images=2)).max() > 1e-3


@torch.no_grad()
def test_planned_cross_attention_sees_only_each_rows_unpadded_text_keys(pixart_served):
    """One cross-attention call with PixArt's padding bias: rows with an identity plan match
    diffusers' masked SDPA, and key_emphasis on a row's tokens 1..2 is the bias written out."""
    denoiser, geometry = pixart_served
    layer = geometry.layers[1]
    attn = denoiser.pipe.transformer.get_submodule(layer.name)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, 16, attn.query_dim, generator=generator)
    text = torch.randn(3, 300, attn.cross_attention_dim, generator=generator)
    lengths = torch.tensor([5, 12, 300])
    mask = (torch.arange(300)[None] < lengths[:, None]).float()
    bias = ((1 - mask) * -10000.0)[:, None]  # as PixArtTransformer2DModel passes it
    call = UNetCall()
    processor = PlannedAttnProcessor(layer, call)
    reference = AttnProcessor2_0()(attn, image, text, attention_mask=bias)
    call.row_plans = lambda index: [RowPlan(), None, RowPlan()]
    torch.testing.assert_close(processor(attn, image, text, attention_mask=bias), reference)
    alpha = 0.05
    emphasis = RowPlan(ops=(ScopedOp(KeyEmphasis(alpha), keys=KeySet(ranges=((1, 3),))),))
    call.row_plans = lambda index: [None, emphasis, None]
    out = processor(attn, image, text, attention_mask=bias)
    q = attn.to_q(image[1]).double().view(16, attn.heads, -1).transpose(0, 1)
    k, v = (
        proj(text[1, :12]).double().view(12, attn.heads, -1).transpose(0, 1)
        for proj in (attn.to_k, attn.to_v)
    )
    logits = q @ k.transpose(1, 2) * attn.scale
    logits[:, :, 1:3] += np.log(alpha)
    expected = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(16, -1).float()
    torch.testing.assert_close(out[1], attn.to_out[0](expected), atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(out[0], reference[0])


class CapturingMaskedProcessor(AttnProcessor2_0):
    """diffusers' processor, keeping the conditional row's (batch [u, c]) cross-attention
    probabilities, written out with the text mask's bias."""

    def __init__(self, captured):
        super().__init__()
        self.captured = captured

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            q = attn.to_q(hidden_states[1]).double().view(hidden_states.shape[1], attn.heads, -1)
            k = (
                attn.to_k(encoder_hidden_states[1])
                .double()
                .view(encoder_hidden_states.shape[1], attn.heads, -1)
            )
            logits = q.transpose(0, 1) @ k.permute(1, 2, 0) * attn.scale + attention_mask[1].double()
            self.captured.append(torch.softmax(logits, dim=-1).float())
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)


def daam_reference(plain_pipe, positions):
    captured = []
    original = plain_pipe.transformer.attn_processors
    plain_pipe.transformer.set_attn_processor(CapturingMaskedProcessor(captured))
    try:
        reference_images(plain_pipe)
    finally:
        plain_pipe.transformer.set_attn_processor(original)
    latent = SIZE // plain_pipe.vae_scale_factor
    per_step = 2  # cross-attention layers
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


def test_heatmaps_are_daams_aggregation_of_diffusers_masked_cross_attention(pixart_served, pixart_plain_pipe):
    denoiser, _ = pixart_served
    request = image_request(denoiser)
    violations = Violations()
    words = compile_words(
        gpb.WordHeatmapsSpec(words=["cat", "photo"]),
        request.prompt_token_ids,
        denoiser.family.tokenizer,
        4096,
        10**6,
        violations,
    )
    assert violations.items == []
    request = dataclasses.replace(request, heatmap_words=words)
    jobs = [denoiser.start(request)]
    denoiser.run(jobs, STEPS, lambda job, step, timestep: None)
    maps = jobs[0].heatmaps[0].heatmaps(words, (SIZE, SIZE))
    for word, heatmap in zip(words, maps):
        assert heatmap.shape == (SIZE, SIZE)
        torch.testing.assert_close(
            heatmap, daam_reference(pixart_plain_pipe, word.positions), atol=1e-5, rtol=0
        )
    assert np.array_equal(denoiser.images(jobs[0], "np"), reference_images(pixart_plain_pipe))


def test_no_cross_attention_shares_are_sampled(pixart_served):
    """The share metric splits CLIP tokens at their start token, which T5 tokens lack."""
    denoiser, geometry = pixart_served
    sampling = Denoiser(denoiser.pipe, denoiser.call, geometry, statistics_sample_rate=1.0)
    shares = []
    job = sampling.start(image_request(sampling))
    sampling.run([job], STEPS, lambda job, step, timestep: None, on_cross_attention_shares=shares.append)
    assert sampling.cross_layers == frozenset() and shares == []
