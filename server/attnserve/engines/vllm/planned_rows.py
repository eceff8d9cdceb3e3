"""The planned rows of a vLLM batch, recomputed: what the attnserve attention backends share.

Each backend runs the engine's own fused kernel for the whole batch, then recomputes the rows of
planned requests with attention.core (apply_row_plans), in the step context that the worker's
runner hook set (worker.py). The plugin (plugin.py) registers the backends (cpu_backend.py,
flash_backend.py) in place of the platform's: only the impl's forward changes; metadata
builders, KV layouts and kernels stay vLLM's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from ...attention.core import attend_folded_rows, attend_rows, effective_ops, folds
from ...attention.folded_rows import fold_groups
from ...attention.layout import RowLayout
from ...attention.plan import RowPlan
from ...attention.readout import RowReadout
from ...readouts import CallSite
from . import worker
from .paged_kv import KVSlots
from .worker import PlannedRow, StepContext

#: (batch rows, their sequence lengths) -> the rows' keys and values (B, Hkv, n, D), right-padded.
KVReader = Callable[[list[int], list[int]], tuple[torch.Tensor, torch.Tensor]]
#: (kv_cache, slots) -> k, v (B, num_kv_heads, n, head_dim): one layout's gather (paged_kv.py).
PagedKVReader = Callable[[torch.Tensor, KVSlots], tuple[torch.Tensor, torch.Tensor]]


class PlannedRowsMixin:
    """The per-request correction, mixed in before a vLLM attention impl: its forward, then the
    planned rows. Uses the impl's scale, attn_type, sliding_window, logits_soft_cap,
    alibi_slopes and sinks (as vLLM's impls set them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        worker.install_runner_hook()
        # attention.core computes softmax(q k^T * scale) over every earlier key; the engine
        # refuses interventions for models whose attention is anything else (see engine.py).
        self._plain_softmax = not (
            getattr(self, "sliding_window", None) not in (None, -1)
            or getattr(self, "logits_soft_cap", None)
            or getattr(self, "alibi_slopes", None) is not None
            or getattr(self, "sinks", None) is not None
        )

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        output = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        step = worker.current_step()
        if step is not None:
            self._apply_plans(step, layer, query, output, kv_cache, attn_metadata)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        # A request whose plan makes its numbers overflow fails alone (NonFiniteOutput), but its
        # NaN or infinite keys and values would stay in the cache blocks vLLM hands to later
        # requests, and vLLM's CPU kernel lets the stale values in a block's unused slots reach
        # their output (tests/vllm_engine/test_row_isolation.py). In steps with planned rows
        # (only plans overflow), they are written as 0 instead; plain steps pay nothing.
        if worker.current_step() is not None:
            finite = {"nan": 0.0, "posinf": 0.0, "neginf": 0.0}
            key, value = torch.nan_to_num(key, **finite), torch.nan_to_num(value, **finite)
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def paged_kv_reader(self, layer) -> PagedKVReader:
        """How this backend's KV cache is read back (paged_kv.py)."""
        raise NotImplementedError

    def _apply_plans(self, step: StepContext, layer, query, output, kv_cache, attn_metadata) -> None:
        if attn_metadata is None or self.attn_type != AttentionType.DECODER:
            return
        if not self._plain_softmax:
            raise RuntimeError(
                "attnserve recomputes plain softmax attention only (no window, softcap, ALiBi or sinks)"
            )
        read = self.paged_kv_reader(layer)
        metadata_id = id(attn_metadata)

        def read_kv(rows: list[int], seq_lens: list[int]):
            slots = step_kv_slots(
                step, metadata_id, attn_metadata.block_table, rows, seq_lens, kv_cache.shape[2]
            )
            return read(kv_cache, slots)

        apply_row_plans(
            step,
            _layer_index(layer.layer_name),
            query,
            output,
            scale=self.scale,
            query_start_loc=attn_metadata.query_start_loc,
            seq_lens=attn_metadata.seq_lens,
            metadata_id=metadata_id,
            read_kv=read_kv,
        )


def step_kv_slots(
    step: StepContext,
    metadata_id: int,
    block_table: torch.Tensor,
    rows: list[int],
    seq_lens: list[int],
    block_size: int,
) -> KVSlots:
    """Where the rows' keys sit: worked out once per step and KV cache group, read by every layer."""
    key = (metadata_id, tuple(rows))
    slots = step.kv_slots.get(key)
    if slots is None:
        index = torch.tensor(rows, device=block_table.device)
        slots = step.kv_slots[key] = KVSlots.of(block_table[index], seq_lens, block_size)
    return slots


def apply_row_plans(
    step: StepContext,
    layer_index: int,
    query: torch.Tensor,
    output: torch.Tensor,
    *,
    scale: float,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    metadata_id: int,
    read_kv: KVReader,
) -> None:
    """After the engine's kernel wrote `output` (T, H, D) for the whole batch, recompute the rows
    of planned requests with attention.core and record their readouts.

    query (T, H, D) are the batch's queries; a request's query tokens are the last ones of its
    sequence, its keys and values come from the paged cache through read_kv.
    """
    if step.layers_with_work is not None and layer_index not in step.layers_with_work:
        return
    bounds = step.bounds.get(metadata_id)
    if bounds is None:
        bounds = step.bounds[metadata_id] = (query_start_loc.tolist(), seq_lens.tolist())
    starts, lengths = bounds
    decoding: list[tuple[PlannedRow, RowPlan]] = []
    prefilling: list[tuple[PlannedRow, RowPlan]] = []
    one_by_one: list[tuple[PlannedRow, RowPlan]] = []
    for planned in step.rows:
        row = planned.row
        planned.seq_len = lengths[row]
        plan = planned.plan.for_call(layer_index, planned.step, planned.sampled)
        if plan is None:
            continue
        num_queries = starts[row + 1] - starts[row]
        if not folds(plan, num_queries, planned.seq_len, query.shape[1]):
            one_by_one.append((planned, plan))
        elif num_queries == 1:
            decoding.append((planned, plan))
        else:
            prefilling.append((planned, plan))
    # Decode rows apart from prefills (folded together, each would take a prefill's query slots),
    # and rows of very different sizes apart (folded_rows.fold_groups).
    for folded in (decoding, prefilling):
        sizes = [(starts[planned.row + 1] - starts[planned.row]) * planned.seq_len for planned, _ in folded]
        for group in fold_groups(sizes, query.shape[1]):
            rows = [folded[i] for i in group]
            _attend_folded(rows, layer_index, query, output, scale, starts, read_kv, step)
    if one_by_one:
        _attend_one_by_one(one_by_one, layer_index, query, output, scale, starts, read_kv, step)


def _attend_one_by_one(
    rows: list[tuple[PlannedRow, RowPlan]],
    layer_index: int,
    query: torch.Tensor,
    output: torch.Tensor,
    scale: float,
    starts: list[int],
    read_kv: KVReader,
    step: StepContext,
) -> None:
    """Planned rows that do not fold (rows of several queries with an operation on some query
    rows only, rows too large to fold): their keys and values in one gather, then attention.core
    one row at a time."""
    k, v = read_kv([planned.row for planned, _ in rows], [planned.seq_len for planned, _ in rows])
    for i, (planned, plan) in enumerate(rows):
        first, last = starts[planned.row], starts[planned.row + 1]
        edited, (readout,) = attend_rows(
            query[first:last].transpose(0, 1)[None],
            k[i : i + 1, :, : planned.seq_len],
            v[i : i + 1, :, : planned.seq_len],
            scale=scale,
            layouts=[RowLayout(key_start=0, num_prompt_tokens=planned.layout_prompt_tokens)],
            plans=[plan],
            memo=step.step_memo,
            plain_outputs=False,
        )
        if effective_ops(plan):
            output[first:last] = edited[0].transpose(0, 1).to(output.dtype)
        _record(planned, layer_index, readout)


def _attend_folded(
    rows: list[tuple[PlannedRow, RowPlan]],
    layer_index: int,
    query: torch.Tensor,
    output: torch.Tensor,
    scale: float,
    starts: list[int],
    read_kv: KVReader,
    step: StepContext,
) -> None:
    """Planned rows of one query each (decode) or of several (prefill): one pass for all
    (folded_rows.py), their keys and values gathered into one right-padded batch, their queries
    into query slots from 0. Rows that only read out keep the kernel's output."""
    batch_rows = [planned.row for planned, _ in rows]
    seq_lens = [planned.seq_len for planned, _ in rows]
    k, v = read_kv(batch_rows, seq_lens)
    slots = _query_slots(starts, batch_rows, query.device)
    batch, num_slots = slots.tokens.shape
    queries = query.index_select(0, slots.tokens.flatten()).view(batch, num_slots, *query.shape[1:])
    ops = [effective_ops(plan) for _, plan in rows]
    edited, readouts = attend_folded_rows(
        queries.transpose(1, 2),
        k,
        v,
        key_starts=[0] * batch,
        key_ends=seq_lens,
        query_counts=slots.counts,
        prompt_lengths=[planned.layout_prompt_tokens for planned, _ in rows],
        scale=scale,
        ops=ops,
        needs=[plan.needs for _, plan in rows],
        memo=step.step_memo,
    )
    for (planned, _), readout in zip(rows, readouts):
        _record(planned, layer_index, readout)
    if all(ops):
        real = edited.transpose(1, 2)[slots.real] if slots.real is not None else edited[:, :, 0]
        output.index_copy_(0, slots.real_tokens, real.to(output.dtype))
        return
    for j, (planned, _) in enumerate(rows):
        if ops[j]:
            first, last = starts[planned.row], starts[planned.row + 1]
            output[first:last] = edited[j, :, : last - first].transpose(0, 1).to(output.dtype)


def _record(planned: PlannedRow, layer_index: int, readout: RowReadout | None) -> None:
    if readout is not None:  # recorded after the forward (worker.StepPlanner.publish)
        planned.calls.append((CallSite(layer_index, planned.step, planned.seq_len - 1), readout))


@dataclass(frozen=True)
class QuerySlots:
    """Where the folded rows' query slots come from in the batch's tokens."""

    #: (B, L) each slot's token; a padding slot repeats its row's last token.
    tokens: torch.Tensor
    counts: tuple[int, ...]
    #: (B, L) the slots holding a query; None when every row has one query.
    real: torch.Tensor | None
    #: The tokens of the real slots, in order.
    real_tokens: torch.Tensor


def _query_slots(starts: list[int], rows: list[int], device: torch.device) -> QuerySlots:
    counts = tuple(starts[row + 1] - starts[row] for row in rows)
    first = torch.tensor([starts[row] for row in rows], device=device)[:, None]
    if max(counts) == 1:
        return QuerySlots(tokens=first, counts=counts, real=None, real_tokens=first[:, 0])
    counts_t = torch.tensor(counts, device=device)[:, None]
    offsets = torch.arange(max(counts), device=device)[None, :]
    real = offsets < counts_t
    tokens = first + torch.minimum(offsets, counts_t - 1)
    return QuerySlots(tokens=tokens, counts=counts, real=real, real_tokens=tokens[real])


@functools.cache
def _layer_index(layer_name: str) -> int:
    return extract_layer_index(layer_name)
