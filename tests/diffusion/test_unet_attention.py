"""attnserve's UNet attention processors: the geometry, and rows without plans left as diffusers
computes them."""

import numpy as np
from attnserve.attention.plan import RequestPlan, ScopedOp, StepRange, Temperature
from attnserve.spec.geometry import AttentionKind, Component

from .helpers import generate, image_request, reference_images


def test_geometry_lists_every_unet_attention_layer(served):
    _, geometry = served
    names = [layer.name for layer in geometry.layers]
    assert names == [
        f"{block}.transformer_blocks.0.{attn}"
        for block in (
            "down_blocks.0.attentions.0",
            "up_blocks.1.attentions.0",
            "up_blocks.1.attentions.1",
            "mid_block.attentions.0",
        )
        for attn in ("attn1", "attn2")
    ]
    assert [layer.kind for layer in geometry.layers] == [AttentionKind.SELF, AttentionKind.CROSS] * 4
    assert {layer.component for layer in geometry.layers} == {Component.UNET_BLOCK}
    assert not any(layer.causal for layer in geometry.layers)
    # attention_head_dim 8 is the head count; the head size follows from the block width.
    assert [(layer.num_heads, layer.head_dim) for layer in geometry.layers] == [(8, 4)] * 6 + [(8, 8)] * 2


def test_no_plans_is_bit_identical_to_the_unmodified_pipeline(served, plain_pipe):
    denoiser, _ = served
    for seed, num_images in ((0, 1), (3, 2)):
        [ours] = generate(denoiser, [image_request(denoiser, seed=seed, num_images=num_images)])
        assert np.array_equal(ours, reference_images(plain_pipe, seed=seed, num_images=num_images))


def test_rows_without_plans_beside_edited_rows(served, plain_pipe):
    """An edited request in the batch moves the plain rows to attention.core's plain SDPA path
    (masked, on the batch of plain rows) and the UNet's other layers see a bigger batch."""
    denoiser, geometry = served
    edit = RequestPlan(
        layer_ops={layer.index: ((StepRange(), ScopedOp(Temperature(2.0))),) for layer in geometry.layers}
    )
    plain, edited = generate(denoiser, [image_request(denoiser), image_request(denoiser, plan=edit, seed=5)])
    reference = reference_images(plain_pipe)
    assert np.abs(plain - reference).max() < 1e-5
    [edited_alone] = generate(denoiser, [image_request(denoiser, plan=edit, seed=5)])
    assert np.abs(edited - edited_alone).max() < 1e-5
    assert np.abs(edited - reference_images(plain_pipe, seed=5)).max() > 1e-3
