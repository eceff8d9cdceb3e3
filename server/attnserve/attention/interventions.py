"""The operations of a RowPlan on one row: pre-softmax edits, ACT, output edits.

Order on a row, whatever the order of the plan's list (ops of one kind keep their list order):
  1. pre-softmax: Temperature, then LogitRescale (on the tempered logit), then the KeyEmphasis
     and KeyMask biases;
  2. softmax;
  3. SinkCalibration (ACT) on the probabilities, folded into the bias of the one fused
     softmax-and-PV call (made outside this module);
  4. IdentityBlend, then HeadOutputScale, on the output.
Output operations act on heads and query rows only; their KeySet is not used.
The order and the identities behind it: docs/attention-math.md#order-of-operations-on-a-row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnserve.attention import kernels
from attnserve.attention.plan import (
    HeadOutputScale,
    IdentityBlend,
    KeyEmphasis,
    KeyMask,
    LogitRescale,
    ScopedOp,
    SinkCalibration,
    Temperature,
)
from attnserve.attention.row_attention import RowAttention
from attnserve.attention.selection import head_selection, key_selection, query_selection


@dataclass(frozen=True)
class Scope:
    """Where one operation acts on a row. heads has one entry (every head) or num_heads."""

    heads: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor

    @classmethod
    def of(cls, scoped: ScopedOp, row: RowAttention) -> Scope:
        heads = (
            torch.ones(1, dtype=torch.bool, device=row.device)
            if scoped.heads is None
            else head_selection(scoped.heads, row.num_heads, row.device)
        )
        return cls(
            heads=heads,
            queries=query_selection(scoped.last_query_only, row.num_queries, row.device),
            keys=key_selection(scoped.keys, row.num_keys, row.num_prompt_tokens, row.device),
        )

    @property
    def head_query(self) -> torch.Tensor:
        """(1 or H, L) bool."""
        return self.heads[:, None] & self.queries[None, :]

    @property
    def logits(self) -> torch.Tensor:
        """(1 or H, L, n) bool."""
        return self.head_query[:, :, None] & self.keys[None, None, :]

    def head_indices(self, num_heads: int) -> torch.Tensor:
        return self.heads.expand(num_heads).nonzero().squeeze(1)


@dataclass(frozen=True)
class EmphasisTerm:
    """One KeyEmphasis in the bias: log_alpha added where head_query and keys hold."""

    head_query: torch.Tensor
    keys: torch.Tensor
    log_alpha: float


@dataclass
class EditedLogits:
    """The row's pre-softmax edits in fused form: logits = scale * q . k + bias.

    q carries the temperatures that hold for all of a query's keys (folded into the query);
    bias (1 or H, L, n) carries the rest, -inf where a key is not seen.
    """

    q: torch.Tensor
    bias: torch.Tensor
    #: (H,) heads whose bias was computed from their own logits (key-dependent temperature,
    #: LogitRescale): the entropy identity does not apply to them.
    logit_heads: torch.Tensor
    emphasis: list[EmphasisTerm]

    def logits(self, row: RowAttention, heads: torch.Tensor) -> torch.Tensor:
        """Materialised (len(heads), L, n) logits of the given query heads."""
        bias = self.bias if self.bias.shape[0] == 1 else self.bias[heads]
        return kernels.logits(self.q[heads], row.keys_of(heads), bias, row.scale)


def _of_kind(ops: Sequence[ScopedOp], kind: type) -> list[ScopedOp]:
    return [scoped for scoped in ops if isinstance(scoped.op, kind)]


def edit_logits(row: RowAttention, ops: Sequence[ScopedOp]) -> EditedLogits:
    """Temperature, KeyEmphasis, KeyMask and LogitRescale as one query gain and one bias."""
    num_heads = row.num_heads
    query_gain = torch.ones(num_heads, row.num_queries, dtype=row.dtype, device=row.device)
    key_factor = None  # (H, L, n) temperature factors that differ between a query's keys
    for scoped in _of_kind(ops, Temperature):
        scope = Scope.of(scoped, row)
        inverse = 1.0 / scoped.op.temperature
        # Decided on the CPU copy of the mask: no device sync.
        if bool(key_selection(scoped.keys, row.num_keys, row.num_prompt_tokens, torch.device("cpu")).all()):
            query_gain = torch.where(scope.head_query, query_gain * inverse, query_gain)
        else:
            if key_factor is None:
                key_factor = torch.ones_like(row.visible, dtype=row.dtype).expand(num_heads, -1, -1)
            key_factor = torch.where(scope.logits, key_factor * inverse, key_factor)
    q = row.q * query_gain[:, :, None]

    bias = torch.zeros(1, row.num_queries, row.num_keys, dtype=row.dtype, device=row.device)
    bias = bias.masked_fill(~row.visible, float("-inf"))

    rescales = [(Scope.of(scoped, row), scoped.op.alpha) for scoped in _of_kind(ops, LogitRescale)]
    logit_heads = torch.zeros(num_heads, dtype=torch.bool, device=row.device)
    if key_factor is not None:
        logit_heads |= (key_factor != 1.0).flatten(1).any(dim=1)
    for scope, _ in rescales:
        logit_heads |= scope.heads
    if bool(logit_heads.any()):
        # Key-dependent temperature and |s| need these heads' logits: materialised here only.
        heads = logit_heads.nonzero().squeeze(1)
        plain = kernels.logits(q[heads], row.keys_of(heads), None, row.scale)
        edited = plain if key_factor is None else plain * key_factor[heads]
        for scope, alpha in rescales:
            selected = scope.logits.expand(num_heads, -1, -1)[heads]
            edited = torch.where(selected, edited + alpha * edited.abs(), edited)
        bias = bias.expand(num_heads, -1, -1).clone()
        bias[heads] += edited - plain

    emphasis = []
    for scoped in _of_kind(ops, KeyEmphasis):
        scope = Scope.of(scoped, row)
        alpha = scoped.op.alpha
        log_alpha = math.log(alpha) if alpha > 0 else float("-inf")
        bias = torch.where(scope.logits, bias + log_alpha, bias)
        if alpha > 0:
            emphasis.append(EmphasisTerm(scope.head_query, scope.keys, log_alpha))

    masks = _of_kind(ops, KeyMask)
    if masks and not row.has_own_key:
        _refuse_masking_every_key(row, masks)
    for scoped in masks:
        scope = Scope.of(scoped, row)
        bias = bias.masked_fill(scope.logits & ~row.own_key, float("-inf"))

    return EditedLogits(q=q, bias=bias, logit_heads=logit_heads, emphasis=emphasis)


def _refuse_masking_every_key(row: RowAttention, masks: Sequence[ScopedOp]) -> None:
    """Without an own key to keep, KeyMasks could leave a query no key at all: refused. Queries of
    a cross-attention row see every key, and the last query is in every op's scope, so some query
    is left with none exactly when a head's masks cover all keys. Decided on CPU copies."""
    cpu = torch.device("cpu")
    masked = torch.zeros(row.num_heads, row.num_keys, dtype=torch.bool)
    for scoped in masks:
        heads = head_selection(scoped.heads, row.num_heads, cpu)
        keys = key_selection(scoped.keys, row.num_keys, row.num_prompt_tokens, cpu)
        masked |= heads[:, None] & keys[None, :]
    if bool(masked.all(dim=1).any()):
        raise ValueError("KeyMask would leave a cross-attention query no key to attend to")


