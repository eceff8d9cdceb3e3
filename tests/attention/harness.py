"""Random left-padded batches, the operations tried on them, and the comparison of attend_rows
with the eager reference."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from attnserve.attention import core
from attnserve.attention.core import attend_rows
from attnserve.attention.layout import MaskKind, RowLayout
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
from reference import reference_attend

TOLERANCE = 1e-5
FULL_NEEDS = ReadoutNeeds(
    statistics=True, mass_ranges=((0, 2), (1, 5), (3, 40)), last_query_rows=True, image_keys=((2, 4), (5, 9))
)
ALL_KEYS = KeySet(include_generated=True)

SINGLE_OPS = {
    "act": ScopedOp(SinkCalibration()),
    "act_heads_last_query": ScopedOp(SinkCalibration(tau=0.08, beta=0.2), heads=(0, 4), last_query_only=True),
    "act_key_range": ScopedOp(SinkCalibration(beta=0.0), keys=KeySet(ranges=((2, 3),)), heads=(1, 2, 3)),
    "act_generated": ScopedOp(SinkCalibration(tau=0.05), keys=ALL_KEYS),
    "emphasis": ScopedOp(KeyEmphasis(0.01), heads=(0, 2), keys=KeySet(ranges=((1, 4),))),
    "emphasis_invert": ScopedOp(KeyEmphasis(0.2), keys=KeySet(ranges=((2, 5),), invert=True)),
    "emphasis_generated": ScopedOp(KeyEmphasis(5.0), keys=KeySet(ranges=((0, 1),), include_generated=True)),
    "rescale": ScopedOp(LogitRescale(0.7), heads=(1,), keys=KeySet(ranges=((0, 3),))),
    "rescale_last_query": ScopedOp(LogitRescale(-0.4), last_query_only=True, keys=ALL_KEYS),
    "temperature_all_keys": ScopedOp(Temperature(2.0), heads=(0, 1), keys=ALL_KEYS),
    "temperature_prompt_keys": ScopedOp(Temperature(0.5)),
    "temperature_key_range": ScopedOp(Temperature(0.3), heads=(5,), keys=KeySet(ranges=((1, 3),))),
    "mask": ScopedOp(KeyMask(), keys=KeySet(ranges=((0, 2),))),
    "mask_everything": ScopedOp(KeyMask(), heads=(3,), keys=ALL_KEYS),
    "blend": ScopedOp(IdentityBlend(0.4), heads=(2, 3)),
    "blend_full_last_query": ScopedOp(IdentityBlend(1.0), last_query_only=True),
    "head_scale": ScopedOp(HeadOutputScale(0.0), heads=(4,)),
    "head_scale_last_query": ScopedOp(HeadOutputScale(1.7), last_query_only=True),
}

COMBINATION = (
    ScopedOp(HeadOutputScale(0.5), heads=(0, 1)),  # listed first, applied last
    ScopedOp(IdentityBlend(0.3), heads=(1, 2)),
    ScopedOp(SinkCalibration(tau=0.08, beta=0.4), heads=(0, 1, 2)),
    ScopedOp(SinkCalibration(tau=0.1, beta=0.6), heads=(2, 3), keys=ALL_KEYS),
    ScopedOp(LogitRescale(0.7), heads=(1, 2), keys=KeySet(ranges=((0, 4),))),
    ScopedOp(LogitRescale(0.3), heads=(2, 5), keys=KeySet(ranges=((2, 8),))),
    ScopedOp(KeyMask(), heads=(0, 3), keys=KeySet(ranges=((4, 6),))),
    ScopedOp(KeyEmphasis(0.05), heads=(1, 3, 4), keys=KeySet(ranges=((1, 3),), invert=True)),
    ScopedOp(Temperature(1.5), heads=(0, 2, 4)),
    ScopedOp(Temperature(0.7), heads=(2,), keys=ALL_KEYS),
    ScopedOp(IdentityBlend(0.5), heads=(2,), last_query_only=True),
)

IDENTITY_OPS = (
    ScopedOp(SinkCalibration(beta=1.0)),
    ScopedOp(KeyEmphasis(1.0), heads=(1,)),
    ScopedOp(LogitRescale(0.0)),
    ScopedOp(HeadOutputScale(1.0)),
    ScopedOp(IdentityBlend(0.0)),
    ScopedOp(Temperature(1.0), keys=KeySet(ranges=((0, 2),))),
)


@dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    layouts: list[RowLayout]

    @property
    def num_queries(self) -> int:
        return self.q.shape[2]

    def valid_queries(self, row: int) -> slice:
        """Query rows of `row` that are not padding."""
        if self.layouts[row].cross_attention:
            return slice(self.layouts[row].query_start, self.num_queries)
        num_keys = self.k.shape[2]
        first = max(0, self.layouts[row].key_start - (num_keys - self.num_queries))
        return slice(first, self.num_queries)

    def to(self, device: str) -> Batch:
        return Batch(self.q.to(device), self.k.to(device), self.v.to(device), self.scale, self.layouts)


def make_batch(
    *,
    num_heads: int = 6,
    num_kv_heads: int = 2,
    num_queries: int,
    num_keys: int,
    key_starts: tuple[int, ...] = (0, 3, 5),
    generated: int = 0,
    head_dim: int = 16,
    seed: int = 0,
    sink_positions: tuple[int, ...] = (0, 2),
    mask: MaskKind = MaskKind.CAUSAL,
    query_starts: tuple[int, ...] | None = None,
    block_size: int = 0,
) -> Batch:
    """Random batch; keys at sink_positions of each row share a direction with every query,
    so they draw attention (ACT then finds sinks). The last `generated` tokens of each row are
    generated tokens. query_starts makes the rows cross-attention (queries of their own);
    a BLOCK mask gets blocks of block_size tokens."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(key_starts)
    q = torch.randn(batch, num_heads, num_queries, head_dim, generator=generator)
    k = torch.randn(batch, num_kv_heads, num_keys, head_dim, generator=generator)
    v = torch.randn(batch, num_kv_heads, num_keys, head_dim, generator=generator)
    direction = torch.randn(head_dim, generator=generator)
    direction = 2.5 * direction / direction.norm()
    q += direction
    for b, start in enumerate(key_starts):
        for position in sink_positions:
            if start + position < num_keys:
                k[b, :, start + position] += direction
    layouts = [
        RowLayout(
            key_start=s,
            num_prompt_tokens=num_keys - s - generated,
            mask=mask,
            cross_attention=query_starts is not None,
            query_start=0 if query_starts is None else query_starts[b],
            block_ids=tuple(j // block_size for j in range(num_keys - s)) if mask is MaskKind.BLOCK else (),
        )
        for b, s in enumerate(key_starts)
    ]
    return Batch(q, k, v, head_dim**-0.5, layouts)


#: Prefill (Lq = Lk), decode (Lq = 1) with generated tokens, and a multi-token decode step.
SCENARIOS = {
    "prefill": {"num_queries": 12, "num_keys": 12},
    "decode": {"num_queries": 1, "num_keys": 12, "generated": 4},
    "multi_query": {"num_queries": 4, "num_keys": 12, "generated": 3},
}


def plain_sdpa(batch: Batch) -> torch.Tensor:
    """Unedited attention, mask built here independently of core."""
    num_keys = batch.k.shape[2]
    mask = torch.zeros(len(batch.layouts), 1, batch.num_queries, num_keys, dtype=torch.bool)
    for b, layout in enumerate(batch.layouts):
        start = layout.key_start
        for i in range(batch.valid_queries(b).start, batch.num_queries):
            position = num_keys - batch.num_queries + i - start  # in the row (self-attention)
            for j in range(start, num_keys):
                if layout.mask is MaskKind.FULL:
                    mask[b, 0, i, j] = True
                elif layout.mask is MaskKind.BLOCK:
                    mask[b, 0, i, j] = layout.block_ids[j - start] <= layout.block_ids[position]
                else:
                    mask[b, 0, i, j] = j - start <= position
    return F.scaled_dot_product_attention(
        batch.q, batch.k, batch.v, attn_mask=mask.to(batch.q.device), scale=batch.scale, enable_gqa=True
    )


def run(batch: Batch, plans: list[RowPlan]):
    return attend_rows(batch.q, batch.k, batch.v, scale=batch.scale, layouts=batch.layouts, plans=plans)


@contextlib.contextmanager
def statistics_path(materialise_all: bool):
    """Force the statistics of every row through materialised probabilities or the fused identities."""
    saved = core.MATERIALISED_STATISTICS_ELEMENTS
    core.MATERIALISED_STATISTICS_ELEMENTS = 1 << 62 if materialise_all else 0
    try:
        yield
    finally:
        core.MATERIALISED_STATISTICS_ELEMENTS = saved


def assert_matches_reference(
    batch: Batch, plans: list[RowPlan], tolerance: float = TOLERANCE
) -> torch.Tensor:
    """attend_rows equals the reference on every valid query row and readout, with statistics
    both fused and materialised; returns the output."""
    cpu = batch.to("cpu")
    ref_out, ref_readouts = reference_attend(
        cpu.q, cpu.k, cpu.v, scale=cpu.scale, layouts=cpu.layouts, plans=plans
    )
    for materialise_all in (False, True):
        with statistics_path(materialise_all):
            out, readouts = run(batch, plans)
        assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
        for b in range(len(plans)):
            rows = batch.valid_queries(b)
            torch.testing.assert_close(
                out[b, :, rows].double().cpu(), ref_out[b, :, rows], atol=tolerance, rtol=tolerance
            )
            assert_readout_matches(readouts[b], ref_readouts[b], tolerance)
    return out


def assert_readout_matches(readout, expected, tolerance: float) -> None:
    if expected is None:
        assert readout is None
        return
    assert readout is not None
    approx = {"abs": tolerance, "rel": tolerance}
    tensor_tolerance = max(tolerance, 1e-6)  # readout tensors are float32 whatever the input
    if expected.statistics is None:
        assert readout.statistics is None
    else:
        got, want = readout.statistics, expected.statistics
        assert got.query_count == want.query_count
        assert got.image_query_count == want.image_query_count
        for name in (
            "entropy",
            "normalized_entropy",
            "sink_mass",
            "sink_mass_first4",
            "hidden_sinks",
            "image_mass",
            "image_entropy",
        ):
            if getattr(want, name) is None:  # does not apply to the layout
                assert getattr(got, name) is None, name
            else:
                assert getattr(got, name) == pytest.approx(getattr(want, name), **approx), name
        assert got.range_mass == pytest.approx(want.range_mass, **approx)
    if expected.last_query_rows is None:
        assert readout.last_query_rows is None
    else:
        assert readout.last_query_rows.dtype == torch.float32
        torch.testing.assert_close(
            readout.last_query_rows.double().cpu(),
            expected.last_query_rows,
            atol=tensor_tolerance,
            rtol=tensor_tolerance,
        )
