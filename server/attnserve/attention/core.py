"""attend_rows: batched attention with each row's RowPlan applied, and its readouts.

Each row's RowLayout (layout.py) says where its queries and keys sit and which keys each query
sees: causal, full (bidirectional self-attention, cross-attention) or block-causal. The same
operations and statistics serve every layout, except what needs each query's own key, which
cross-attention has not: identity blends are refused there, and so is a key mask that would
leave a query no key; the sink statistics are None on full-mask rows
(docs/attention-math.md#layouts).

Rows whose plan edits nothing (no ops, or only identity ops) go through one plain SDPA call on
the padded batch, so their output is bit-identical to the unedited path. Causal rows that edit
or read out go through the steps below together, folded into one row of many heads
(folded_rows.py): decode rows (one query each), and rows of several queries whose operations act
on every query row; a row with readouts folds when it is small enough that alone it would
materialise every head's probabilities (its readouts are then read from its heads of the folded
pass). Other rows go one at a time, with their padding cut off. In float32:
- pre-softmax ops become a query gain and one additive bias for a single fused SDPA call;
  logits are materialised only for heads whose bias depends on them (LogitRescale,
  temperature on part of the keys);
- ACT materialises the probabilities of its heads (sink detection needs column means),
  reweights them, and those heads take their output from them (P V); the fused call serves the
  other heads;
- output ops edit the fused output (o' = (1-u) o + u v_own, o' = c o; identity U there);
- statistics reuse the fused call (lse, values := [V | K | indicator columns]).
What depends only on a row's geometry and operations (scopes, the bias, which heads are
materialised) is prepared once (prepare) and shared by calls with equal geometry and
operations: the layers of an engine step, through its StepMemo (step_memo.py).
The identities, the order of the operations and the statistics: docs/attention-math.md.
Pure torch; works on CPU and CUDA tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnserve.attention import kernels
from attnserve.attention.folded_rows import (
    attend_folded,
    fold_decode_rows,
    fold_groups,
    fold_rows,
    folds_queries,
    folds_size,
)
from attnserve.attention.interventions import (
    AppliedOp,
    LogitEdits,
    applied_ops,
    edit_logits,
    edit_output,
    edit_probabilities,
    prepare_logit_edits,
    prepare_probabilities,
    probability_heads,
    refuse_removing_every_key,
)
from attnserve.attention.layout import MaskKind, RowLayout
from attnserve.attention.operations.base import EditedLogits
from attnserve.attention.plan import ReadoutNeeds, RowPlan, ScopedOp
from attnserve.attention.readout import RowReadout
from attnserve.attention.row_attention import RowAttention
from attnserve.attention.statistics import (
    HeadPieces,
    MassColumns,
    StatisticsGeometry,
    fused_pieces,
    last_query_rows,
    layer_statistics,
    mass_columns,
    materialised_pieces,
)
from attnserve.attention.step_memo import StepMemo

#: With statistics, rows with at most this many logits (heads x queries x keys: a decode step,
#: a short prompt) materialise every head's probabilities; larger rows use the fused identities.
MATERIALISED_STATISTICS_ELEMENTS = 1 << 20


def visibility_mask(
    layouts: Sequence[RowLayout], num_queries: int, num_keys: int, device: torch.device
) -> torch.Tensor:
    """(B, 1, Lq, Lk) bool: whether query row i of row b sees key j (layout.py).

    Padded query rows see nothing (SDPA then gives 0 on CPU; their output is unspecified).
    """
    key_index = torch.arange(num_keys, device=device)
    if all(layout.mask is MaskKind.CAUSAL for layout in layouts):
        # Causal rows at once: query row i of row b sees key_start_b <= j <= Lk - Lq + i.
        query_index = torch.arange(num_keys - num_queries, num_keys, device=device)
        key_start = torch.tensor([layout.key_start for layout in layouts], device=device)
        causal = key_index[None, :] <= query_index[:, None]
        not_padding = key_index[None, :] >= key_start[:, None]
        return (causal[None] & not_padding[:, None, :])[:, None]
    mask = torch.zeros(len(layouts), 1, num_queries, num_keys, dtype=torch.bool, device=device)
    for b, layout in enumerate(layouts):
        row_queries = layout.num_queries(num_queries, num_keys)
        row_keys = num_keys - layout.key_start
        mask[b, 0, num_queries - row_queries :, layout.key_start :] = layout.visibility(
            row_queries, row_keys, device
        )
    return mask


def plain_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, layouts: Sequence[RowLayout]
) -> torch.Tensor:
    """The unedited attention of a left-padded batch (one SDPA call)."""
    mask = visibility_mask(layouts, q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def effective_ops(plan: RowPlan | None) -> tuple[ScopedOp, ...]:
    """The plan's operations that change anything."""
    return () if plan is None else tuple(scoped for scoped in plan.ops if not scoped.op.is_identity)


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layouts: Sequence[RowLayout], plans: Sequence[RowPlan]
) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q (B, H, Lq, D), k and v (B, Hkv, Lk, D); got {q.shape}, {k.shape}, {v.shape}"
        )
    batch, num_heads, num_queries, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or num_heads % k.shape[1] != 0:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)}")
    if len(layouts) != batch or len(plans) != batch:
        raise ValueError(f"{batch} rows but {len(layouts)} layouts and {len(plans)} plans")
    for layout, plan in zip(layouts, plans):
        if not 0 <= layout.key_start < k.shape[2]:
            raise ValueError(f"key_start {layout.key_start} outside 0..{k.shape[2] - 1}")
        if layout.cross_attention:
            if not 0 <= layout.query_start < num_queries:
                raise ValueError(f"query_start {layout.query_start} outside 0..{num_queries - 1}")
            for scoped in effective_ops(plan):
                if scoped.op.needs_own_key:
                    raise ValueError(f"{scoped.op.name} needs each query's own key; cross-attention has none")
        elif num_queries > k.shape[2]:
            raise ValueError(f"more queries ({num_queries}) than keys ({k.shape[2]})")


