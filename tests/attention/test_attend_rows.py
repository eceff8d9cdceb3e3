"""attend_rows against the eager reference: each operation, combinations, layouts, readouts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attnserve.attention.core import attend_rows
from attnserve.attention.plan import (
    HeadOutputScale,
    IdentityBlend,
    KeyEmphasis,
    KeyMask,
    KeySet,
    LogitRescale,
    ReadoutNeeds,
    RowPlan,
    ScopedOp,
    SinkCalibration,
    Temperature,
)
from harness import (
    ALL_KEYS,
    COMBINATION,
    FULL_NEEDS,
    IDENTITY_OPS,
    SCENARIOS,
    SINGLE_OPS,
    assert_matches_reference,
    make_batch,
    plain_sdpa,
    run,
)
from reference import reference_attend


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", SINGLE_OPS)
def test_single_operation_matches_reference(name, scenario):
    batch = make_batch(**SCENARIOS[scenario])
    plans = [RowPlan(ops=(SINGLE_OPS[name],), needs=FULL_NEEDS)] * 3
    out = assert_matches_reference(batch, plans)
    if scenario == "prefill":  # every operation here changes a prefill
        assert not torch.allclose(out, plain_sdpa(batch), atol=1e-4)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("heads_kv", [(6, 2), (9, 3), (6, 6)])
def test_combination_matches_reference(scenario, heads_kv):
    num_heads, num_kv_heads = heads_kv
    batch = make_batch(num_heads=num_heads, num_kv_heads=num_kv_heads, **SCENARIOS[scenario])
    plans = [RowPlan(ops=COMBINATION, needs=FULL_NEEDS)] * 3
    assert_matches_reference(batch, plans)


def test_mixed_batch_of_plans():
    batch = make_batch(num_queries=12, num_keys=14, key_starts=(0, 6, 2, 9, 4), generated=2)
    rows_only = ReadoutNeeds(last_query_rows=True)
    plans = [
        RowPlan(),
        RowPlan(ops=COMBINATION[:5], needs=FULL_NEEDS),
        RowPlan(needs=rows_only),
        RowPlan(ops=(SINGLE_OPS["emphasis"], SINGLE_OPS["blend"])),
        RowPlan(ops=(ScopedOp(SinkCalibration(beta=1.0)),), needs=ReadoutNeeds(statistics=True)),
    ]
    assert_matches_reference(batch, plans)
    _, readouts = run(batch, plans)
    assert readouts[0] is None and readouts[3] is None
    assert readouts[2].statistics is None and readouts[2].last_query_rows.shape == (6, 14 - 2)


def test_without_plain_outputs_only_edited_rows_are_computed():
    """Engines keep their own kernel's output for rows that read out only (plain_outputs False)."""
    batch = make_batch(num_queries=12, num_keys=14, key_starts=(0, 6, 2, 9, 4), generated=2)
    plans = [
        RowPlan(needs=ReadoutNeeds(statistics=True)),
        RowPlan(ops=COMBINATION[:5], needs=FULL_NEEDS),
        RowPlan(),
        RowPlan(ops=(SINGLE_OPS["emphasis"],)),
        RowPlan(needs=FULL_NEEDS),
    ]
    expected, expected_readouts = run(batch, plans)
    out, readouts = attend_rows(
        batch.q, batch.k, batch.v, scale=batch.scale, layouts=batch.layouts, plans=plans, plain_outputs=False
    )
    assert not out[[0, 2, 4]].any()
    assert torch.equal(out[[1, 3]], expected[[1, 3]])
    for ours, theirs in zip(readouts, expected_readouts):
        assert (ours is None) == (theirs is None)
        if theirs is not None:
            assert ours.statistics == theirs.statistics
            if theirs.last_query_rows is not None:
                assert torch.equal(ours.last_query_rows, theirs.last_query_rows)


@pytest.mark.parametrize("min_queries", [0, 3, 6])
def test_act_min_queries_guard(min_queries):
    batch = make_batch(num_queries=12, num_keys=12, key_starts=(0, 2), seed=3)
    plans = [
        RowPlan(ops=(ScopedOp(SinkCalibration(tau=0.1, min_queries=min_queries)),), needs=FULL_NEEDS)
    ] * 2
    assert_matches_reference(batch, plans)


