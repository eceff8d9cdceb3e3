"""SDXL on the diffusers engine: the geometry, conditioning and decoding as diffusers' SDXL
pipeline does them (rows without plans bit-identical to it), PAG against diffusers' SDXL PAG
pipeline, a mixed batch against its requests alone, word heatmaps and layout grids."""

import dataclasses

import numpy as np
import pytest
import torch
from attnserve.attention.plan import HeadOutputScale, KeyEmphasis, KeySet, RequestPlan, ScopedOp, StepRange
from attnserve.engines.diffusers.attention import install_processors
from attnserve.engines.diffusers.denoise import Denoiser
from attnserve.engines.diffusers.engine import load_pipeline
from attnserve.engines.diffusers.families import SDXLFamily
from attnserve.spec.errors import Violations
from attnserve.spec.geometry import AttentionKind, Component
from attnserve.spec.guidance import compile_guidance
from attnserve_client.v1 import image_generation_pb2 as gpb
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0, PAGCFGIdentitySelfAttnProcessor2_0

from .helpers import SIZE, generate, image_request, reference_images, soft_pag
from .test_word_heatmaps import WORDS, heatmap_request, heatmaps_of

TOLERANCE = 1e-5
BLOCKS = (
    "down_blocks.1.attentions.0",
    "up_blocks.0.attentions.0",
    "up_blocks.0.attentions.1",
    "mid_block.attentions.0",
)


def pag(geometry, scale=3.0, adaptive_scale=0.0):
    """PAG on the layers attnserve chooses by default."""
    violations = Violations()
    guidance = compile_guidance(
        gpb.PerturbedAttentionGuidance(scale=scale, adaptive_scale=adaptive_scale),
        "pag",
        geometry,
        violations,
    )
    assert violations.items == []
    return guidance


def test_geometry_lists_self_and_cross_attention_of_every_transformer_layer(sdxl_served):
    denoiser, geometry = sdxl_served
    assert isinstance(denoiser.family, SDXLFamily)
    assert [layer.name for layer in geometry.layers] == [
        f"{block}.transformer_blocks.{depth}.{attn}"
        for block in BLOCKS
        for depth in (0, 1)
        for attn in ("attn1", "attn2")
    ]
    assert [layer.kind for layer in geometry.layers] == [AttentionKind.SELF, AttentionKind.CROSS] * 8
    assert {layer.component for layer in geometry.layers} == {Component.UNET_BLOCK}
    assert [(layer.num_heads, layer.head_dim, layer.causal) for layer in geometry.layers] == [
        (4, 16, False)
    ] * 16


def test_no_plans_is_bit_identical_to_the_unmodified_pipeline(sdxl_served, sdxl_plain_pipe):
    """The empty negative prompt is zeros, as the pipeline's force_zeros_for_empty_prompt makes it."""
    denoiser, _ = sdxl_served
    for seed, num_images in ((0, 1), (3, 2)):
        [ours] = generate(denoiser, [image_request(denoiser, seed=seed, num_images=num_images)])
        assert np.array_equal(ours, reference_images(sdxl_plain_pipe, seed=seed, num_images=num_images))


def test_a_negative_prompt_is_encoded_as_the_pipeline_encodes_it(sdxl_served, sdxl_plain_pipe):
    denoiser, _ = sdxl_served
    negative = tuple(denoiser.pipe.tokenizer("a dog").input_ids)
    request = dataclasses.replace(image_request(denoiser), negative_token_ids=negative)
    [ours] = generate(denoiser, [request])
    theirs = reference_images(sdxl_plain_pipe, negative_prompt="a dog")
    assert np.array_equal(ours, theirs)
    assert np.abs(ours - reference_images(sdxl_plain_pipe)).max() > 1e-3


def test_default_pag_layers_are_diffusers_sdxl_choice(sdxl_served, sdxl_pag_pipe):
    _, geometry = sdxl_served
    chosen = {geometry.layers[index].name for index in pag(geometry).layer_ops}
    sdxl_pag_pipe._set_pag_attn_processor(sdxl_pag_pipe.pag_applied_layers, do_classifier_free_guidance=True)
    try:
        theirs = {
            name.removesuffix(".processor")
            for name, processor in sdxl_pag_pipe.unet.attn_processors.items()
            if isinstance(processor, PAGCFGIdentitySelfAttnProcessor2_0)
        }
    finally:
        sdxl_pag_pipe.unet.set_attn_processor(AttnProcessor2_0())
    assert (
        chosen == theirs == {f"mid_block.attentions.0.transformer_blocks.{depth}.attn1" for depth in (0, 1)}
    )