def attend_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    layouts: Sequence[RowLayout],
    plans: Sequence[RowPlan],
    memo: StepMemo | None = None,
    plain_outputs: bool = True,
) -> tuple[torch.Tensor, list[RowReadout | None]]:
    """Attention of a left-padded batch with plans[b] applied to row b, laid out as layouts[b]
    (layout.py). Returns the output (B, H, Lq, D) in q's dtype and one RowReadout per row (None
    when the row asks for none). Padded query rows of edited rows are zero. A caller that runs
    the same rows through several layers (an engine step) passes one memo to all of them. With
    plain_outputs False, rows whose plan edits nothing (readouts only) are left zero: for
    engines that keep their own kernel's output for them."""
    _check(q, k, v, layouts, plans)
    row_ops = [effective_ops(plan) for plan in plans]
    plain_rows = [b for b, ops in enumerate(row_ops) if not ops] if plain_outputs else []
    if plain_rows and len(plain_rows) == len(plans):
        output = plain_attention(q, k, v, scale=scale, layouts=layouts)
    else:
        output = torch.zeros_like(q)
        if plain_rows:
            index = torch.tensor(plain_rows, device=q.device)
            sub_layouts = [layouts[b] for b in plain_rows]
            output[index] = plain_attention(q[index], k[index], v[index], scale=scale, layouts=sub_layouts)

    readouts: list[RowReadout | None] = [None] * len(plans)
    folded = [b for b in range(len(plans)) if _foldable(q, k, layouts[b], plans[b])]
    sizes = [math.prod(_row_shape(q, k, layouts[b])) for b in folded]
    for group in fold_groups(sizes, q.shape[1]):
        _attend_folded(q, k, v, scale, layouts, plans, [folded[i] for i in group], memo, output, readouts)

    for b, (plan, ops) in enumerate(zip(plans, row_ops)):
        if (not ops and plan.needs.is_empty) or b in folded:
            continue
        row = RowAttention.from_batch(q, k, v, b, layouts[b], scale)
        row_output, readouts[b] = _attend_row(row, ops, plan, memo)
        if ops:
            output[b, :, q.shape[2] - row.num_queries :] = row_output.to(q.dtype)
    return output, readouts


def folds(plan: RowPlan, num_queries: int, num_keys: int, num_heads: int) -> bool:
    """Whether a causal row of this size (its padding cut off) with this plan goes through
    attention.core folded with others like it (folded_rows.py): it edits or reads out; its
    logits fit in a folded pass; with several queries its operations act on every query row;
    with readouts it is small enough that a row alone would materialise every head too."""
    ops = effective_ops(plan)
    if not ops and plan.needs.is_empty:
        return False
    if not folds_size(num_queries, num_keys, num_heads):
        return False
    if not plan.needs.is_empty and num_heads * num_queries * num_keys > MATERIALISED_STATISTICS_ELEMENTS:
        return False
    return num_queries == 1 or folds_queries(ops)