def test_min_queries_guard_drops_tail_sinks():
    """The last keys of a prefill are seen by few queries; the guard stops them being sinks."""
    batch = make_batch(num_queries=12, num_keys=12, key_starts=(0,), sink_positions=())
    unguarded, _ = run(batch, [RowPlan(ops=(ScopedOp(SinkCalibration(tau=0.1)),))])
    guarded, _ = run(batch, [RowPlan(ops=(ScopedOp(SinkCalibration(tau=0.1, min_queries=12)),))])
    plain = plain_sdpa(batch)
    assert not torch.allclose(unguarded, plain, atol=1e-4)
    # min_queries = Lq leaves only token 0, which is never a sink.
    torch.testing.assert_close(guarded, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("heads_kv", [(6, 2), (9, 3)])
def test_identity_plans_are_bit_identical(scenario, heads_kv):
    num_heads, num_kv_heads = heads_kv
    batch = make_batch(num_heads=num_heads, num_kv_heads=num_kv_heads, **SCENARIOS[scenario])
    plain = plain_sdpa(batch)
    for plans in (
        [RowPlan(ops=IDENTITY_OPS)] * 3,
        [RowPlan(ops=IDENTITY_OPS, needs=FULL_NEEDS), RowPlan(), RowPlan(needs=FULL_NEEDS)],
        # Identity rows stay bit-identical next to an edited row.
        [RowPlan(ops=IDENTITY_OPS), RowPlan(ops=COMBINATION), RowPlan()],
    ):
        out, _ = run(batch, plans)
        for b, plan in enumerate(plans):
            if plan.ops is not COMBINATION:
                rows = batch.valid_queries(b)
                assert torch.equal(out[b, :, rows], plain[b, :, rows])


@pytest.mark.parametrize(
    "op",
    [
        SinkCalibration(),
        KeyEmphasis(0.01),
        LogitRescale(0.7),
        Temperature(0.5),
        KeyMask(),
        IdentityBlend(0.5),
        HeadOutputScale(2.0),
    ],
)
def test_unselected_heads_untouched(op):
    batch = make_batch(num_queries=12, num_keys=12, num_heads=9, num_kv_heads=3)
    selected = (1, 7)
    out, _ = run(batch, [RowPlan(ops=(ScopedOp(op, heads=selected, keys=KeySet(ranges=((0, 3),))),))] * 3)
    plain = plain_sdpa(batch)
    others = [h for h in range(9) if h not in selected]
    for b in range(3):
        rows = batch.valid_queries(b)
        torch.testing.assert_close(out[b, others, rows], plain[b, others, rows], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out[b, list(selected), rows], plain[b, list(selected), rows], atol=1e-4)


@pytest.mark.parametrize(
    "op, wrong",
    [
        (SinkCalibration(beta=0.4), SinkCalibration(beta=0.5)),
        (SinkCalibration(tau=0.1), SinkCalibration(tau=0.3)),
        (KeyEmphasis(0.01), KeyEmphasis(0.02)),
        (LogitRescale(0.7), LogitRescale(0.6)),
        (Temperature(0.5), Temperature(0.55)),
        (IdentityBlend(0.4), IdentityBlend(0.45)),
        (HeadOutputScale(2.0), HeadOutputScale(2.1)),
    ],
)
def test_reference_comparison_detects_wrong_parameters(op, wrong):
    batch = make_batch(num_queries=12, num_keys=12)
    keys = KeySet(ranges=((0, 4),))
    out, _ = run(batch, [RowPlan(ops=(ScopedOp(op, keys=keys),))] * 3)
    wrong_plans = [RowPlan(ops=(ScopedOp(wrong, keys=keys),))] * 3
    wrong_out, _ = reference_attend(
        batch.q, batch.k, batch.v, scale=batch.scale, layouts=batch.layouts, plans=wrong_plans
    )
    assert (out.double() - wrong_out).abs().max() > 1e-3


def test_statistics_see_the_interventions():
    batch = make_batch(num_queries=12, num_keys=12)
    readout = ReadoutNeeds(statistics=True)
    _, (plain_readout, *_) = run(batch, [RowPlan(needs=readout)] * 3)
    for op in (SinkCalibration(beta=0.0), IdentityBlend(0.5), KeyMask(), KeyEmphasis(0.01)):
        _, (edited, *_) = run(
            batch, [RowPlan(ops=(ScopedOp(op, keys=KeySet(ranges=((0, 4),))),), needs=readout)] * 3
        )
        assert edited.statistics.entropy != pytest.approx(plain_readout.statistics.entropy, abs=1e-3)


def test_mask_everything_leaves_each_query_its_own_value():
    batch = make_batch(num_queries=12, num_keys=12, num_heads=6, num_kv_heads=2)
    out, _ = run(batch, [RowPlan(ops=(ScopedOp(KeyMask(), keys=ALL_KEYS),))] * 3)
    for b in range(3):
        rows = batch.valid_queries(b)
        own = batch.v[b].repeat_interleave(3, dim=0)[:, rows]
        torch.testing.assert_close(out[b, :, rows], own)


def test_statistics_of_a_single_decode_query():
    """Decode: hidden sinks reduce to p_tj > 0.1 of the one query."""
    batch = make_batch(**SCENARIOS["decode"])
    plans = [RowPlan(needs=ReadoutNeeds(statistics=True, last_query_rows=True))] * 3
    _, readouts = run(batch, plans)
    for readout in readouts:
        rows = readout.last_query_rows
        expected = float((rows[:, 1:] > 0.1).sum(dim=1).float().mean())
        assert readout.statistics.query_count == 1
        assert readout.statistics.hidden_sinks == pytest.approx(expected)
        torch.testing.assert_close(rows.sum(dim=1), torch.ones(6))


def test_bfloat16_inputs():
    batch = make_batch(**SCENARIOS["prefill"])
    low = dataclasses.replace(batch, q=batch.q.bfloat16(), k=batch.k.bfloat16(), v=batch.v.bfloat16())
    plans = [RowPlan(ops=COMBINATION, needs=FULL_NEEDS), RowPlan(), RowPlan(ops=IDENTITY_OPS)]
    out, _ = run(low, plans)
    assert out.dtype == torch.bfloat16
    ref_out, _ = reference_attend(
        low.q.float(), low.k.float(), low.v.float(), scale=low.scale, layouts=low.layouts, plans=plans
    )
    for b in range(3):
        rows = batch.valid_queries(b)
        torch.testing.assert_close(out[b, :, rows].double(), ref_out[b, :, rows], atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_cuda_matches_reference(scenario):
    batch = make_batch(**SCENARIOS[scenario]).to("cuda")
    plans = [RowPlan(ops=COMBINATION, needs=FULL_NEEDS), RowPlan(needs=FULL_NEEDS), RowPlan()]
    assert_matches_reference(batch, plans, tolerance=1e-4)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_float64_matches_reference_tightly(scenario):
    """In float64 the fused identities must agree with the literal formulas to rounding."""
    batch = make_batch(**SCENARIOS[scenario])
    batch = dataclasses.replace(batch, q=batch.q.double(), k=batch.k.double(), v=batch.v.double())
    plans = [
        RowPlan(ops=COMBINATION, needs=FULL_NEEDS),
        RowPlan(ops=tuple(SINGLE_OPS.values())[4:10], needs=FULL_NEEDS),
        RowPlan(needs=FULL_NEEDS),
    ]
    assert_matches_reference(batch, plans, tolerance=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_identity_plans_are_bit_identical():
    batch = make_batch(**SCENARIOS["prefill"]).to("cuda")
    plain = plain_sdpa(batch)
    plans = [RowPlan(ops=IDENTITY_OPS, needs=FULL_NEEDS), RowPlan(ops=COMBINATION), RowPlan()]
    out, _ = run(batch, plans)
    for b in (0, 2):
        rows = batch.valid_queries(b)
        assert torch.equal(out[b, :, rows], plain[b, :, rows])