@pytest.mark.parametrize(("scale", "adaptive_scale"), [(3.0, 0.0), (5.0, 0.006)])
def test_pag_equals_diffusers_sdxl_pag_pipeline(sdxl_served, sdxl_pag_pipe, scale, adaptive_scale):
    denoiser, geometry = sdxl_served
    [ours] = generate(denoiser, [image_request(denoiser, pag(geometry, scale, adaptive_scale))])
    theirs = reference_images(sdxl_pag_pipe, pag_scale=scale, pag_adaptive_scale=adaptive_scale)
    assert np.abs(ours - theirs).max() < TOLERANCE


def emphasis_plan(geometry, alpha=0.05) -> RequestPlan:
    """key_emphasis on text tokens 1..3 of every cross-attention layer, a head output scale on
    every self-attention layer."""
    emphasis = ((StepRange(), ScopedOp(KeyEmphasis(alpha), keys=KeySet(ranges=((1, 4),)))),)
    scale = ((StepRange(), ScopedOp(HeadOutputScale(0.5), heads=(1,))),)
    return RequestPlan(
        layer_ops={
            layer.index: emphasis if layer.kind is AttentionKind.CROSS else scale for layer in geometry.layers
        }
    )


def test_mixed_batch_gives_each_request_what_it_gives_alone(sdxl_served, sdxl_plain_pipe):
    denoiser, geometry = sdxl_served
    requests = [
        image_request(denoiser, seed=1),
        image_request(denoiser, pag(geometry), seed=2),
        image_request(denoiser, soft_pag(geometry, 0.5, heads=(1, 2)), seed=3, num_images=2),
        image_request(denoiser, seed=4, plan=emphasis_plan(geometry)),
    ]
    together = generate(denoiser, requests)
    for request, images in zip(requests, together):
        [alone] = generate(denoiser, [request])
        assert images.shape == alone.shape
        assert np.abs(images - alone).max() < TOLERANCE
    assert np.abs(together[0] - reference_images(sdxl_plain_pipe, seed=1)).max() < TOLERANCE
    assert np.abs(together[3] - reference_images(sdxl_plain_pipe, seed=4)).max() > 1e-3


def test_a_float16_vae_that_asks_for_it_decodes_in_float32(tiny_sdxl_path):
    """As the SDXL pipeline decodes (SDXL's VAE overflows in float16 and sets force_upcast)."""
    ours = load_pipeline(tiny_sdxl_path, dtype="float16")
    theirs = StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl_path, dtype=torch.float16, local_files_only=True, add_watermarker=False
    )
    theirs.set_progress_bar_config(disable=True)
    geometry, call = install_processors(ours.unet)
    denoiser = Denoiser(ours, call, geometry)
    images = {}
    for force_upcast in (False, True):
        for pipe in (ours, theirs):
            pipe.vae.register_to_config(force_upcast=force_upcast)
        [images[force_upcast]] = generate(denoiser, [image_request(denoiser)])
        assert np.array_equal(images[force_upcast], reference_images(theirs))
        assert ours.vae.dtype == torch.float16
    assert np.abs(images[True] - images[False]).max() > 0


def test_word_heatmaps_read_the_cross_attention_without_changing_the_images(sdxl_served, sdxl_plain_pipe):
    denoiser, geometry = sdxl_served
    cross = {layer.index for layer in geometry.layers if layer.kind is AttentionKind.CROSS}
    assert denoiser.heatmap_layers == {
        i for i in cross if not geometry.layers[i].name.startswith("mid_block")
    }
    request = heatmap_request(denoiser, num_images=2)
    [[first, second]] = heatmaps_of(denoiser, [request])
    for heatmaps in (first, second):
        assert len(heatmaps) == len(WORDS)
        for values in heatmaps:
            assert values.shape == (SIZE, SIZE)
            assert values.min() == 0 and values.max() == pytest.approx(1)
    assert not torch.equal(first[0], second[0])  # each image's own maps
    [images] = generate(denoiser, [request])
    assert np.array_equal(images, reference_images(sdxl_plain_pipe, num_images=2))


def test_layouts_see_each_cross_attention_layer_at_its_grid(sdxl_served):
    """tiny-sdxl halves the latent grid once (its first block's downsampler): every cross-attention
    layer runs there."""
    denoiser, geometry = sdxl_served
    cross = [layer.index for layer in geometry.layers if layer.kind is AttentionKind.CROSS]
    assert denoiser.family.query_downsamplings(geometry) == dict.fromkeys(cross, 1)
