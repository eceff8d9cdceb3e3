"""The operations of a RowPlan on one row, stage by stage (attention/operations/).

Order on a row, whatever the order of the plan's list (operations of one kind keep their list
order; between kinds, the order of operations.OPERATIONS):
  1. LOGIT_SCALE: Temperature, folded into the query or into per-key factors;
  2. LOGIT_REWRITE: LogitRescale, on the tempered logit; 1 and 2 become one additive bias;
  3. BIAS: the KeyEmphasis and KeyMask biases;
  4. softmax; PROBABILITIES: SinkCalibration (ACT) on the materialised probabilities, whose
     heads then take their output from them (core.attend);
  5. OUTPUT: IdentityBlend, then HeadOutputScale, on the output.
Output operations act on heads and query rows only; their KeySet is not used.
The order and the identities behind it: docs/attention-math.md#order-of-operations-on-a-row.

Each function takes the row's operations with their scopes (AppliedOp), in application order:
applied_ops builds them for one request's row, attention/folded_rows.py for the folded rows of
several requests, whose scopes span many requests' heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnserve.attention import kernels
from attnserve.attention.operations import OPERATIONS, Stage
from attnserve.attention.operations.base import EditedLogits, KeyBias, LogitScales, Operation, Scope
from attnserve.attention.plan import ScopedOp
from attnserve.attention.row_attention import RowAttention
from attnserve.attention.selection import head_selection, key_selection, query_selection

_KIND_ORDER = {kind: i for i, kind in enumerate(OPERATIONS.values())}


@dataclass(frozen=True)
class AppliedOp:
    """An operation and where it acts on the row at hand."""

    op: Operation
    scope: Scope


def application_rank(op: Operation) -> int:
    """Where the op's kind comes in a row's application order (the registry's order)."""
    return _KIND_ORDER[type(op)]


def application_order(ops: Sequence[ScopedOp]) -> list[ScopedOp]:
    """The ops in application order: kinds in registry order (so stages in order), each kind's
    ops in list order."""
    return sorted(ops, key=lambda s: application_rank(s.op))


def applied_ops(row: RowAttention, ops: Sequence[ScopedOp]) -> list[AppliedOp]:
    """One request's row: its ops with their scopes, in application order."""
    return [AppliedOp(scoped.op, Scope.of(scoped, row)) for scoped in application_order(ops)]


def at_stage(applied: Sequence[AppliedOp], stage: Stage) -> list[AppliedOp]:
    """The ops of one stage, in application order."""
    return [a for a in applied if a.op.stage is stage]


@dataclass(frozen=True)
class LogitEdits:
    """The LOGIT_SCALE, LOGIT_REWRITE and BIAS stages of a row's operations, as far as the row's
    geometry decides them (no query or key values): rows of equal geometry and operations share
    them (folded rows: the layers of an engine step, folded_rows.py)."""

    #: None when no LOGIT_SCALE operation acts (every factor 1).
    scales: LogitScales | None
    rewrites: list[AppliedOp]
    #: (H,) heads whose bias comes from their own logits (key-dependent temperature, rewrites).
    logit_heads: torch.Tensor
    #: Their indices; None when there are none.
    logit_head_indices: torch.Tensor | None
    #: The visibility (-inf where a key is not seen) and the BIAS stage.
    key_bias: KeyBias


def prepare_logit_edits(row: RowAttention, applied: Sequence[AppliedOp]) -> LogitEdits:
    """The pre-softmax stages of the ops on a row of this geometry (edit_logits applies them)."""
    scale_ops = at_stage(applied, Stage.LOGIT_SCALE)
    scales = LogitScales(torch.ones(row.num_heads, row.num_queries, dtype=row.dtype, device=row.device))
    for a in scale_ops:
        a.op.scale_logits(scales, a.scope, row)

    rewrites = at_stage(applied, Stage.LOGIT_REWRITE)
    logit_heads = torch.zeros(row.num_heads, dtype=torch.bool, device=row.device)
    if scales.key_factor is not None:
        logit_heads |= (scales.key_factor != 1.0).flatten(1).any(dim=1)
    for a in rewrites:
        logit_heads |= a.scope.heads

    bias = torch.zeros(1, row.num_queries, row.num_keys, dtype=row.dtype, device=row.device)
    key_bias = KeyBias(bias=bias.masked_fill(~row.visible, float("-inf")), emphasis=[])
    for a in at_stage(applied, Stage.BIAS):
        a.op.edit_bias(key_bias, a.scope, row)
    return LogitEdits(
        scales=scales if scale_ops else None,
        rewrites=rewrites,
        logit_heads=logit_heads,
        logit_head_indices=logit_heads.nonzero().squeeze(1) if bool(logit_heads.any()) else None,
        key_bias=key_bias,
    )


def edit_logits(row: RowAttention, edits: LogitEdits) -> EditedLogits:
    """The pre-softmax stages on the row's queries and keys: one query gain and one bias. The
    rewrites' changes are added to the BIAS stage's bias; a -inf there stays -inf."""
    scales = edits.scales
    q = row.q if scales is None else row.q * scales.query_gain[:, :, None]
    bias = edits.key_bias.bias
    heads = edits.logit_head_indices
    if heads is not None:
        # Key-dependent factors and rewrites need these heads' logits: materialised here only.
        plain = kernels.logits(q[heads], row.keys_of(heads), None, row.scale)
        edited = plain if scales is None or scales.key_factor is None else plain * scales.key_factor[heads]
        for a in edits.rewrites:
            edited = a.op.rewrite_logits(edited, a.scope.logits.expand(row.num_heads, -1, -1)[heads])
        bias = bias.expand(row.num_heads, -1, -1).clone()
        bias[heads] += edited - plain
    return EditedLogits(q=q, bias=bias, logit_heads=edits.logit_heads, emphasis=edits.key_bias.emphasis)


def refuse_removing_every_key(row: RowAttention, ops: Sequence[ScopedOp]) -> None:
    """On a row without own keys (cross-attention), key-removing ops could leave a query no key
    at all: refused. Queries of a cross-attention row see every key, so a query is left with none
    exactly when the removals of the ops whose scope holds it cover every key of some head.
    Decided on CPU copies."""
    removing = [scoped for scoped in ops if scoped.op.removes_keys]
    if row.has_own_key or not removing:
        return
    cpu = torch.device("cpu")
    removed = torch.zeros(row.num_heads, row.num_queries, row.num_keys, dtype=torch.bool)
    for scoped in removing:
        heads = head_selection(scoped.heads, row.num_heads, cpu)
        queries = query_selection(scoped.query_rows, scoped.last_query_only, row.num_queries, cpu)
        keys = key_selection(scoped.keys, row.num_keys, row.num_prompt_tokens, cpu)
        removed |= heads[:, None, None] & queries[None, :, None] & keys[None, None, :]
    if bool(removed.all(dim=2).any()):
        names = sorted({scoped.op.name for scoped in removing})
        raise ValueError(f"{', '.join(names)} would leave a cross-attention query no key to attend to")


def probability_heads(row: RowAttention, applied: Sequence[AppliedOp]) -> torch.Tensor:
    """(H,) heads some PROBABILITIES-stage op acts on (their probabilities are materialised)."""
    heads = torch.zeros(row.num_heads, dtype=torch.bool, device=row.device)
    for a in at_stage(applied, Stage.PROBABILITIES):
        heads |= a.scope.heads
    return heads


def prepare_probabilities(
    row: RowAttention, applied: Sequence[AppliedOp], slot: torch.Tensor
) -> list[object]:
    """What the PROBABILITIES-stage ops need of their scopes and the row's geometry, in order."""
    return [a.op.prepare_probabilities(a.scope, slot, row) for a in at_stage(applied, Stage.PROBABILITIES)]


def edit_probabilities(
    row: RowAttention, applied: Sequence[AppliedOp], prepared: Sequence[object], probs: torch.Tensor
) -> None:
    """The PROBABILITIES stage, in place on probs (h, L, n) of the materialised heads, each op
    with what prepare_probabilities gave it."""
    for a, op_prepared in zip(at_stage(applied, Stage.PROBABILITIES), prepared):
        a.op.edit_probabilities(probs, op_prepared, row)


def edit_output(
    row: RowAttention, applied: Sequence[AppliedOp], out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The OUTPUT stage on out (H, L, D).

    Returns the output and kept (H, L): the share of the softmax map left after the blends, so
    the final map of query i is kept * P_i + (1 - kept) * onehot(own key).
    """
    kept = torch.ones(row.num_heads, row.num_queries, dtype=row.dtype, device=row.device)
    for a in at_stage(applied, Stage.OUTPUT):
        out, kept = a.op.edit_output(out, kept, a.scope, row)
    return out, kept
