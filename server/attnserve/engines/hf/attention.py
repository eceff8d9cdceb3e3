"""The transformers attention hook: the engine's own SDPA for the whole batch, then the rows of
planned requests recomputed by attention.core.

Registered as attn_implementation "attnserve". The per-step BatchAttention travels as the
`attnserve_batch` keyword that transformers forwards from model(...) down to this function,
so nothing is global: a forward without it is plain SDPA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ...attention.core import attend_rows, effective_ops
from ...attention.layout import RowLayout
from ...attention.plan import RowPlan
from ...attention.readout import RowReadout
from ...attention.step_memo import StepMemo

ATTN_IMPLEMENTATION = "attnserve"

#: (layer, batch rows, their readouts) -> None
ReadoutSink = Callable[[int, Sequence[int], Sequence[RowReadout | None]], None]


class BatchAttention:
    """What one forward step asks of attention: each row's layout and, per layer, its plan."""

    def __init__(
        self,
        layouts: Sequence[RowLayout],
        plan_for: Callable[[int, int], RowPlan | None],
        on_readouts: ReadoutSink,
    ):
        """plan_for(row, layer) gives a row's RowPlan for a layer (None leaves it untouched)."""
        self.layouts = layouts
        self._plan_for = plan_for
        self.on_readouts = on_readouts
        #: What the planned rows' attention calls share across the step's layers.
        self.step_memo = StepMemo()
        self._row_indexes: dict[tuple[int, ...], torch.Tensor] = {}

    def planned_rows(self, layer: int) -> tuple[list[int], list[RowPlan]]:
        rows, plans = [], []
        for row in range(len(self.layouts)):
            plan = self._plan_for(row, layer)
            if plan is not None:
                rows.append(row)
                plans.append(plan)
        return rows, plans

    def row_index(self, rows: Sequence[int], device: torch.device) -> torch.Tensor | None:
        """The rows as an index tensor on the device, made once per step for each set of rows
        (usually one: the planned requests); None when they are every row of the batch."""
        key = tuple(rows)
        if len(key) == len(self.layouts):
            return None
        if key not in self._row_indexes:
            self._row_indexes[key] = torch.tensor(key, dtype=torch.long, device=device)
        return self._row_indexes[key]


def attnserve_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """query (B, H, Lq, D); key/value (B, Hkv, Lk, D) after rope and cache update."""
    batch: BatchAttention | None = kwargs.pop("attnserve_batch", None)
    output, weights = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, **kwargs
    )
    if batch is None:
        return output, weights
    rows, plans = batch.planned_rows(module.layer_idx)
    if not rows:
        return output, weights
    index = batch.row_index(rows, query.device)
    if index is not None:
        query, key, value = (
            query.index_select(0, index),
            key.index_select(0, index),
            value.index_select(0, index),
        )
    edited, readouts = attend_rows(
        query,
        key,
        value,
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        layouts=[batch.layouts[r] for r in rows],
        plans=plans,
        memo=batch.step_memo,
        plain_outputs=False,
    )
    # Rows with readouts only keep the engine's own output; the edited ones are written at once.
    edited_rows = [j for j, plan in enumerate(plans) if effective_ops(plan)]
    if edited_rows:
        edited = edited.transpose(1, 2).to(output.dtype)  # output is (B, Lq, H, D)
        if len(edited_rows) == len(rows) and index is None:
            output.copy_(edited)
        else:
            targets = torch.tensor([rows[j] for j in edited_rows], device=output.device)
            sources = torch.tensor(edited_rows, device=output.device)
            output.index_copy_(0, targets, edited.index_select(0, sources))
    batch.on_readouts(module.layer_idx, rows, readouts)
    return output, weights


def register() -> None:
    """Make attn_implementation="attnserve" available (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, attnserve_attention)
    # Without a mask function of the same name transformers would pass no causal mask.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
