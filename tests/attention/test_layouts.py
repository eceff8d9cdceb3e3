"""attend_rows on bidirectional, cross-attention and block-causal rows against the eager reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attnserve.attention.core import visibility_mask
from attnserve.attention.layout import MaskKind, RowLayout
from attnserve.attention.plan import IdentityBlend, KeyMask, KeySet, ReadoutNeeds, RowPlan, ScopedOp
from harness import (
    ALL_KEYS,
    COMBINATION,
    FULL_NEEDS,
    IDENTITY_OPS,
    SINGLE_OPS,
    assert_matches_reference,
    make_batch,
    plain_sdpa,
    run,
)

FULL, BLOCK = MaskKind.FULL, MaskKind.BLOCK

LAYOUTS = {
    # Bidirectional self-attention (a vision encoder, DiT): every token sees every token.
    "bidirectional": {"num_queries": 12, "num_keys": 12, "mask": FULL},
    # Self-attention queries that are only the last tokens of the sequence, seeing all of it.
    "bidirectional_last_tokens": {"num_queries": 4, "num_keys": 12, "mask": FULL, "generated": 3},
    # Cross-attention: 10 image-token queries over 4..7 text keys; row 2's queries are padded.
    "cross": {
        "num_queries": 10,
        "num_keys": 7,
        "mask": FULL,
        "key_starts": (0, 2, 3),
        "query_starts": (0, 0, 4),
    },
    "cross_few_queries": {"num_queries": 3, "num_keys": 9, "mask": FULL, "query_starts": (0, 1, 2)},
    # Block-causal self-attention: blocks of 3 tokens, bidirectional inside a block.
    "block": {"num_queries": 12, "num_keys": 12, "mask": BLOCK, "block_size": 3},
    "block_decode": {"num_queries": 1, "num_keys": 12, "mask": BLOCK, "block_size": 3, "generated": 4},
    "block_multi_query": {"num_queries": 4, "num_keys": 12, "mask": BLOCK, "block_size": 2, "generated": 3},
}
CROSS = {name for name, layout in LAYOUTS.items() if "query_starts" in layout}
#: The operations that need an own key are refused on cross-attention rows (tested below).
NEEDS_OWN_KEY = {"blend", "blend_full_last_query", "mask_everything"}


def applicable(ops, layout: str):
    if layout not in CROSS:
        return ops
    return tuple(scoped for scoped in ops if not isinstance(scoped.op, IdentityBlend))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", SINGLE_OPS)
def test_single_operation_matches_reference(name, layout):
    if layout in CROSS and name in NEEDS_OWN_KEY:
        pytest.skip("needs an own key")
    batch = make_batch(**LAYOUTS[layout])
    plans = [RowPlan(ops=(SINGLE_OPS[name],), needs=FULL_NEEDS)] * 3
    assert_matches_reference(batch, plans)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads_kv", [(6, 2), (6, 6)])
def test_combination_matches_reference(layout, heads_kv):
    num_heads, num_kv_heads = heads_kv
    batch = make_batch(num_heads=num_heads, num_kv_heads=num_kv_heads, **LAYOUTS[layout])
    plans = [RowPlan(ops=applicable(COMBINATION, layout), needs=FULL_NEEDS)] * 3
    out = assert_matches_reference(batch, plans)
    for b in range(3):
        rows = batch.valid_queries(b)
        assert not torch.allclose(out[b, :, rows], plain_sdpa(batch)[b, :, rows], atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_matches_reference_tightly(layout):
    batch = make_batch(**LAYOUTS[layout])
    batch = dataclasses.replace(batch, q=batch.q.double(), k=batch.k.double(), v=batch.v.double())
    plans = [
        RowPlan(ops=applicable(COMBINATION, layout), needs=FULL_NEEDS),
        RowPlan(ops=tuple(SINGLE_OPS.values())[4:10], needs=FULL_NEEDS),
        RowPlan(needs=FULL_NEEDS),
    ]
    assert_matches_reference(batch, plans, tolerance=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_identity_plans_are_bit_identical(layout):
    batch = make_batch(num_heads=9, num_kv_heads=3, **LAYOUTS[layout])
    plain = plain_sdpa(batch)
    identity = applicable(IDENTITY_OPS, layout)
    combination = applicable(COMBINATION, layout)
    for plans in (
        [RowPlan(ops=identity)] * 3,
        [RowPlan(ops=identity, needs=FULL_NEEDS), RowPlan(), RowPlan(needs=FULL_NEEDS)],
        [RowPlan(ops=identity), RowPlan(ops=combination), RowPlan()],
    ):
        out, _ = run(batch, plans)
        for b, plan in enumerate(plans):
            if plan.ops is not combination:
                rows = batch.valid_queries(b)
                assert torch.equal(out[b, :, rows], plain[b, :, rows])


def test_a_batch_of_mixed_layouts():
    """Causal, bidirectional and block rows side by side: one mask per row."""
    causal = make_batch(num_queries=12, num_keys=12)
    layouts = [
        causal.layouts[0],
        dataclasses.replace(causal.layouts[1], mask=FULL),
        dataclasses.replace(causal.layouts[2], mask=BLOCK, block_ids=(0, 0, 1, 1, 1, 2, 3)),
    ]
    batch = dataclasses.replace(causal, layouts=layouts)
    assert_matches_reference(batch, [RowPlan(ops=COMBINATION, needs=FULL_NEEDS), RowPlan(), RowPlan()])
    out, _ = run(batch, [RowPlan()] * 3)
    assert torch.equal(out, plain_sdpa(batch))


def test_block_visibility():
    """Query at position t sees key j when block_ids[j] <= block_ids[t]."""
    layout = RowLayout(key_start=1, num_prompt_tokens=4, mask=BLOCK, block_ids=(0, 1, 1, 2))
    mask = visibility_mask([layout], num_queries=5, num_keys=5, device=torch.device("cpu"))[0, 0]
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0],  # padding
            [0, 1, 0, 0, 0],  # token 0, block 0
            [0, 1, 1, 1, 0],  # token 1, block 1
            [0, 1, 1, 1, 0],  # token 2, block 1
            [0, 1, 1, 1, 1],  # token 3, block 2
        ],
        dtype=torch.bool,
    )
    torch.testing.assert_close(mask, expected)


def test_cross_attention_refuses_what_needs_an_own_key():
    batch = make_batch(**LAYOUTS["cross"])
    for ops in (
        (ScopedOp(IdentityBlend(0.5), heads=(1,)),),
        (ScopedOp(KeyMask(), heads=(3,), keys=ALL_KEYS),),
        # Two masks that together cover every key of head 2.
        (
            ScopedOp(KeyMask(), heads=(2,), keys=KeySet(ranges=((0, 1),))),
            ScopedOp(KeyMask(), heads=(2, 4), keys=KeySet(ranges=((0, 1),), invert=True)),
        ),
    ):
        with pytest.raises(ValueError, match="own key|no key"):
            run(batch, [RowPlan(ops=ops)] * 3)
    # Masks that leave every head a key are fine.
    covering_different_heads = (
        ScopedOp(KeyMask(), heads=(2,), keys=KeySet(ranges=((0, 1),))),
        ScopedOp(KeyMask(), heads=(4,), keys=KeySet(ranges=((0, 1),), invert=True)),
    )
    assert_matches_reference(batch, [RowPlan(ops=covering_different_heads, needs=FULL_NEEDS)] * 3)


def test_bidirectional_mask_everything_leaves_each_query_its_own_value():
    batch = make_batch(**LAYOUTS["bidirectional"])
    out, _ = run(batch, [RowPlan(ops=(ScopedOp(KeyMask(), keys=ALL_KEYS),))] * 3)
    for b in range(3):
        rows = batch.valid_queries(b)
        own = batch.v[b].repeat_interleave(3, dim=0)[:, rows]
        torch.testing.assert_close(out[b, :, rows], own)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sink_statistics_only_where_they_apply(layout):
    batch = make_batch(**LAYOUTS[layout])
    _, readouts = run(batch, [RowPlan(needs=ReadoutNeeds(statistics=True))] * 3)
    for readout in readouts:
        statistics = readout.statistics
        sinks = (statistics.sink_mass, statistics.sink_mass_first4, statistics.hidden_sinks)
        if LAYOUTS[layout]["mask"] is FULL:
            assert sinks == (None, None, None)
        else:
            assert all(isinstance(value, float) for value in sinks)
        # Normalised over the visible keys: a full row's queries all divide by ln n.
        assert 0 < statistics.normalized_entropy / statistics.query_count <= 1


def test_layout_validation():
    with pytest.raises(ValueError, match="cross-attention"):
        RowLayout(key_start=0, num_prompt_tokens=3, cross_attention=True)
    with pytest.raises(ValueError, match="query_start"):
        RowLayout(key_start=0, num_prompt_tokens=3, query_start=2)
    with pytest.raises(ValueError, match="block_ids"):
        RowLayout(key_start=0, num_prompt_tokens=3, mask=BLOCK)
    with pytest.raises(ValueError, match="non-decreasing"):
        RowLayout(key_start=0, num_prompt_tokens=3, mask=BLOCK, block_ids=(0, 1, 0))
    batch = make_batch(num_queries=4, num_keys=4, key_starts=(0,), mask=BLOCK, block_size=2)
    short = dataclasses.replace(batch.layouts[0], block_ids=(0, 0, 1))
    with pytest.raises(ValueError, match="block_ids for a row of 4 tokens"):
        run(dataclasses.replace(batch, layouts=[short]), [RowPlan()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_matches_reference(layout):
    batch = make_batch(**LAYOUTS[layout]).to("cuda")
    plans = [
        RowPlan(ops=applicable(COMBINATION, layout), needs=FULL_NEEDS),
        RowPlan(needs=FULL_NEEDS),
        RowPlan(),
    ]
    assert_matches_reference(batch, plans, tolerance=1e-4)
