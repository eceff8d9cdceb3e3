"""Rows of several queries folded into one pass (core.attend_folded_rows): prefills and
multi-token steps of requests with different lengths, different plans and different readouts,
against the per-row path (itself checked against the eager reference in test_core.py), with
their keys padded on either side and garbage in the padding."""

from __future__ import annotations

import random

import pytest
import torch
from attnserve.attention.core import attend, attend_folded_rows, prepare
from attnserve.attention.folded_rows import MAX_FOLDED_LOGITS, fold_groups, folds_queries, folds_size
from attnserve.attention.interventions import applied_ops
from attnserve.attention.layout import RowLayout
from attnserve.attention.plan import NO_NEEDS, ReadoutNeeds, ScopedOp
from attnserve.attention.readout import RowReadout
from attnserve.attention.row_attention import RowAttention
from attnserve.attention.step_memo import StepMemo
from harness import COMBINATION, FULL_NEEDS, SINGLE_OPS, assert_readout_matches, make_batch

#: The operations that fold on rows of several queries: those acting on every query row.
FOLDING_OPS = [scoped for scoped in (*SINGLE_OPS.values(), *COMBINATION) if folds_queries([scoped])]


def test_every_operation_kind_has_a_case_that_folds():
    assert {type(scoped.op) for scoped in FOLDING_OPS} == {
        type(scoped.op) for scoped in (*SINGLE_OPS.values(), *COMBINATION)
    }


#: What a request of a folded batch may read out.
READOUT_CHOICES = [
    NO_NEEDS,
    FULL_NEEDS,
    ReadoutNeeds(statistics=True),
    ReadoutNeeds(last_query_rows=True),
]


def per_row(
    q, k, v, layout: RowLayout, ops: tuple[ScopedOp, ...], needs: ReadoutNeeds, scale: float
) -> tuple[torch.Tensor | None, RowReadout | None]:
    """(H, L, D) and the readout of one request's row through the per-row path."""
    row = RowAttention(q=q, k=k, v=v, scale=scale, layout=layout)
    out, readout = attend(row, prepare(row, applied_ops(row, ops), needs), needs)
    if readout is not None and readout.last_query_rows is not None:
        readout.last_query_rows = readout.last_query_rows.double()  # as the harness compares
    return out, readout


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("seed", range(6))
def test_rows_of_several_queries_equal_the_per_row_path(seed, padding):
    rng = random.Random(seed)
    num_requests, num_keys, num_queries = 5, 14, 10
    key_starts = tuple(rng.randint(0, 6) for _ in range(num_requests))
    batch = make_batch(
        num_queries=num_queries, num_keys=num_keys, key_starts=key_starts, generated=2, seed=seed
    )
    lengths = [num_keys - start for start in key_starts]
    # A prefill's queries are all its tokens; a multi-token step's its last few.
    query_counts = [rng.choice([length, min(length, num_queries), 1, 3]) for length in lengths]
    query_counts = [min(count, num_queries) for count in query_counts]
    # Some requests only read out; the others edit, and may read out too.
    ops = [tuple(rng.sample(FOLDING_OPS, rng.randint(0, 4))) for _ in range(num_requests)]
    needs = [rng.choice(READOUT_CHOICES) for _ in range(num_requests)]
    needs[0] = FULL_NEEDS

    expected = [
        per_row(
            batch.q[b, :, num_queries - count :],
            batch.k[b, :, start:],
            batch.v[b, :, start:],
            RowLayout(key_start=0, num_prompt_tokens=batch.layouts[b].num_prompt_tokens),
            ops[b],
            needs[b],
            batch.scale,
        )
        for b, (start, count) in enumerate(zip(key_starts, query_counts))
    ]

    garbage = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(batch.q.shape, generator=garbage) * 100
    k = torch.randn(batch.k.shape, generator=garbage) * 100
    v = torch.randn(batch.v.shape, generator=garbage) * 100
    for b, (start, count) in enumerate(zip(key_starts, query_counts)):
        q[b, :, :count] = batch.q[b, :, num_queries - count :]
        first = 0 if padding == "right" else start
        k[b, :, first : first + lengths[b]] = batch.k[b, :, start:]
        v[b, :, first : first + lengths[b]] = batch.v[b, :, start:]
    q = q[:, :, : max(query_counts)]
    starts = [0] * num_requests if padding == "right" else list(key_starts)
    ends = lengths if padding == "right" else [num_keys] * num_requests

    memo = StepMemo()
    for _ in range(2):  # a step's second layer reuses what the first prepared
        folded, readouts = attend_folded_rows(
            q,
            k,
            v,
            key_starts=starts,
            key_ends=ends,
            query_counts=query_counts,
            prompt_lengths=[layout.num_prompt_tokens for layout in batch.layouts],
            scale=batch.scale,
            ops=ops,
            needs=needs,
            memo=memo,
        )
        for b, count in enumerate(query_counts):
            out, readout = expected[b]
            if ops[b]:
                torch.testing.assert_close(folded[b, :, :count], out, atol=1e-6, rtol=0)
            assert_readout_matches(readouts[b], readout, 1e-6)
    assert len(memo.prepared) == 1


def test_an_operation_on_some_query_rows_does_not_fold_on_several_queries():
    batch = make_batch(num_queries=4, num_keys=8, key_starts=(0, 0))
    with pytest.raises(ValueError, match="some query rows"):
        attend_folded_rows(
            batch.q,
            batch.k,
            batch.v,
            key_starts=[0, 0],
            key_ends=[8, 8],
            query_counts=[4, 4],
            prompt_lengths=[8, 8],
            scale=batch.scale,
            ops=[(SINGLE_OPS["rescale_last_query"],), (SINGLE_OPS["act"],)],
        )


def test_rows_of_very_different_sizes_fold_apart():
    sizes = [50, 4000, 60, 45, 3000, 55]
    groups = fold_groups(sizes, num_heads=9)
    assert groups == [[1, 4, 2], [5, 0, 3]]
    for group in groups:  # padded to its largest row, a group at most doubles its work
        assert len(group) * sizes[group[0]] <= 2 * sum(sizes[i] for i in group)
    assert fold_groups([7] * 16, num_heads=9) == [list(range(16))]


def test_folded_passes_stay_within_their_logits_budget():
    prompt = 2000 * 2000  # a 2000-token prefill: queries x keys
    assert folds_size(2000, 2000, num_heads=4) and not folds_size(2000, 2000, num_heads=9)
    groups = fold_groups([prompt] * 8, num_heads=4)
    assert [len(group) for group in groups] == [1] * 8
    assert all(len(g) * prompt * 4 <= MAX_FOLDED_LOGITS for g in groups)
    assert len(fold_groups([100 * 100] * 16, num_heads=9)) == 1
