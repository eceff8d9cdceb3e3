"""Operations restricted to some query rows (ScopedOp.query_rows) against the eager reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attnserve.attention.layout import MaskKind
from attnserve.attention.plan import (
    IdentityBlend,
    KeyEmphasis,
    KeyMask,
    KeySet,
    QueryRows,
    RowPlan,
    ScopedOp,
)
from harness import (
    ALL_KEYS,
    COMBINATION,
    FULL_NEEDS,
    SINGLE_OPS,
    assert_matches_reference,
    make_batch,
    plain_sdpa,
    run,
)

LAYOUTS = {
    "causal_prefill": {"num_queries": 12, "num_keys": 12},
    "causal_multi_query": {"num_queries": 4, "num_keys": 12, "generated": 3},
    # Joint attention of a DiT: every token (image, then text) sees every token.
    "bidirectional": {"num_queries": 12, "num_keys": 12, "mask": MaskKind.FULL},
    # Cross-attention with padded queries: row 2 has 6 query rows, counted from its first.
    "cross": {
        "num_queries": 10,
        "num_keys": 7,
        "mask": MaskKind.FULL,
        "key_starts": (0, 2, 3),
        "query_starts": (0, 0, 4),
    },
}
ROWS = {
    "ranges": QueryRows(ranges=((1, 3), (5, 8))),
    "invert": QueryRows(ranges=((0, 2),), invert=True),
    "past_the_end": QueryRows(ranges=((2, 40),)),
}


def scoped_to(scoped: ScopedOp, rows: QueryRows) -> ScopedOp:
    return dataclasses.replace(scoped, query_rows=rows)


def needs_own_key(scoped: ScopedOp) -> bool:
    return scoped.op.needs_own_key or scoped.op.removes_keys and scoped.keys == ALL_KEYS


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", SINGLE_OPS)
def test_single_operation_on_query_rows_matches_reference(name, layout, rows):
    scoped = SINGLE_OPS[name]
    if layout == "cross" and needs_own_key(scoped):
        pytest.skip("needs an own key")
    batch = make_batch(**LAYOUTS[layout])
    plans = [RowPlan(ops=(scoped_to(scoped, ROWS[rows]),), needs=FULL_NEEDS)] * 3
    assert_matches_reference(batch, plans)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_combination_on_different_query_rows_matches_reference(layout):
    batch = make_batch(**LAYOUTS[layout])
    rows = tuple(ROWS.values())
    ops = tuple(
        scoped_to(scoped, rows[n % len(rows)])
        for n, scoped in enumerate(COMBINATION)
        if not (layout == "cross" and needs_own_key(scoped))
    )
    plans = [RowPlan(ops=ops, needs=FULL_NEEDS), RowPlan(ops=COMBINATION[:3]), RowPlan(needs=FULL_NEEDS)]
    if layout == "cross":
        plans[1] = RowPlan()
    assert_matches_reference(batch, plans)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_outside_the_scope_are_unchanged(layout):
    batch = make_batch(**LAYOUTS[layout])
    rows = QueryRows(ranges=((1, 3),))
    ops = (
        scoped_to(ScopedOp(KeyEmphasis(0.05), keys=KeySet(ranges=((1, 3),))), rows),
        scoped_to(ScopedOp(KeyMask(), heads=(1,), keys=KeySet(ranges=((3, 5),))), rows),
    )
    out, _ = run(batch, [RowPlan(ops=ops)] * 3)
    plain = plain_sdpa(batch)
    for b in range(3):
        valid = batch.valid_queries(b)
        selected = torch.zeros(batch.num_queries, dtype=torch.bool)
        selected[valid.start + 1 : valid.start + 3] = True
        outside = torch.zeros_like(selected)
        outside[valid] = ~selected[valid]
        torch.testing.assert_close(out[b][:, outside], plain[b][:, outside], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out[b][:, selected], plain[b][:, selected], atol=1e-4)


def test_no_selected_row_leaves_the_row_as_it_was():
    batch = make_batch(**LAYOUTS["causal_multi_query"])
    nothing = QueryRows(ranges=((10, 20),))  # 4 query rows
    ops = tuple(scoped_to(scoped, nothing) for scoped in COMBINATION)
    out, _ = run(batch, [RowPlan(ops=ops)] * 3)
    torch.testing.assert_close(out, plain_sdpa(batch), atol=1e-6, rtol=1e-6)


def test_joint_pag_masks_the_image_block_to_the_diagonal():
    """Joint attention over 8 image then 4 text tokens; image queries keep only their own image
    key and every text key (diffusers' joint PAG), text queries attend as before."""
    batch = make_batch(num_queries=12, num_keys=12, key_starts=(0,), mask=MaskKind.FULL)
    image = ((0, 8),)
    pag = ScopedOp(KeyMask(), keys=KeySet(ranges=image), query_rows=QueryRows(ranges=image))
    out = assert_matches_reference(batch, [RowPlan(ops=(pag,), needs=FULL_NEEDS)])
    k, v = batch.k[0].repeat_interleave(3, dim=0), batch.v[0].repeat_interleave(3, dim=0)  # 6 / 2 heads
    logits = batch.scale * batch.q[0] @ k.transpose(-1, -2)
    allowed = torch.ones(12, 12, dtype=torch.bool)
    allowed[:8, :8] = torch.eye(8, dtype=torch.bool)
    expected = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_identity_blend_on_query_rows_matches_reference():
    batch = make_batch(num_queries=12, num_keys=12, mask=MaskKind.FULL)
    blend = ScopedOp(IdentityBlend(0.6), heads=(0, 3), query_rows=QueryRows(ranges=((0, 8),)))
    assert_matches_reference(batch, [RowPlan(ops=(blend,), needs=FULL_NEEDS)] * 3)


def test_cross_attention_refusal_counts_each_query_row():
    batch = make_batch(**LAYOUTS["cross"])
    first, rest = QueryRows(ranges=((0, 2),)), QueryRows(ranges=((0, 2),), invert=True)
    some_keys, other_keys = KeySet(ranges=((0, 1),)), KeySet(ranges=((0, 1),), invert=True)
    # Together the two masks remove every key, but from different query rows: allowed.
    apart = (
        ScopedOp(KeyMask(), heads=(2,), keys=some_keys, query_rows=first),
        ScopedOp(KeyMask(), heads=(2,), keys=other_keys, query_rows=rest),
    )
    assert_matches_reference(batch, [RowPlan(ops=apart, needs=FULL_NEEDS)] * 3)
    together = (
        apart[0],
        ScopedOp(KeyMask(), heads=(2,), keys=other_keys, query_rows=QueryRows(ranges=((1, 3),))),
    )
    with pytest.raises(ValueError, match="no key"):
        run(batch, [RowPlan(ops=together)] * 3)


@pytest.mark.parametrize("ranges", [((3, 3),), ((-1, 2),), ((4, 2),)])
def test_query_rows_validation(ranges):
    with pytest.raises(ValueError, match="query row range"):
        QueryRows(ranges=ranges)
