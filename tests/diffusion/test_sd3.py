"""SD3 (joint attention) on the diffusers engine: the geometry, rows without plans left as diffusers
computes them, PAG and SoftPAG against diffusers' SD3 PAG pipeline and each other, interventions
per row, and a mixed batch against its requests alone."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from attnserve.attention.plan import (
    HeadOutputScale,
    IdentityBlend,
    KeyEmphasis,
    KeySet,
    RequestPlan,
    RowPlan,
    ScopedOp,
    StepRange,
)
from attnserve.engines.diffusers.attention import UNetCall
from attnserve.engines.diffusers.engine import load_pipeline
from attnserve.engines.diffusers.families import SD3Family
from attnserve.engines.diffusers.joint_attention import PlannedJointAttnProcessor
from attnserve.spec.errors import Violations
from attnserve.spec.geometry import AttentionKind, Component
from attnserve.spec.guidance import PerturbedGuidance, compile_guidance
from attnserve_client.v1 import image_generation_pb2 as gpb
from attnserve_client.v1 import intervention_pb2 as ipb
from diffusers.models.attention_processor import (
    JointAttnProcessor2_0,
    PAGCFGJointAttnProcessor2_0,
    PAGJointAttnProcessor2_0,
)

from .helpers import PROMPT, SIZE, STEPS, generate, image_request, reference_images

TOLERANCE = 1e-5
JOINT_LAYERS = ("transformer_blocks.0.attn", "transformer_blocks.1.attn")


def compiled(msg: gpb.PerturbedAttentionGuidance, geometry):
    violations = Violations()
    guidance = compile_guidance(msg, "pag", geometry, violations)
    return guidance, {v.field: v.description for v in violations.items}


def pag(geometry, scale=3.0, adaptive_scale=0.0, layers=()):
    guidance, violations = compiled(
        gpb.PerturbedAttentionGuidance(scale=scale, adaptive_scale=adaptive_scale, layers=layers), geometry
    )
    assert violations == {}
    return guidance


def soft_pag(geometry, u, heads=(), layers=(1,)):
    soft = gpb.SoftPerturbation(heads=[ipb.LayerHeads(layer=layer, heads=heads) for layer in layers], u=u)
    guidance, violations = compiled(gpb.PerturbedAttentionGuidance(soft=soft), geometry)
    assert violations == {}
    return guidance


def test_geometry_lists_the_joint_attention_layers(sd3_served):
    _, geometry = sd3_served
    assert [layer.name for layer in geometry.layers] == list(JOINT_LAYERS)
    assert {layer.kind for layer in geometry.layers} == {AttentionKind.JOINT}
    assert {layer.component for layer in geometry.layers} == {Component.DIT_BLOCK}
    assert [(layer.num_heads, layer.head_dim, layer.causal) for layer in geometry.layers] == [
        (4, 8, False)
    ] * 2


def test_no_plans_is_bit_identical_to_the_unmodified_pipeline(sd3_served, sd3_plain_pipe):
    denoiser, _ = sd3_served
    for seed, num_images in ((0, 1), (3, 2)):
        [ours] = generate(denoiser, [image_request(denoiser, seed=seed, num_images=num_images)])
        assert np.array_equal(ours, reference_images(sd3_plain_pipe, seed=seed, num_images=num_images))


def test_default_pag_layers_are_diffusers_sd3_choice(sd3_served, sd3_pag_pipe):
    _, geometry = sd3_served
    chosen = {geometry.layers[index].name for index in pag(geometry).layer_ops}
    sd3_pag_pipe._set_pag_attn_processor(sd3_pag_pipe.pag_applied_layers, do_classifier_free_guidance=True)
    try:
        theirs = {
            name.removesuffix(".processor")
            for name, processor in sd3_pag_pipe.transformer.attn_processors.items()
            if isinstance(processor, PAGCFGJointAttnProcessor2_0)
        }
    finally:
        sd3_pag_pipe.transformer.set_attn_processor(JointAttnProcessor2_0())
    assert chosen == theirs == {"transformer_blocks.1.attn"}


@pytest.mark.parametrize(("scale", "adaptive_scale"), [(3.0, 0.0), (5.0, 0.004)])
def test_pag_equals_diffusers_sd3_pag_pipeline(sd3_served, sd3_pag_pipe, scale, adaptive_scale):
    denoiser, geometry = sd3_served
    [ours] = generate(denoiser, [image_request(denoiser, pag(geometry, scale, adaptive_scale))])
    theirs = reference_images(sd3_pag_pipe, pag_scale=scale, pag_adaptive_scale=adaptive_scale)
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_pag_on_every_layer_without_classifier_free_guidance(sd3_served, sd3_pag_pipe):
    """guidance_scale 1: diffusers runs PAGJointAttnProcessor2_0 (conditional and perturbed rows)."""
    denoiser, geometry = sd3_served
    request = dataclasses.replace(
        image_request(denoiser, pag(geometry, layers=("blocks",))), guidance_scale=1.0
    )
    [ours] = generate(denoiser, [request])
    processors = (PAGCFGJointAttnProcessor2_0(), PAGJointAttnProcessor2_0())
    sd3_pag_pipe.set_pag_applied_layers(["blocks"], pag_attn_processors=processors)
    try:
        theirs = sd3_pag_pipe(
            PROMPT,
            num_inference_steps=STEPS,
            height=SIZE,
            width=SIZE,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
    finally:
        sd3_pag_pipe.set_pag_applied_layers(["blocks.1"], pag_attn_processors=processors)
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_soft_pag_u1_on_every_head_is_pag_and_u0_is_plain(sd3_served, sd3_plain_pipe):
    denoiser, geometry = sd3_served
    [hard] = generate(denoiser, [image_request(denoiser, pag(geometry))])
    [soft1] = generate(denoiser, [image_request(denoiser, soft_pag(geometry, 1.0, heads=(0, 1, 2, 3)))])
    [soft0] = generate(denoiser, [image_request(denoiser, soft_pag(geometry, 0.0))])
    assert np.abs(soft1 - hard).max() < TOLERANCE
    assert np.abs(soft0 - reference_images(sd3_plain_pipe)).max() < TOLERANCE
    [one_head] = generate(denoiser, [image_request(denoiser, soft_pag(geometry, 1.0, heads=(2,)))])
    assert np.abs(one_head - hard).max() > 1e-3 and np.abs(one_head - soft0).max() > 1e-3


def test_soft_pag_between_0_and_1_is_refused_on_joint_layers(sd3_served):
    _, geometry = sd3_served
    soft = gpb.SoftPerturbation(heads=[ipb.LayerHeads(layer=0, heads=[1])], u=0.5)
    _, violations = compiled(gpb.PerturbedAttentionGuidance(soft=soft), geometry)
    assert list(violations) == ["pag.soft.u"] and "joint attention" in violations["pag.soft.u"]


def test_pag_layer_ids_are_validated(sd3_served):
    _, geometry = sd3_served
    _, violations = compiled(gpb.PerturbedAttentionGuidance(layers=["blocks.1", "mid"]), geometry)
    assert list(violations) == ["pag.layers[1]"] and "matches no" in violations["pag.layers[1]"]


def emphasis_plan(geometry, alpha=0.05, ranges=((1, 4),)) -> RequestPlan:
    """key_emphasis on text tokens 1..3 and a head output scale, on every joint layer."""
    ops = (
        (StepRange(), ScopedOp(KeyEmphasis(alpha), keys=KeySet(ranges=ranges))),
        (StepRange(), ScopedOp(HeadOutputScale(0.5), heads=(1,))),
    )
    return RequestPlan(layer_ops={layer.index: ops for layer in geometry.layers})


def test_mixed_batch_gives_each_request_what_it_gives_alone(sd3_served, sd3_plain_pipe):
    denoiser, geometry = sd3_served
    requests = [
        image_request(denoiser, seed=1),
        image_request(denoiser, pag(geometry), seed=2),
        image_request(denoiser, soft_pag(geometry, 1.0, heads=(1, 2), layers=(0, 1)), seed=3, num_images=2),
        image_request(denoiser, pag(geometry, 4.0, 0.004), seed=4, plan=emphasis_plan(geometry)),
        image_request(denoiser, seed=5, plan=emphasis_plan(geometry)),
    ]
    together = generate(denoiser, requests)
    for request, images in zip(requests, together):
        [alone] = generate(denoiser, [request])
        assert images.shape == alone.shape
        assert np.abs(images - alone).max() < TOLERANCE
    assert np.abs(together[0] - reference_images(sd3_plain_pipe, seed=1)).max() < TOLERANCE
    assert np.abs(together[4] - reference_images(sd3_plain_pipe, seed=5)).max() > 1e-3


def joint_inputs(sd3_served, batch=3, image_tokens=16, seed=0):
    denoiser, _ = sd3_served
    attn = denoiser.pipe.transformer.get_submodule(JOINT_LAYERS[0])
    generator = torch.Generator().manual_seed(seed)
    text = denoiser.family.num_text_tokens
    image = torch.randn(batch, image_tokens, attn.query_dim, generator=generator)
    context = torch.randn(batch, text, attn.query_dim, generator=generator)
    return attn, image, context


def eager_joint(attn, image, context, bias):
    """The joint attention written out (image tokens first, as diffusers), with an additive logit
    bias (H, L, L) over the concatenated tokens; outputs projected as JointAttnProcessor2_0 does."""
    q = torch.cat([attn.to_q(image), attn.add_q_proj(context)], dim=0).double()
    k = torch.cat([attn.to_k(image), attn.add_k_proj(context)], dim=0).double()
    v = torch.cat([attn.to_v(image), attn.add_v_proj(context)], dim=0).double()
    heads = attn.heads
    q, k, v = (x.view(x.shape[0], heads, -1).transpose(0, 1) for x in (q, k, v))
    probs = torch.softmax(q @ k.transpose(1, 2) * attn.scale + bias, dim=-1)
    out = (probs @ v).transpose(0, 1).reshape(q.shape[1], -1).float()
    n = image.shape[0]
    return attn.to_out[0](out[:n]), attn.to_add_out(out[n:])


@torch.no_grad()
def test_plans_act_on_the_joint_rows_and_text_positions_they_name(sd3_served):
    """One call of a joint layer: row 0 plain, row 1 key_emphasis on text tokens 1..3, row 2 PAG's
    perturbation, each against the joint attention written out."""
    denoiser, geometry = sd3_served
    attn, image, context = joint_inputs(sd3_served)
    layer = geometry.layers[0]
    call = UNetCall()
    processor = PlannedJointAttnProcessor(layer, call)
    num_image, num_text = image.shape[1], context.shape[1]
    perturbation = denoiser.family.perturbation(
        PerturbedGuidance(3.0, 0.0, {0: (ScopedOp(IdentityBlend(1.0)),)}).layer_ops, geometry
    )[0]
    alpha = 0.05
    plans = [
        None,
        RowPlan(ops=(ScopedOp(KeyEmphasis(alpha), keys=KeySet(ranges=((1, 4),))),)),
        RowPlan(ops=perturbation),
    ]
    call.row_plans = lambda index: plans
    out, text_out = processor(attn, image, context)

    size = num_image + num_text
    emphasis = torch.zeros(attn.heads, size, size, dtype=torch.float64)
    emphasis[:, :, num_image + 1 : num_image + 4] = math.log(alpha)
    diagonal = torch.zeros(attn.heads, size, size, dtype=torch.float64)
    diagonal[:, :num_image, :num_image] = -math.inf
    diagonal[:, range(num_image), range(num_image)] = 0.0
    for row, bias in enumerate((torch.zeros_like(emphasis), emphasis, diagonal)):
        expected, expected_text = eager_joint(attn, image[row], context[row], bias)
        torch.testing.assert_close(out[row], expected, atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(text_out[row], expected_text, atol=TOLERANCE, rtol=TOLERANCE)
    call.row_plans = None
    unplanned, unplanned_text = processor(attn, image, context)
    reference, reference_text = JointAttnProcessor2_0()(attn, image, context)
    assert torch.equal(unplanned, reference) and torch.equal(unplanned_text, reference_text)


def test_pipelines_of_other_families_are_refused_at_load(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    with pytest.raises(
        ValueError, match="PixArtAlphaPipeline pipelines are not served.*StableDiffusion3Pipeline"
    ):
        load_pipeline(tmp_path)


def test_image_sides_are_multiples_the_patches_tile(sd3_served):
    denoiser, _ = sd3_served
    assert denoiser.family.size_multiple == 8  # tiny-sd3: VAE 2 x patch 2
    sd3_shaped = SimpleNamespace(
        transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2)), vae_scale_factor=8
    )
    assert SD3Family(sd3_shaped).size_multiple == 16
