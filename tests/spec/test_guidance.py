"""PAG/SoftPAG compilation (spec/guidance.py) against the tiny UNet's geometry, and the
identity_blend rule for cross-attention layers in compile_plan."""

from __future__ import annotations

import pytest
from attnserve.attention import plan as P
from attnserve.engines.diffusers.attention import unet_geometry
from attnserve.spec.compile import SpecContext, SpecLimits, compile_plan
from attnserve.spec.errors import InvalidRequest, Violations
from attnserve.spec.guidance import compile_guidance
from attnserve_client.v1 import image_generation_pb2 as gpb
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import readout_pb2 as rpb


@pytest.fixture(scope="module")
def pag_pipe(tiny_sd_path):
    from diffusers import StableDiffusionPAGPipeline

    return StableDiffusionPAGPipeline.from_pretrained(tiny_sd_path, local_files_only=True)


@pytest.fixture(scope="module")
def geometry(pag_pipe):
    return unet_geometry(pag_pipe.unet)


def compiled(msg: gpb.PerturbedAttentionGuidance, geometry, presets=None):
    violations = Violations()
    guidance = compile_guidance(msg, "pag", geometry, violations, presets or {})
    return guidance, {v.field: v.description for v in violations.items}


def diffusers_choice(pipe, layer_ids) -> set[str]:
    """The self-attention modules diffusers' PAG pipeline perturbs for these layer ids."""
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    original = pipe.unet.attn_processors
    pipe.set_pag_applied_layers(layer_ids)
    pipe._set_pag_attn_processor(pipe.pag_applied_layers, do_classifier_free_guidance=True)
    chosen = {
        name.removesuffix(".processor")
        for name, processor in pipe.unet.attn_processors.items()
        if isinstance(processor, PAGCFGIdentitySelfAttnProcessor2_0)
    }
    pipe.unet.set_attn_processor(original)
    return chosen


@pytest.mark.parametrize(
    "layer_ids",
    [
        ["mid"],
        ["down"],
        ["up"],
        ["up_blocks.1.attentions.1"],
        ["down_blocks.0", "mid"],
        ["attn"],
        ["blocks.0"],
    ],
)
def test_pag_layers_are_the_ones_diffusers_perturbs(pag_pipe, geometry, layer_ids):
    guidance, violations = compiled(gpb.PerturbedAttentionGuidance(layers=layer_ids), geometry)
    assert violations == {}
    chosen = {geometry.layers[index].name for index in guidance.layer_ops}
    assert chosen == diffusers_choice(pag_pipe, layer_ids)
    assert all(ops == (P.ScopedOp(P.IdentityBlend(1.0)),) for ops in guidance.layer_ops.values())


def test_pag_defaults(geometry):
    guidance, violations = compiled(gpb.PerturbedAttentionGuidance(), geometry)
    assert violations == {}
    assert (guidance.scale, guidance.adaptive_scale) == (3.0, 0.0)
    assert [geometry.layers[i].name for i in guidance.layer_ops] == [
        "mid_block.attentions.0.transformer_blocks.0.attn1"
    ]
    assert guidance.scale_at(500) == 3.0


def test_adaptive_scale_is_clamped_at_zero():
    from attnserve.spec.guidance import PerturbedGuidance

    guidance = PerturbedGuidance(scale=3.0, adaptive_scale=0.01, layer_ops={})
    assert guidance.scale_at(900) == pytest.approx(2.0)
    assert guidance.scale_at(600) == 0.0


def test_soft_pag_heads(geometry):
    msg = gpb.PerturbedAttentionGuidance(
        soft=gpb.SoftPerturbation(
            heads=[ipb.LayerHeads(layer=6, heads=[3, 0]), ipb.LayerHeads(layer=0)], u=0.25
        )
    )
    guidance, violations = compiled(msg, geometry)
    assert violations == {}
    assert guidance.layer_ops == {
        6: (P.ScopedOp(P.IdentityBlend(0.25), heads=(0, 3)),),
        0: (P.ScopedOp(P.IdentityBlend(0.25), heads=None),),
    }


def soft_preset(layer_heads, weight=None, **selector):
    blend = ipb.IdentityBlend() if weight is None else ipb.IdentityBlend(weight=weight)
    return [
        ipb.Intervention(selector=ipb.Selector(layer_heads=layer_heads, **selector), identity_blend=blend)
    ]


PRESETS = {
    "hh": soft_preset([ipb.LayerHeads(layer=6, heads=[3, 0]), ipb.LayerHeads(layer=2, heads=[5])], 0.75),
    "hh-default-u": soft_preset([ipb.LayerHeads(layer=6, heads=[1])]),
    "two": soft_preset([ipb.LayerHeads(layer=6)]) * 2,
    "scale": [ipb.Intervention(head_output_scale=ipb.HeadOutputScale(scale=0.5))],
    "steps": soft_preset([ipb.LayerHeads(layer=6)], steps=ipb.StepRange(start=0, end=1)),
    "cross": soft_preset([ipb.LayerHeads(layer=7)]),
}


