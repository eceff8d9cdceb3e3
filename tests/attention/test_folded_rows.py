"""Decode rows folded into one pass (attention/folded_rows.py) against the per-row path and the
eager reference: batches mixing many different plans (operations, heads, keys, query rows,
prompt lengths), rows with readouts beside them, and the grouping of equal operations."""

from __future__ import annotations

import random

import pytest
import torch
from attnserve.attention.core import attend, attend_decode_rows, effective_ops, prepare
from attnserve.attention.folded_rows import fold_decode_rows, folded_applied_ops
from attnserve.attention.interventions import applied_ops
from attnserve.attention.layout import MaskKind
from attnserve.attention.plan import NO_NEEDS, KeySet, QueryRows, RowPlan, ScopedOp
from attnserve.attention.row_attention import RowAttention
from attnserve.attention.step_memo import StepMemo
from harness import COMBINATION, FULL_NEEDS, SINGLE_OPS, assert_matches_reference, make_batch, run

NUM_HEADS = 6


def per_row(batch, plans, rows) -> torch.Tensor:
    """(len(rows), H, D): the given edited decode rows through the per-row path, one at a time."""
    outputs = []
    for b in rows:
        row = RowAttention.from_batch(batch.q, batch.k, batch.v, b, batch.layouts[b], batch.scale)
        out, _ = attend(row, prepare(row, applied_ops(row, effective_ops(plans[b])), NO_NEEDS), NO_NEEDS)
        outputs.append(out[:, 0])
    return torch.stack(outputs)


def random_plans(count: int, seed: int) -> list[RowPlan]:
    """Plans of 0 to 4 operations drawn from every single-op case and the combination."""
    rng = random.Random(seed)
    choices = [*SINGLE_OPS.values(), *COMBINATION]
    choices.remove(SINGLE_OPS["mask_everything"])  # fine on a decode row, but leaves little to compare
    return [RowPlan(ops=tuple(rng.sample(choices, rng.randint(0, 4)))) for _ in range(count)]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("mask", [MaskKind.CAUSAL, MaskKind.BLOCK])
def test_decode_rows_of_many_plans_equal_the_per_row_path_and_the_reference(seed, mask):
    rng = random.Random(seed)
    key_starts = tuple(rng.randint(0, 9) for _ in range(7))
    batch = make_batch(
        num_queries=1,
        num_keys=14,
        key_starts=key_starts,
        generated=rng.randint(0, 3),
        seed=seed,
        mask=mask,
        block_size=3 if mask is MaskKind.BLOCK else 0,
    )
    plans = random_plans(len(key_starts), seed)
    out = assert_matches_reference(batch, plans)
    edited = [b for b, plan in enumerate(plans) if effective_ops(plan)]
    alone = per_row(batch, plans, edited)
    torch.testing.assert_close(out[edited, :, 0], alone.to(out.dtype), atol=1e-6, rtol=0)


def test_rows_with_readouts_beside_folded_rows():
    batch = make_batch(num_queries=1, num_keys=12, key_starts=(0, 3, 5, 1), generated=2, seed=4)
    combination = RowPlan(ops=COMBINATION)
    plans = [
        combination,
        RowPlan(ops=COMBINATION, needs=FULL_NEEDS),
        RowPlan(needs=FULL_NEEDS),
        RowPlan(ops=(SINGLE_OPS["act"],)),
    ]
    assert_matches_reference(batch, plans)


def test_an_operation_outside_its_query_rows_leaves_the_decode_row_alone():
    batch = make_batch(num_queries=1, num_keys=12, key_starts=(0, 2), seed=5)
    plain, _ = run(batch, [RowPlan(), RowPlan()])
    outside = ScopedOp(
        SINGLE_OPS["emphasis"].op, keys=KeySet(ranges=((1, 4),)), query_rows=QueryRows(((1, 3),))
    )
    inside = ScopedOp(
        SINGLE_OPS["emphasis"].op, keys=KeySet(ranges=((1, 4),)), query_rows=QueryRows(((0, 1),))
    )
    out, _ = run(batch, [RowPlan(ops=(outside,)), RowPlan(ops=(inside,))])
    assert torch.equal(out[0], plain[0])
    assert not torch.allclose(out[1], plain[1])


def test_equal_operations_of_different_requests_share_one_application():
    batch = make_batch(num_queries=1, num_keys=12, key_starts=(0, 2, 4), seed=6)
    act, rescale = SINGLE_OPS["act"], SINGLE_OPS["rescale"]
    other_act = ScopedOp(act.op.__class__(tau=0.3))
    rows = fold_decode_rows(
        batch.q[:, :, 0],
        batch.k,
        batch.v,
        key_starts=[0, 2, 4],
        prompt_lengths=[12, 10, 8],
        scale=batch.scale,
    )
    applied = folded_applied_ops(rows, [(act, rescale), (rescale, act), (other_act,)])
    # Rescale comes before ACT in every request (registry order); the two ACTs with different
    # parameters are two applications over disjoint heads.
    assert [a.op for a in applied] == [rescale.op, act.op, other_act.op]
    heads_per_application = [a.scope.heads.view(3, NUM_HEADS).any(dim=1).tolist() for a in applied]
    assert heads_per_application == [[True, True, False], [True, True, False], [False, False, True]]
    # Each request's keys are its own: request 2's 8 keys start at index 4.
    assert not applied[2].scope.keys[2 * NUM_HEADS :, :4].any()


@pytest.mark.parametrize("seed", range(6))
def test_right_padded_rows_equal_left_padded_and_a_step_memo_changes_nothing(seed):
    """vLLM's paged cache is read right-padded (engines/vllm/paged_kv.py), with whatever a block's
    earlier owner left in the padding; layers of a step share one StepMemo."""
    rng = random.Random(seed)
    key_starts = tuple(rng.randint(0, 9) for _ in range(7))
    batch = make_batch(num_queries=1, num_keys=14, key_starts=key_starts, generated=2, seed=seed)
    ops = [effective_ops(plan) for plan in random_plans(len(key_starts), seed)]
    prompt_lengths = [layout.num_prompt_tokens for layout in batch.layouts]
    left = attend_decode_rows(
        batch.q[:, :, 0],
        batch.k,
        batch.v,
        key_starts=key_starts,
        prompt_lengths=prompt_lengths,
        scale=batch.scale,
        ops=ops,
    )

    num_keys = batch.k.shape[2]
    right_k = torch.randn_like(batch.k) * 100
    right_v = torch.randn_like(batch.v) * 100
    for b, start in enumerate(key_starts):
        right_k[b, :, : num_keys - start] = batch.k[b, :, start:]
        right_v[b, :, : num_keys - start] = batch.v[b, :, start:]
    # Keys as paged_kv hands them over: a transposed view of a contiguous K^T.
    right_k = right_k.transpose(-1, -2).contiguous().transpose(-1, -2)
    memo = StepMemo()
    for _ in range(2):
        right = attend_decode_rows(
            batch.q[:, :, 0],
            right_k,
            right_v,
            key_starts=[0] * len(key_starts),
            key_ends=[num_keys - start for start in key_starts],
            prompt_lengths=prompt_lengths,
            scale=batch.scale,
            ops=ops,
            memo=memo,
        )
        torch.testing.assert_close(right, left, atol=1e-6, rtol=0)
    assert len(memo.geometries) == len(memo.prepared) == 1
