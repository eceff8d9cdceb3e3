"""Decode rows of several requests through FlexAttention: the logit-level operations as one
score_mod that reads per-(request, head, key) parameter tensors inside the fused kernel, the
output operations afterwards (the same inputs and result as core.attend_decode_rows).

The parameters come from the core's own code, not from a copy of the operations' math. The
LOGIT_SCALE and LOGIT_REWRITE operations covered here (Temperature, LogitRescale) edit a logit s
by a positively homogeneous function g (g(t s) = t g(s) for t > 0), and the BIAS ones (KeyEmphasis,
KeyMask) add a term A that does not depend on s. So edited(s) = g(s) + A is known from three
values: A = edited(0), g(1) = edited(1) - A, g(-1) = edited(-1) - A; then
edited(s) = s * g(1) for s >= 0 and s * (-g(-1)) for s < 0. interventions.edit_logits gives
edited(s) when it runs on a probe row whose logits are s (head size 1, k = 1, q = s).
SinkCalibration needs the probabilities first and is not covered (core.attend_decode_rows then).

flex_decode runs torch.compile'd (eager flex_attention is a slow reference path; tried on CPU
only, CUDA untested) with dynamic shapes: one compile for every batch size and key count (about
1.5 minutes cold on a loaded 2-core machine, then under 0.1 s for a new key count).
Measured against the folded recompute in bench/bench_flex.py (slower on CPU: not wired in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from attnserve.attention.folded_rows import FoldedRows, fold_decode_rows, folded_applied_ops
from attnserve.attention.interventions import AppliedOp, edit_logits, edit_output, prepare_logit_edits
from attnserve.attention.operations import (
    HeadOutputScale,
    IdentityBlend,
    KeyEmphasis,
    KeyMask,
    LogitRescale,
    Temperature,
)
from attnserve.attention.plan import ScopedOp

#: flex_attention's block size (keys per block of the block mask).
_BLOCK = 128

#: The operations this path applies: logit edits g(s) + A as above, and the output stage.
FLEX_OPERATIONS = (Temperature, LogitRescale, KeyEmphasis, KeyMask, IdentityBlend, HeadOutputScale)


def covers(ops_per_request: Sequence[Sequence[ScopedOp]]) -> bool:
    """Whether every request's operations are ones this path applies."""
    return all(isinstance(scoped.op, FLEX_OPERATIONS) for ops in ops_per_request for scoped in ops)


@dataclass(frozen=True)
class ScoreModParameters:
    """(B, H, n) each: request b's head h edits the logit s of key j to
    s * (positive_gain if s >= 0 else negative_gain) + bias; bias is -inf on removed keys and
    padding (their gains 0)."""

    positive_gain: torch.Tensor
    negative_gain: torch.Tensor
    bias: torch.Tensor


def score_mod_parameters(rows: FoldedRows, applied: Sequence[AppliedOp]) -> ScoreModParameters:
    """The logit stages of the applied operations (folded scopes of rows) as ScoreModParameters."""
    num_heads, num_keys = rows.num_heads, rows.num_keys
    # One probe row whose head has three queries with the logits 0, 1 and -1 on every key: the
    # folded scopes (one query) broadcast over them. float64: the differences below lose
    # nothing that float32 logits would see.
    probe_logits = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64, device=rows.device)
    probe = replace(
        rows,
        q=probe_logits[None, :, None].expand(num_heads, -1, -1),
        k=torch.ones(rows.k.shape[0], num_keys, 1, dtype=torch.float64, device=rows.device),
        v=None,
        scale=1.0,
    )
    edited = edit_logits(probe, prepare_logit_edits(probe, applied)).logits(
        probe, torch.arange(num_heads, device=rows.device)
    )
    additive, at_one, at_minus_one = edited.unbind(dim=1)  # (B*H, n) each
    removed = additive == float("-inf")
    positive = torch.where(removed, 0.0, at_one - additive)
    negative = torch.where(removed, 0.0, additive - at_minus_one)
    shape = (rows.num_requests, rows.heads_per_request, num_keys)
    return ScoreModParameters(*(t.to(rows.dtype).reshape(shape) for t in (positive, negative, additive)))


def _flex_call(q, k, v, positive_gain, negative_gain, bias, block_mask, scale):
    def score_mod(score, b, h, q_idx, kv_idx):
        gain = torch.where(score >= 0, positive_gain[b, h, kv_idx], negative_gain[b, h, kv_idx])
        return score * gain + bias[b, h, kv_idx]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True)


# Dynamic shapes: a decode step has one key more than the last and the batch changes; with
# static shapes each new key count would compile again.
_compiled_flex_call = torch.compile(_flex_call, dynamic=True)


def padding_block_mask(key_starts: torch.Tensor, num_keys: int) -> BlockMask:
    """Block mask of a decode batch: request b reads the key blocks from the one holding
    key_starts[b] on; padding inside a block is masked by the bias. Built from tensors (no
    mask_mod), so a new mask per call does not recompile the kernel."""
    num_blocks = -(-num_keys // _BLOCK)
    first = (key_starts // _BLOCK).to(torch.int32)
    blocks = torch.arange(num_blocks, dtype=torch.int32, device=key_starts.device)
    indices = (first[:, None] + blocks[None, :]).clamp(max=num_blocks - 1)
    return BlockMask.from_kv_blocks(
        (num_blocks - first)[:, None, None],
        indices[:, None, None, :],
        BLOCK_SIZE=_BLOCK,
        seq_lengths=(1, num_keys),
        compute_q_blocks=False,
    )


def flex_decode(
    rows: FoldedRows, edits: ScoreModParameters, block_mask=None, *, compiled: bool = True
) -> torch.Tensor:
    """(B*H, 1, D): the folded rows' attention with the logit edits inside the flex kernel."""
    batch, num_heads = rows.num_requests, rows.heads_per_request
    q = rows.q.reshape(batch, num_heads, 1, -1)
    k = rows.k.reshape(batch, -1, rows.num_keys, rows.k.shape[-1])
    v = rows.v.reshape(batch, -1, rows.num_keys, rows.v.shape[-1])
    call = _compiled_flex_call if compiled else _flex_call
    out = call(q, k, v, edits.positive_gain, edits.negative_gain, edits.bias, block_mask, rows.scale)
    return out.reshape(batch * num_heads, 1, -1)


def attend_decode_rows_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_starts: Sequence[int],
    prompt_lengths: Sequence[int],
    scale: float,
    ops: Sequence[tuple[ScopedOp, ...]],
    compiled: bool = True,
) -> torch.Tensor:
    """core.attend_decode_rows through FlexAttention, for ops that covers() accepts."""
    if not covers(ops):
        raise ValueError(
            "FlexAttention decode rows apply only " + ", ".join(op.name for op in FLEX_OPERATIONS)
        )
    rows = fold_decode_rows(q, k, v, key_starts, prompt_lengths, scale)
    applied = folded_applied_ops(rows, ops)
    block_mask = padding_block_mask(torch.tensor(rows.key_starts, device=rows.device), rows.num_keys)
    out = flex_decode(rows, score_mod_parameters(rows, applied), block_mask, compiled=compiled)
    out, _ = edit_output(rows, applied, out)
    return out.reshape(rows.num_requests, rows.heads_per_request, -1)