def calibration_heads(row: RowAttention, ops: Sequence[ScopedOp]) -> torch.Tensor:
    """(H,) heads some SinkCalibration acts on."""
    heads = torch.zeros(row.num_heads, dtype=torch.bool, device=row.device)
    for scoped in _of_kind(ops, SinkCalibration):
        heads |= Scope.of(scoped, row).heads
    return heads


def calibrate_sinks(
    row: RowAttention,
    ops: Sequence[ScopedOp],
    edited: EditedLogits,
    probs: torch.Tensor,
    slot: torch.Tensor,
) -> None:
    """ACT, in place: probs (h, L, n) of the materialised heads (slot[head] is a head's index in
    probs) become the calibrated probabilities, and edited.bias gets the equivalent logit bias.

    Sinks (positions >= 1 in the op's keys, on every layout) have a mean probability > tau over
    the query rows that see them. A row with sink mass m keeps beta * p on sinks and scales the other keys by
    (1 - beta m) / (1 - m): a reweighting, so (docs/attention-math.md#identity-b) exactly the
    logit bias log(beta (1 - m) / (1 - beta m)) on the sinks. The fused call then gives the output; this
    avoids the form beta o_S + (1 - beta m)/(1 - m) (o - o_S), whose subtraction loses float32
    precision by a factor 1 / (1 - m) when the sinks hold almost all the mass.
    """
    for scoped in _of_kind(ops, SinkCalibration):
        op: SinkCalibration = scoped.op
        scope = Scope.of(scoped, row)
        heads = scope.head_indices(row.num_heads)
        p = probs[slot[heads]]
        seen_by = row.queries_per_key
        column_mean = p.sum(dim=1) / seen_by.clamp(min=1)
        eligible = scope.keys & (row.key_positions >= 1) & (seen_by > 0)
        if op.min_queries > 0:
            eligible &= seen_by >= op.min_queries
        sinks = (column_mean > op.tau) & eligible[None, :]  # (h, n)
        if not bool(sinks.any()):
            continue
        mass = (p * sinks[:, None, :]).sum(dim=-1)  # (h, L)
        # 1 - m summed directly: it would lose all precision to cancellation as m -> 1.
        rest = (p * ~sinks[:, None, :]).sum(dim=-1)
        # m == 0: nothing to move; m == 1: no other key to hand the mass back to.
        changed = scope.queries[None, :] & (mass > 0) & (rest > 0)
        hand_back = torch.where(changed, (1 - op.beta * mass) / rest, 1.0)
        sink_factor = torch.where(changed, torch.full_like(mass, op.beta), 1.0)
        probs[slot[heads]] = torch.where(
            sinks[:, None, :], p * sink_factor[:, :, None], p * hand_back[:, :, None]
        )
        sink_bias = torch.log(sink_factor / hand_back)  # 0 on unchanged rows, -inf when beta = 0
        bias = edited.bias.expand(row.num_heads, -1, -1).clone()
        bias[heads] = torch.where(sinks[:, None, :], bias[heads] + sink_bias[:, :, None], bias[heads])
        edited.bias = bias


def edit_output(
    row: RowAttention, ops: Sequence[ScopedOp], out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IdentityBlend then HeadOutputScale on out (H, L, D).

    Returns the output and kept (H, L): the share of the softmax map left after the blends, so
    the final map of query i is kept * P_i + (1 - kept) * onehot(own key).
    """
    kept = torch.ones(row.num_heads, row.num_queries, dtype=row.dtype, device=row.device)
    blends = _of_kind(ops, IdentityBlend)
    if blends:
        own_values = row.own_values()
        for scoped in blends:
            selected = Scope.of(scoped, row).head_query
            weight = scoped.op.weight
            out = torch.where(selected[:, :, None], (1 - weight) * out + weight * own_values, out)
            kept = torch.where(selected, kept * (1 - weight), kept)
    for scoped in _of_kind(ops, HeadOutputScale):
        selected = Scope.of(scoped, row).head_query
        out = torch.where(selected[:, :, None], out * scoped.op.scale, out)
    return out, kept
