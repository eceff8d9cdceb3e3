"""Plans and readouts split over head shards (tensor parallelism): each shard applies
RequestPlan.for_head_shard to its own heads, and merge_head_shards puts their readouts back
together; the result must be the unsplit call's."""

from __future__ import annotations

import pytest
import torch
from attnserve.attention.core import attend_rows
from attnserve.attention.plan import (
    ALL_STEPS,
    HeadOutputScale,
    KeyMask,
    RequestPlan,
    RowPlan,
    ScopedOp,
    StepRange,
    Temperature,
)
from attnserve.attention.readout import merge_head_shards
from harness import COMBINATION, FULL_NEEDS, SCENARIOS, make_batch


def test_heads_become_local_and_ops_elsewhere_are_dropped():
    everywhere = ScopedOp(Temperature(2.0))
    straddling = ScopedOp(KeyMask(), heads=(1, 4, 5))
    elsewhere = ScopedOp(HeadOutputScale(0.5), heads=(0,))
    plan = RequestPlan(
        layer_ops={0: ((ALL_STEPS, everywhere), (StepRange(1, 3), straddling)), 2: ((ALL_STEPS, elsewhere),)},
        applied_operations=("temperature", "key_mask", "head_output_scale"),
    )
    local = plan.for_head_shard(4, 4)
    assert local.layer_ops == {
        0: ((ALL_STEPS, everywhere), (StepRange(1, 3), ScopedOp(KeyMask(), heads=(0, 1))))
    }
    assert local.applied_operations == plan.applied_operations
    assert plan.for_head_shard(0, 4).layer_ops[2] == ((ALL_STEPS, elsewhere),)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_together_equal_the_unsplit_call(scenario, num_shards):
    """COMBINATION's ops select heads on some shards only; every readout is asked for."""
    num_heads, num_kv_heads = 6, 6 if num_shards == 3 else 2
    batch = make_batch(num_heads=num_heads, num_kv_heads=num_kv_heads, key_starts=(0,), **SCENARIOS[scenario])
    plan = RequestPlan(layer_ops={0: tuple((ALL_STEPS, op) for op in COMBINATION)})

    def call(request_plan: RequestPlan, heads: slice, kv_heads: slice):
        row_plan = RowPlan(ops=request_plan.ops_for(0, 0), needs=FULL_NEEDS)
        q, k, v = batch.q[:, heads], batch.k[:, kv_heads], batch.v[:, kv_heads]
        out, (readout,) = attend_rows(q, k, v, scale=batch.scale, layouts=batch.layouts, plans=[row_plan])
        return out, readout

    whole_out, whole = call(plan, slice(None), slice(None))
    heads, kv_heads = num_heads // num_shards, num_kv_heads // num_shards
    shards = [
        call(
            plan.for_head_shard(s * heads, heads),
            slice(s * heads, (s + 1) * heads),
            slice(s * kv_heads, (s + 1) * kv_heads),
        )
        for s in range(num_shards)
    ]
    torch.testing.assert_close(torch.cat([out for out, _ in shards], dim=1), whole_out, atol=1e-5, rtol=0)
    merged = merge_head_shards([readout for _, readout in shards])
    torch.testing.assert_close(merged.last_query_rows, whole.last_query_rows, atol=1e-5, rtol=0)
    ours, theirs = vars(merged.statistics), vars(whole.statistics)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-5), name
