"""The operations of a RowPlan on one row, stage by stage (attention/operations/).

Order on a row, whatever the order of the plan's list (operations of one kind keep their list
order; between kinds, the order of operations.OPERATIONS):
  1. LOGIT_SCALE: Temperature, folded into the query or into per-key factors;
  2. LOGIT_REWRITE: LogitRescale, on the tempered logit; 1 and 2 become one additive bias;
  3. BIAS: the KeyEmphasis and KeyMask biases;
  4. softmax; PROBABILITIES: SinkCalibration (ACT) on the materialised probabilities, folded
     into the bias of the one fused softmax-and-PV call (made outside this module);
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
from attnserve.attention.operations.base import EditedLogits, LogitScales, Operation, Scope
from attnserve.attention.plan import ScopedOp
from attnserve.attention.row_attention import RowAttention
from attnserve.attention.selection import head_selection, key_selection, query_selection

_KIND_ORDER = {kind: i for i, kind in enumerate(OPERATIONS.values())}


@dataclass(frozen=True)
class AppliedOp:
    """An operation and where it acts on the row at hand."""

    op: Operation
    scope: Scope


def application_order(ops: Sequence[ScopedOp]) -> list[ScopedOp]:
    """The ops in application order: kinds in registry order (so stages in order), each kind's
    ops in list order."""
    return sorted(ops, key=lambda s: _KIND_ORDER[type(s.op)])


def applied_ops(row: RowAttention, ops: Sequence[ScopedOp]) -> list[AppliedOp]:
    """One request's row: its ops with their scopes, in application order."""
    return [AppliedOp(scoped.op, Scope.of(scoped, row)) for scoped in application_order(ops)]


def at_stage(applied: Sequence[AppliedOp], stage: Stage) -> list[AppliedOp]:
    """The ops of one stage, in application order."""
    return [a for a in applied if a.op.stage is stage]


def edit_logits(row: RowAttention, applied: Sequence[AppliedOp]) -> EditedLogits:
    """The LOGIT_SCALE, LOGIT_REWRITE and BIAS stages as one query gain and one bias."""
    num_heads = row.num_heads
    scales = LogitScales(torch.ones(num_heads, row.num_queries, dtype=row.dtype, device=row.device))
    for a in at_stage(applied, Stage.LOGIT_SCALE):
        a.op.scale_logits(scales, a.scope, row)
    q = row.q * scales.query_gain[:, :, None]

    bias = torch.zeros(1, row.num_queries, row.num_keys, dtype=row.dtype, device=row.device)
    bias = bias.masked_fill(~row.visible, float("-inf"))

    rewrites = at_stage(applied, Stage.LOGIT_REWRITE)
    logit_heads = torch.zeros(num_heads, dtype=torch.bool, device=row.device)
    if scales.key_factor is not None:
        logit_heads |= (scales.key_factor != 1.0).flatten(1).any(dim=1)
    for a in rewrites:
        logit_heads |= a.scope.heads
    if bool(logit_heads.any()):
        # Key-dependent factors and rewrites need these heads' logits: materialised here only.
        heads = logit_heads.nonzero().squeeze(1)
        plain = kernels.logits(q[heads], row.keys_of(heads), None, row.scale)
        edited = plain if scales.key_factor is None else plain * scales.key_factor[heads]
        for a in rewrites:
            edited = a.op.rewrite_logits(edited, a.scope.logits.expand(num_heads, -1, -1)[heads])
        bias = bias.expand(num_heads, -1, -1).clone()
        bias[heads] += edited - plain

    result = EditedLogits(q=q, bias=bias, logit_heads=logit_heads, emphasis=[])
    for a in at_stage(applied, Stage.BIAS):
        a.op.edit_bias(result, a.scope, row)
    return result


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


def edit_probabilities(
    row: RowAttention,
    applied: Sequence[AppliedOp],
    edited: EditedLogits,
    probs: torch.Tensor,
    slot: torch.Tensor,
) -> None:
    """The PROBABILITIES stage, in place: probs (h, L, n) of the materialised heads (slot[head] is
    a head's index in probs) and edited.bias, which gets the equivalent logit bias."""
    for a in at_stage(applied, Stage.PROBABILITIES):
        a.op.edit_probabilities(edited, probs, slot, a.scope, row)


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
