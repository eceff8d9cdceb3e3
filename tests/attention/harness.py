"""Random left-padded batches and the comparison of attend_rows with the eager reference."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from attnserve.attention import core
from attnserve.attention.core import attend_rows
from attnserve.attention.layout import RowLayout
from attnserve.attention.plan import ReadoutRequest, RowPlan
from reference import reference_attend

TOLERANCE = 1e-5
FULL_READOUT = ReadoutRequest(
    statistics=True, mass_ranges=((0, 2), (1, 5), (3, 40)), row_heads=(), prompt_attention=True
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
) -> Batch:
    """Random batch; keys at sink_positions of each row share a direction with every query,
    so they draw attention (ACT then finds sinks). The last `generated` tokens of each row are
    generated tokens."""
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
    layouts = [RowLayout(key_start=s, num_prompt_tokens=num_keys - s - generated) for s in key_starts]
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
        for i in range(batch.num_queries):
            mask[b, 0, i, layout.key_start : num_keys - batch.num_queries + i + 1] = True
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
        for name in ("entropy", "normalized_entropy", "sink_mass", "sink_mass_first4", "hidden_sinks"):
            assert getattr(got, name) == pytest.approx(getattr(want, name), **approx), name
        assert got.range_mass == pytest.approx(want.range_mass, **approx)
    if expected.attention_rows is None:
        assert readout.attention_rows is None
    else:
        assert readout.attention_rows.dtype == torch.float32
        torch.testing.assert_close(
            readout.attention_rows.double().cpu(),
            expected.attention_rows,
            atol=tensor_tolerance,
            rtol=tensor_tolerance,
        )
    if expected.prompt_attention is None:
        assert readout.prompt_attention is None
    else:
        assert readout.prompt_attention.dtype == torch.float32
        torch.testing.assert_close(
            readout.prompt_attention.double().cpu(),
            expected.prompt_attention,
            atol=tensor_tolerance,
            rtol=tensor_tolerance,
        )
