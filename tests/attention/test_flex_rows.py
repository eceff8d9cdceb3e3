"""Decode rows through FlexAttention (attention/flex_rows.py) against core.attend_decode_rows and
the eager reference: each covered operation, mixes of them across requests, the compiled kernel,
and the refusal of what the path does not cover."""

from __future__ import annotations

import random

import pytest
import torch
from attnserve.attention.core import attend_decode_rows, effective_ops
from attnserve.attention.flex_rows import FLEX_OPERATIONS, attend_decode_rows_flex, covers
from attnserve.attention.plan import RowPlan
from harness import COMBINATION, SINGLE_OPS, TOLERANCE, make_batch
from reference import reference_attend

# The eager path (compiled=False) is the unfused reference flex_attention warns about.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

COVERED = {name: scoped for name, scoped in SINGLE_OPS.items() if isinstance(scoped.op, FLEX_OPERATIONS)}
COVERED_COMBINATION = tuple(scoped for scoped in COMBINATION if isinstance(scoped.op, FLEX_OPERATIONS))


def decode_batch(seed: int, key_starts=(0, 3, 5, 9)):
    return make_batch(num_queries=1, num_keys=14, key_starts=key_starts, generated=3, seed=seed)


def decode_arguments(batch) -> dict:
    """attend_decode_rows' arguments for the batch's rows, but their operations."""
    return {
        "key_starts": [layout.key_start for layout in batch.layouts],
        "prompt_lengths": [layout.num_prompt_tokens for layout in batch.layouts],
        "scale": batch.scale,
    }


def assert_flex_matches(batch, plans: list[RowPlan], compiled: bool = False) -> torch.Tensor:
    """The flex path equals attend_decode_rows and the reference on every row; returns it."""
    arguments = decode_arguments(batch) | {"ops": [effective_ops(plan) for plan in plans]}
    q = batch.q[:, :, 0]
    flex = attend_decode_rows_flex(q, batch.k, batch.v, compiled=compiled, **arguments)
    core = attend_decode_rows(q, batch.k, batch.v, **arguments)
    reference, _ = reference_attend(
        batch.q, batch.k, batch.v, scale=batch.scale, layouts=batch.layouts, plans=plans
    )
    torch.testing.assert_close(flex, core, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(flex.double(), reference[:, :, 0], atol=TOLERANCE, rtol=TOLERANCE)
    return flex


@pytest.mark.parametrize("name", sorted(COVERED))
def test_each_covered_operation_equals_the_core_and_the_reference(name):
    batch = decode_batch(seed=1)
    plans = [RowPlan(ops=(COVERED[name],))] * len(batch.layouts)
    plain = attend_decode_rows_flex(
        batch.q[:, :, 0], batch.k, batch.v, ops=[()] * len(plans), compiled=False, **decode_arguments(batch)
    )
    edited = assert_flex_matches(batch, plans)
    assert not torch.allclose(edited, plain, atol=1e-4)  # the operation did something


@pytest.mark.parametrize("seed", range(8))
def test_mixes_of_operations_across_requests(seed):
    rng = random.Random(seed)
    choices = [*COVERED.values(), *COVERED_COMBINATION]
    key_starts = tuple(rng.randint(0, 9) for _ in range(6))
    plans = [RowPlan(ops=tuple(rng.sample(choices, rng.randint(0, 5)))) for _ in key_starts]
    assert_flex_matches(decode_batch(seed, key_starts), plans)


def test_the_whole_covered_combination_in_every_request():
    batch = decode_batch(seed=2)
    assert_flex_matches(batch, [RowPlan(ops=COVERED_COMBINATION)] * len(batch.layouts))


def test_the_compiled_kernel_equals_the_core():
    batch = decode_batch(seed=3)
    rng = random.Random(3)
    choices = [*COVERED.values(), *COVERED_COMBINATION]
    plans = [RowPlan(ops=tuple(rng.sample(choices, 4))) for _ in batch.layouts]
    assert_flex_matches(batch, plans, compiled=True)


def test_sink_calibration_is_refused():
    batch = decode_batch(seed=4)
    ops = [(SINGLE_OPS["act"],), (SINGLE_OPS["emphasis"],), (), ()]
    assert not covers(ops)
    with pytest.raises(ValueError, match="apply only"):
        attend_decode_rows_flex(batch.q[:, :, 0], batch.k, batch.v, ops=ops, **decode_arguments(batch))
