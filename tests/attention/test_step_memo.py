"""A StepMemo shared by the layers of a step (attention/step_memo.py) holds what depends on the
rows' geometry and operations only: layers with other queries, keys and values, sharing it, get
exactly what they get without it."""

from __future__ import annotations

import pytest
import torch
from attnserve.attention.core import attend_rows
from attnserve.attention.plan import RowPlan
from attnserve.attention.step_memo import StepMemo
from harness import COMBINATION, FULL_NEEDS, SCENARIOS, SINGLE_OPS, make_batch

PLANS = [
    RowPlan(ops=COMBINATION),
    RowPlan(ops=(SINGLE_OPS["act_heads_last_query"], SINGLE_OPS["emphasis"]), needs=FULL_NEEDS),
    RowPlan(ops=(SINGLE_OPS["rescale"],)),
]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_layers_sharing_a_memo_equal_layers_without(scenario):
    memo = StepMemo()
    for layer in range(3):  # same geometry, other numbers in each layer
        batch = make_batch(**SCENARIOS[scenario], seed=layer)
        arguments = {"scale": batch.scale, "layouts": batch.layouts, "plans": PLANS}
        alone, alone_readouts = attend_rows(batch.q, batch.k, batch.v, **arguments)
        shared, shared_readouts = attend_rows(batch.q, batch.k, batch.v, **arguments, memo=memo)
        assert torch.equal(shared, alone)
        for ours, theirs in zip(shared_readouts, alone_readouts):
            assert (ours is None) == (theirs is None)
            if theirs is not None:
                assert ours.statistics == theirs.statistics
                assert torch.equal(ours.last_query_rows, theirs.last_query_rows)
    # Built once each: the folded pass (on a decode step every row, the one with readouts too;
    # with more queries only the third, whose operation acts on every query row), and one entry
    # per row one at a time.
    assert len(memo.geometries) == 1
    assert len(memo.prepared) == (1 if scenario == "decode" else 3)