@pytest.mark.parametrize(
    ("soft", "expected"),
    [
        (
            gpb.SoftPerturbation(preset="hh"),
            {
                6: (P.ScopedOp(P.IdentityBlend(0.75), heads=(0, 3)),),
                2: (P.ScopedOp(P.IdentityBlend(0.75), heads=(5,)),),
            },
        ),
        # u given with the preset replaces the preset's.
        (
            gpb.SoftPerturbation(preset="hh-default-u", u=0.5),
            {6: (P.ScopedOp(P.IdentityBlend(0.5), heads=(1,)),)},
        ),
        (gpb.SoftPerturbation(preset="hh-default-u"), {6: (P.ScopedOp(P.IdentityBlend(1.0), heads=(1,)),)}),
    ],
)
def test_soft_pag_preset_compiles_as_its_heads(geometry, soft, expected):
    guidance, violations = compiled(gpb.PerturbedAttentionGuidance(soft=soft), geometry, PRESETS)
    assert violations == {}
    assert guidance.layer_ops == expected


@pytest.mark.parametrize(
    ("soft", "field", "text"),
    [
        (gpb.SoftPerturbation(preset="nope"), "pag.soft.preset", "unknown preset 'nope'"),
        (gpb.SoftPerturbation(preset="two"), "pag.soft.preset", "is not a SoftPAG preset"),
        (gpb.SoftPerturbation(preset="scale"), "pag.soft.preset", "is not a SoftPAG preset"),
        (gpb.SoftPerturbation(preset="steps"), "pag.soft.preset", "is not a SoftPAG preset"),
        (gpb.SoftPerturbation(preset="cross"), "pag.soft.preset", "heads[0].layer: layer 7"),
        (
            gpb.SoftPerturbation(preset="hh", heads=[ipb.LayerHeads(layer=6)]),
            "pag.soft.heads",
            "leave empty with preset",
        ),
        (gpb.SoftPerturbation(preset="hh", u=2), "pag.soft.u", "[0, 1]"),
    ],
)
def test_bad_soft_pag_preset_names_the_field(geometry, soft, field, text):
    _, violations = compiled(gpb.PerturbedAttentionGuidance(soft=soft), geometry, PRESETS)
    assert field in violations and text in violations[field], violations


@pytest.mark.parametrize(
    ("msg", "field", "text"),
    [
        (
            gpb.PerturbedAttentionGuidance(layers=["nowhere"]),
            "pag.layers[0]",
            "matches no self- or joint attention",
        ),
        (gpb.PerturbedAttentionGuidance(layers=["mid("]), "pag.layers[0]", "not a regular expression"),
        (gpb.PerturbedAttentionGuidance(layers=["x" * 129]), "pag.layers[0]", "longer than 128"),
        (gpb.PerturbedAttentionGuidance(scale=101), "pag.scale", "[0, 100]"),
        (gpb.PerturbedAttentionGuidance(adaptive_scale=2), "pag.adaptive_scale", "[0, 1]"),
        (gpb.PerturbedAttentionGuidance(soft=gpb.SoftPerturbation()), "pag.soft.heads", "at least one"),
        (
            gpb.PerturbedAttentionGuidance(soft=gpb.SoftPerturbation(heads=[ipb.LayerHeads(layer=7)])),
            "pag.soft.heads[0].layer",
            "not a self- or joint attention layer",
        ),
        (
            gpb.PerturbedAttentionGuidance(soft=gpb.SoftPerturbation(heads=[ipb.LayerHeads(layer=8)])),
            "pag.soft.heads[0].layer",
            "out of range",
        ),
        (
            gpb.PerturbedAttentionGuidance(
                soft=gpb.SoftPerturbation(heads=[ipb.LayerHeads(layer=6, heads=[8])])
            ),
            "pag.soft.heads[0].heads[0]",
            "8 heads",
        ),
        (
            gpb.PerturbedAttentionGuidance(soft=gpb.SoftPerturbation(heads=[ipb.LayerHeads(layer=6)], u=1.5)),
            "pag.soft.u",
            "[0, 1]",
        ),
        (
            gpb.PerturbedAttentionGuidance(
                layers=["mid"], soft=gpb.SoftPerturbation(heads=[ipb.LayerHeads(layer=6)])
            ),
            "pag.layers",
            "leave empty",
        ),
    ],
)
def test_bad_guidance_names_the_field(geometry, msg, field, text):
    _, violations = compiled(msg, geometry)
    assert field in violations and text in violations[field], violations


def test_identity_blend_is_refused_on_cross_attention(geometry):
    context = SpecContext(
        geometry=geometry,
        limits=SpecLimits(max_interventions=4, max_readout_values=1000),
        presets={},
        prompt_tokens=6,
        max_tokens=10,
        supported_operations=frozenset(P.OPERATIONS),
    )

    def plan(selector):
        spec = ipb.InterventionSpec(
            interventions=[ipb.Intervention(selector=selector, identity_blend=ipb.IdentityBlend(weight=0.5))]
        )
        return compile_plan(spec, rpb.ReadoutSpec(), context)

    with pytest.raises(InvalidRequest) as err:
        plan(ipb.Selector(layer_names=["mid_block.*"]))
    [violation] = err.value.violations
    assert violation.field == "interventions.interventions[0].selector.attention"
    assert "cross-attention" in violation.description
    compiled_plan = plan(ipb.Selector(attention=ipb.ATTENTION_KIND_SELF))
    assert sorted(compiled_plan.layer_ops) == [0, 2, 4, 6]
