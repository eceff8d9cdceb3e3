"""Several requests' decode rows folded into one row, so that attention.core runs once for all.

In a decode step each request has one query, the newest token, which sees all of its keys
(positions 0..n_b-1; causal and block-causal layouts alike). Request b's head h becomes head
b*H + h of one RowAttention whose keys are every request's, left-padded to the longest as the
batch holds them (padding unseen). Each stage of the core then runs once for the batch: an operation's scope spans the
heads of every request holding that operation at the same place in its plan, each with its own
keys (docs/attention-math.md#folded-rows). The math is the core's own (interventions.py and the
operations); only the scaffolding around it is shared, which is most of a row's cost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from attnserve.attention.interventions import AppliedOp, application_order, application_rank
from attnserve.attention.operations.base import Scope
from attnserve.attention.plan import NO_NEEDS, ScopedOp
from attnserve.attention.row_attention import RowAttention
from attnserve.attention.selection import head_selection, key_selection, query_selection


@dataclass
class FoldedRows(RowAttention):
    """q (B*H, 1, D); k, v (B*Hkv, n, D) left-padded: request b's keys at key_starts[b]..n-1, so
    every request's own key (its query's token) is the last. layout is unused: every request's
    query sees all of its keys."""

    #: (B,) index of each request's token 0.
    key_starts: torch.Tensor
    #: Prompt length of each request (positions from it on are generated tokens).
    prompt_lengths: tuple[int, ...]
    heads_per_request: int

    @property
    def num_requests(self) -> int:
        return len(self.prompt_lengths)

    @property
    def num_prompt_tokens(self) -> int:
        raise ValueError("folded rows have one prompt length per request (prompt_lengths)")

    @property
    def has_own_key(self) -> bool:
        return True

    @cached_property
    def _positions(self) -> torch.Tensor:
        """(B*H, n): each key's token position in its head's request (negative on padding)."""
        starts = self.key_starts.repeat_interleave(self.heads_per_request)
        return self.key_positions[None, :] - starts[:, None]

    @cached_property
    def visible(self) -> torch.Tensor:
        """(B*H, 1, n): each head sees its request's keys."""
        return (self._positions >= 0)[:, None, :]

    @cached_property
    def own_key(self) -> torch.Tensor:
        """(1, 1, n): the last key, every request's own."""
        return (self.key_positions == self.num_keys - 1)[None, None, :]

    def queries_per_key_of(self, heads: torch.Tensor) -> torch.Tensor:
        """(len(heads), n): 1 on the keys the head's query sees, 0 elsewhere."""
        return self.visible[heads, 0].long()

    def key_positions_of(self, heads: torch.Tensor) -> torch.Tensor:
        return self._positions[heads]

    def own_values(self) -> torch.Tensor:
        """(B*H, 1, D) value of each request's last key."""
        return self.v[:, -1].repeat_interleave(self.num_heads // self.k.shape[0], dim=0)[:, None]


def fold_decode_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_starts: Sequence[int],
    prompt_lengths: Sequence[int],
    scale: float,
) -> FoldedRows:
    """q (B, H, D): each request's one query; k, v (B, Hkv, n, D) left-padded, request b's keys at
    key_starts[b]..n-1. Computed in float32 (or float64), as RowAttention."""
    batch, num_heads, head_dim = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    return FoldedRows(
        q=q.reshape(batch * num_heads, 1, head_dim).to(dtype),
        k=k.flatten(0, 1).to(dtype),
        v=v.flatten(0, 1).to(dtype),
        scale=scale,
        layout=None,
        key_starts=torch.tensor(list(key_starts), device=q.device),
        prompt_lengths=tuple(prompt_lengths),
        heads_per_request=num_heads,
    )


def folded_applied_ops(rows: FoldedRows, ops_per_request: Sequence[Sequence[ScopedOp]]) -> list[AppliedOp]:
    """The requests' operations with folded scopes, in application order. The i-th operation of
    a kind in each request's plan is grouped with the equal ones of other requests (same
    parameters, heads and query rows): requests hold one operation per (kind, i), so groups of
    the same (kind, i) touch disjoint heads and their order does not matter."""
    groups: dict[tuple, list[tuple[int, ScopedOp]]] = {}
    for request, ops in enumerate(ops_per_request):
        seen: Counter[type] = Counter()
        for scoped in application_order(ops):
            slot = seen[type(scoped.op)]
            seen[type(scoped.op)] += 1
            key = (
                application_rank(scoped.op),
                slot,
                scoped.op,
                scoped.heads,
                scoped.last_query_only,
                scoped.query_rows,
            )
            groups.setdefault(key, []).append((request, scoped))
    return [
        AppliedOp(members[0][1].op, _folded_scope(rows, members))
        for key, members in sorted(groups.items(), key=lambda item: item[0][:2])
    ]


def _folded_scope(rows: FoldedRows, members: Sequence[tuple[int, ScopedOp]]) -> Scope:
    num_heads, cpu = rows.heads_per_request, torch.device("cpu")
    heads = torch.zeros(rows.num_heads, dtype=torch.bool)
    keys = torch.zeros(rows.num_heads, rows.num_keys, dtype=torch.bool)
    for request, scoped in members:
        if not query_selection(scoped.query_rows, scoped.last_query_only, 1, cpu)[0]:
            continue  # the op does not act on this request's one query row
        start = int(rows.key_starts[request])
        span = slice(request * num_heads, (request + 1) * num_heads)
        heads[span] = head_selection(scoped.heads, num_heads, cpu)
        keys[span, start:] = key_selection(
            scoped.keys, rows.num_keys - start, rows.prompt_lengths[request], cpu
        )
    return Scope(
        heads=heads.to(rows.device),
        queries=torch.ones(1, dtype=torch.bool, device=rows.device),
        keys=keys.to(rows.device),
        key_set=None,
    )


def attend_folded(rows: FoldedRows, ops_per_request: Sequence[Sequence[ScopedOp]]) -> torch.Tensor:
    """(B, H, D): each request's attention output with its operations applied (no readouts)."""
    from attnserve.attention.core import attend  # core dispatches here: imported when used

    out, _ = attend(rows, folded_applied_ops(rows, ops_per_request), NO_NEEDS)
    return out.reshape(rows.num_requests, rows.heads_per_request, -1)