def _foldable(q: torch.Tensor, k: torch.Tensor, layout: RowLayout, plan: RowPlan) -> bool:
    if layout.cross_attention:
        return False
    num_queries, num_keys = _row_shape(q, k, layout)
    # One query sees every key, block-causal or causal.
    causal = layout.mask is MaskKind.CAUSAL or (num_queries == 1 and layout.mask is MaskKind.BLOCK)
    return causal and folds(plan, num_queries, num_keys, q.shape[1])


def _row_shape(q: torch.Tensor, k: torch.Tensor, layout: RowLayout) -> tuple[int, int]:
    """(valid queries, keys) of a row of the padded batch, its padding cut off."""
    return layout.num_queries(q.shape[2], k.shape[2]), k.shape[2] - layout.key_start


def attend_decode_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_starts: Sequence[int],
    prompt_lengths: Sequence[int],
    scale: float,
    ops: Sequence[tuple[ScopedOp, ...]],
    key_ends: Sequence[int] | None = None,
    memo: StepMemo | None = None,
) -> torch.Tensor:
    """Decode rows of several requests in one pass: q (B, H, D) each request's query (its last
    token); k, v (B, Hkv, n, D) padded, request b's keys at key_starts[b]..key_ends[b]-1
    (key_ends default: n, left-padded). Returns (B, H, D) in float32 (or float64), ops[b] applied
    to request b. A caller that runs the same rows through several layers passes one memo to all
    of them (folded_rows.py)."""
    rows = fold_decode_rows(q, k, v, key_starts, prompt_lengths, scale, key_ends, memo)
    out, _ = attend_folded(rows, ops, memo)
    return out[:, :, 0]


def attend_folded_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_starts: Sequence[int],
    key_ends: Sequence[int],
    query_counts: Sequence[int],
    prompt_lengths: Sequence[int],
    scale: float,
    ops: Sequence[tuple[ScopedOp, ...]],
    needs: Sequence[ReadoutNeeds] | None = None,
    memo: StepMemo | None = None,
) -> tuple[torch.Tensor, list[RowReadout | None]]:
    """Causal rows of several requests in one pass, each with its own number of queries (a
    prefill's prompt, a decode step's one token): q (B, H, L, D) request b's queries, its last
    query_counts[b] tokens, in slots 0..query_counts[b]-1; k, v (B, Hkv, n, D) padded, request
    b's keys at key_starts[b]..key_ends[b]-1. Returns (B, H, L, D) in float32 (or float64), ops[b]
    applied to request b, padding slots holding no meaningful numbers; and what needs[b] reads
    of request b's final map (None when it reads nothing). Rows of several queries take only
    operations that act on every query row (folded_rows.folds_queries)."""
    rows = fold_rows(
        q,
        k,
        v,
        key_starts=key_starts,
        key_ends=key_ends,
        query_counts=query_counts,
        prompt_lengths=prompt_lengths,
        scale=scale,
        memo=memo,
    )
    return attend_folded(rows, ops, memo, needs)


def _attend_folded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    layouts: Sequence[RowLayout],
    plans: Sequence[RowPlan],
    rows: Sequence[int],
    memo: StepMemo | None,
    output: torch.Tensor,
    readouts: list[RowReadout | None],
) -> None:
    """The given rows of a left-padded batch, folded into one pass: the edited rows' outputs
    written into output (B, H, Lq, D), the rows' readouts into readouts."""
    num_queries = q.shape[2]
    counts = [_row_shape(q, k, layouts[b])[0] for b in rows]
    # The rows' keys only: the padding all of them have is cut off.
    cut = min(layouts[b].key_start for b in rows)
    k, v = k[:, :, cut:], v[:, :, cut:]
    num_keys = k.shape[2]
    if list(rows) != list(range(q.shape[0])):
        index = torch.tensor(list(rows), device=q.device)
        q, k, v = q[index], k[index], v[index]
    slots = max(counts)
    # Row b's valid queries are the batch's last counts[b]; they go to slots 0..counts[b]-1.
    first = torch.tensor([num_queries - count for count in counts], device=q.device)
    taken = (first[:, None] + torch.arange(slots, device=q.device)[None, :]).clamp(max=num_queries - 1)
    queries = q.gather(2, taken[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    ops = [effective_ops(plans[b]) for b in rows]
    edited, row_readouts = attend_folded_rows(
        queries,
        k,
        v,
        key_starts=[layouts[b].key_start - cut for b in rows],
        key_ends=[num_keys] * len(rows),
        query_counts=counts,
        prompt_lengths=[layouts[b].num_prompt_tokens for b in rows],
        scale=scale,
        ops=ops,
        needs=[plans[b].needs for b in rows],
        memo=memo,
    )
    for j, b in enumerate(rows):
        readouts[b] = row_readouts[j]
    # Rows that only read out keep the output they have (plain, or left for the engine's own).
    editing = [j for j, row_ops in enumerate(ops) if row_ops]
    if not editing:
        return
    edited = edited.to(output.dtype)
    if slots == 1:
        output[[rows[j] for j in editing], :, num_queries - 1] = edited[editing, :, 0]
        return
    for j in editing:
        output[rows[j], :, num_queries - counts[j] :] = edited[j, :, : counts[j]]


def _attend_row(
    row: RowAttention, ops: tuple[ScopedOp, ...], plan: RowPlan, memo: StepMemo | None
) -> tuple[torch.Tensor, RowReadout | None]:
    refuse_removing_every_key(row, ops)

    def build() -> PreparedOps:
        return prepare(row, applied_ops(row, ops), plan.needs)

    if memo is None:
        return attend(row, build(), plan.needs)
    geometry = (row.layout, row.num_heads, row.num_queries, row.num_keys, row.dtype, row.device)
    return attend(row, memo.prepared_for((geometry, ops, plan.needs), build), plan.needs)


@dataclass(frozen=True)
class PreparedOps:
    """What attend needs of a row's operations besides its queries, keys and values: decided by
    the row's geometry and the operations alone, so rows of equal geometry and operations share
    it (folded rows: the layers of an engine step, folded_rows.py)."""

    applied: list[AppliedOp]
    logit_edits: LogitEdits
    #: Heads whose probabilities are materialised (sorted), and the others.
    materialised: torch.Tensor
    fused_heads: torch.Tensor
    #: (H,) each head's index in the materialised probabilities, -1 for fused heads.
    slot: torch.Tensor
    #: What each PROBABILITIES-stage op needs of its scope (interventions.prepare_probabilities).
    probability_edits: list[object]


def prepare(
    row: RowAttention,
    applied: Sequence[AppliedOp],
    needs: ReadoutNeeds,
    read_heads: torch.Tensor | None = None,
) -> PreparedOps:
    """Probability edits (ACT: column means for sink detection) need their heads' probabilities:
    materialised for those heads only. Statistics read them too for heads whose bias depends on
    their logits, and for every head when the row is small (a decode step), where that is
    cheapest. read_heads (H,) are materialised too (folded rows' readouts)."""
    logit_edits = prepare_logit_edits(row, applied)
    materialise = probability_heads(row, applied)
    if read_heads is not None:
        materialise = materialise | read_heads
    if needs.statistics:
        small = row.num_heads * row.num_queries * row.num_keys <= MATERIALISED_STATISTICS_ELEMENTS
        materialise = materialise | logit_edits.logit_heads | small
    materialised = materialise.nonzero().squeeze(1)
    slot = torch.full((row.num_heads,), -1, dtype=torch.long, device=row.device)
    slot[materialised] = torch.arange(len(materialised), device=row.device)
    return PreparedOps(
        applied=list(applied),
        logit_edits=logit_edits,
        materialised=materialised,
        fused_heads=(~materialise).nonzero().squeeze(1),
        slot=slot,
        probability_edits=prepare_probabilities(row, applied, slot),
    )


@dataclass
class Attended:
    """A row's attention output with its operations applied, and what its readouts read."""

    out: torch.Tensor | None  # (H, L, D); None when no operation applies and none asks for it
    #: (H, L) the share of the softmax map left after the identity blends.
    kept: torch.Tensor
    edited: EditedLogits
    #: (h, L, n) the materialised heads' final probabilities, before the blends.
    probs: torch.Tensor | None
    #: The fused call's outputs (with the statistics' extra value columns) and lse.
    fused: torch.Tensor | None
    lse: torch.Tensor | None
    #: With statistics: the row's geometry as they read it, and their mass columns.
    geometry: StatisticsGeometry | None
    columns: MassColumns | None


def attend(
    row: RowAttention, prepared: PreparedOps, needs: ReadoutNeeds
) -> tuple[torch.Tensor, RowReadout | None]:
    """The row's attention output (H, L, D) with the operations applied, and what needs reads."""
    attended = attend_heads(row, prepared, needs)
    if needs.is_empty:
        return attended.out, None
    return attended.out, _readout(row, prepared, needs, attended)


def attend_heads(row: RowAttention, prepared: PreparedOps, needs: ReadoutNeeds) -> Attended:
    """The row's attention with the operations applied: the output, and the maps that needs and
    the materialised heads' readers read."""
    applied, materialised, fused_heads = prepared.applied, prepared.materialised, prepared.fused_heads
    edited = edit_logits(row, prepared.logit_edits)
    probs = torch.softmax(edited.logits(row, materialised), dim=-1) if len(materialised) else None
    if probs is not None:
        edit_probabilities(row, applied, prepared.probability_edits, probs)

    # One fused call for the other heads gives their output and, for their statistics, the lse,
    # sum_j p_ij k_j and the masses on the indicator columns (docs/attention-math.md#identity-h,
    # #identity-v).
    fused_statistics = needs.statistics and len(fused_heads) > 0
    geometry, columns = None, None
    if needs.statistics:
        geometry = StatisticsGeometry.of_row(row)
        columns = mass_columns(geometry, needs, [term.keys for term in edited.emphasis])
    fused, lse, out = None, None, None
    if len(fused_heads) and (applied or fused_statistics):
        keys, values = row.keys_of(fused_heads), row.values_of(fused_heads)
        if fused_statistics:
            indicators = columns.indicators.expand(keys.shape[0], -1, -1)  # (1, n, C): one row
            key_sums = [keys, keys * indicators[..., columns.image, None]] if columns.has_image else [keys]
            values = torch.cat([values, *key_sums, indicators], dim=-1)
        every_head = len(fused_heads) == row.num_heads
        q = edited.q if every_head else edited.q[fused_heads]
        bias = edited.bias if every_head or edited.bias.shape[0] == 1 else edited.bias[fused_heads]
        fused, lse = kernels.fused_attention(q, keys, values, bias, row.scale, fused_statistics)
    if applied:
        out = _head_outputs(row, prepared, fused, probs)
    out, kept = edit_output(row, applied, out)
    return Attended(
        out=out,
        kept=kept,
        edited=edited,
        probs=probs,
        fused=fused,
        lse=lse,
        geometry=geometry,
        columns=columns,
    )


def _readout(row: RowAttention, prepared: PreparedOps, needs: ReadoutNeeds, attended: Attended) -> RowReadout:
    materialised, fused_heads, kept = prepared.materialised, prepared.fused_heads, attended.kept
    readout = RowReadout(num_prompt_tokens=row.num_prompt_tokens)
    if needs.statistics:
        columns, fused = attended.columns, attended.fused
        parts = []
        if len(fused_heads):  # the fused call computed their statistics' columns
            head_dim = row.v.shape[-1]
            key_means_end = fused.shape[-1] - columns.indicators.shape[-1]
            key_means = fused[..., head_dim:key_means_end]
            masses = fused[..., key_means_end:]
            parts.append(
                fused_pieces(
                    row,
                    attended.edited,
                    fused_heads,
                    attended.lse,
                    key_means,
                    masses,
                    columns,
                    kept[fused_heads],
                )
            )
        geometry = attended.geometry
        if attended.probs is not None:
            parts.append(
                materialised_pieces(geometry, attended.probs[None], columns, kept[materialised][None])
            )
        order = torch.cat([fused_heads, materialised])
        (readout.statistics,) = layer_statistics(
            geometry, HeadPieces.concat(parts), columns, kept[order][None]
        )
    if needs.last_query_rows:
        rows = last_query_rows(row, attended.edited, attended.probs, prepared.slot, kept).float()
        readout.last_query_rows = rows
    return readout


def _head_outputs(
    row: RowAttention, prepared: PreparedOps, fused: torch.Tensor | None, probs: torch.Tensor | None
) -> torch.Tensor:
    """(H, L, Dv): the fused heads' outputs from the fused call, the materialised heads' from
    their (edited) probabilities."""
    head_dim = row.v.shape[-1]
    if probs is None:
        return fused[..., :head_dim]
    from_probs = kernels.weighted_values(probs, row.values_of(prepared.materialised))
    if fused is None:
        return from_probs
    out = torch.empty(row.num_heads, row.num_queries, head_dim, dtype=from_probs.dtype, device=row.device)
    out[prepared.fused_heads] = fused[..., :head_dim]
    out[prepared.materialised] = from_probs
    return out
