"""Several requests' rows folded into one row, so that attention.core runs once for all.

Request b's head h becomes head b*H + h of one RowAttention whose keys are every request's,
padded to the longest as the batch holds them (left-padded in attend_rows' batches,
right-padded as read from vLLM's paged cache; padding unseen), and whose L query slots hold each
request's queries, the last L_b tokens of its sequence, from slot 0 on (causal: query i sees its
request's keys up to its own). In a decode step L_b is 1 and the query sees every key; a
prefill's L_b is its prompt. A request's query slots past L_b are padding: each sees only its
request's token 0, which no operation edits there and no sink can be, and its output is
dropped. Each stage of the core then runs once for the batch: an operation's scope spans the
heads of every request holding that operation at the same place in its plan, each with its own
keys (docs/attention-math.md#folded-rows). With more than one query, only operations acting on
every query row fold (folds_queries). A request with readouts has all its heads materialised;
its readouts are read from its own heads, queries and keys, reduced together with those of the
requests asking alike (statistics.py). The math is the core's own (interventions.py, the
operations, statistics.py); only the scaffolding around it is shared, which is most of a row's
cost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from attnserve.attention.interventions import AppliedOp, application_order, application_rank
from attnserve.attention.operations.base import Scope
from attnserve.attention.plan import ALL_QUERY_ROWS, NO_NEEDS, ReadoutNeeds, ScopedOp
from attnserve.attention.readout import RowReadout
from attnserve.attention.row_attention import RowAttention
from attnserve.attention.selection import head_selection, key_selection, query_selection
from attnserve.attention.statistics import (
    StatisticsGeometry,
    blend_own_key,
    layer_statistics,
    mass_columns,
    materialised_pieces,
)
from attnserve.attention.step_memo import StepMemo

if TYPE_CHECKING:
    from attnserve.attention.core import PreparedOps


@dataclass(frozen=True)
class FoldedGeometry:
    """Where each request's keys and queries sit among the folded rows' n keys and L query slots:
    all that the rows' masks and scopes depend on. Equal geometries (the layers of an engine
    step) share one instance through a StepMemo (step_memo.py), so its tensors are built once."""

    #: Index of each request's token 0.
    key_starts: tuple[int, ...]
    #: One past each request's own key.
    key_ends: tuple[int, ...]
    #: Prompt length of each request (positions from it on are generated tokens).
    prompt_lengths: tuple[int, ...]
    #: Each request's number of queries, its last tokens, in query slots 0..count-1.
    query_counts: tuple[int, ...]
    heads_per_request: int
    num_keys: int
    device: torch.device

    @property
    def num_queries(self) -> int:
        return max(self.query_counts)

    def per_head(self, per_request: tuple[int, ...]) -> torch.Tensor:
        """(B*H, 1) the request's number for each head."""
        values = torch.tensor(per_request, device=self.device)
        return values.repeat_interleave(self.heads_per_request)[:, None]

    @cached_property
    def key_positions(self) -> torch.Tensor:
        return torch.arange(self.num_keys, device=self.device)

    @cached_property
    def positions(self) -> torch.Tensor:
        """(B*H, n): each key's token position in its head's request (negative on padding)."""
        return self.key_positions[None, :] - self.per_head(self.key_starts)

    @cached_property
    def real_queries(self) -> torch.Tensor:
        """(B*H, L): the query slots that hold one of the request's queries."""
        slots = torch.arange(self.num_queries, device=self.device)
        return slots[None, :] < self.per_head(self.query_counts)

    @cached_property
    def query_positions(self) -> torch.Tensor:
        """(B*H, L): each query slot's token position in its request (0 on padding slots)."""
        slots = torch.arange(self.num_queries, device=self.device)
        lengths = self.per_head(self.key_ends) - self.per_head(self.key_starts)
        first = lengths - self.per_head(self.query_counts)
        return torch.where(self.real_queries, first + slots[None, :], 0)

    @cached_property
    def visible(self) -> torch.Tensor:
        """(B*H, L, n): each query sees its request's keys up to its own; a padding slot its
        request's token 0."""
        positions = self.positions[:, None, :]
        ends = self.per_head(self.key_ends)[:, :, None]
        in_request = (positions >= 0) & (self.key_positions[None, None, :] < ends)
        causal = in_request & (positions <= self.query_positions[:, :, None])
        return torch.where(self.real_queries[:, :, None], causal, positions == 0)

    @cached_property
    def queries_per_key(self) -> torch.Tensor:
        """(B*H, n): how many of the head's queries see each key (padding slots not counted)."""
        return (self.visible & self.real_queries[:, :, None]).sum(dim=1)

    @cached_property
    def own_key(self) -> torch.Tensor:
        """(B*H, L, n): each query's own key (token 0 for padding slots)."""
        return self.positions[:, None, :] == self.query_positions[:, :, None]

    def statistics_geometry(
        self, requests: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, StatisticsGeometry]:
        """The folded heads of these requests, request by request, and their queries and keys as
        their statistics read them (made once per set of requests)."""
        key = (requests, dtype)
        if key not in self._statistics_geometries:
            h = self.heads_per_request
            heads = torch.tensor([b * h + i for b in requests for i in range(h)], device=self.device)
            first = heads[::h]  # every head of a request sees the same keys
            positions = self.positions[first]
            lengths = torch.tensor(
                [self.key_ends[b] - self.key_starts[b] for b in requests], device=self.device
            )
            prompts = torch.tensor([self.prompt_lengths[b] for b in requests], device=self.device)
            self._statistics_geometries[key] = (
                heads,
                StatisticsGeometry(
                    key_positions=positions,
                    keys_in_request=(positions >= 0) & (positions < lengths[:, None]),
                    prompt_ends=torch.minimum(prompts, lengths)[:, None],
                    real_queries=self.real_queries[first],
                    query_counts=tuple(self.query_counts[b] for b in requests),
                    visible=self.visible[first],
                    own_key=self.own_key[first],
                    queries_per_key=self.queries_per_key[first],
                    has_own_key=True,
                    has_sink_statistics=True,
                    dtype=dtype,
                ),
            )
        return self._statistics_geometries[key]

    @cached_property
    def _statistics_geometries(self) -> dict:
        return {}

    @cached_property
    def own_key_index(self) -> torch.Tensor:
        """(B, L) index among the n keys of each query slot's own key."""
        starts = torch.tensor(self.key_starts, device=self.device)[:, None]
        return starts + self.query_positions[:: self.heads_per_request]


@dataclass
class FoldedRows(RowAttention):
    """q (B*H, L, D); k, v (B*Hkv, n, D) padded as geometry says, which also says what each
    query sees (layout is unused)."""

    geometry: FoldedGeometry

    @property
    def key_starts(self) -> tuple[int, ...]:
        return self.geometry.key_starts

    @property
    def key_ends(self) -> tuple[int, ...]:
        return self.geometry.key_ends

    @property
    def prompt_lengths(self) -> tuple[int, ...]:
        return self.geometry.prompt_lengths

    @property
    def heads_per_request(self) -> int:
        return self.geometry.heads_per_request

    @property
    def num_requests(self) -> int:
        return len(self.prompt_lengths)

    @property
    def num_prompt_tokens(self) -> int:
        raise ValueError("folded rows have one prompt length per request (prompt_lengths)")

    @property
    def has_own_key(self) -> bool:
        return True

    @property
    def key_positions(self) -> torch.Tensor:
        return self.geometry.key_positions

    @property
    def visible(self) -> torch.Tensor:
        return self.geometry.visible

    @property
    def own_key(self) -> torch.Tensor:
        return self.geometry.own_key

    def queries_per_key_of(self, heads: torch.Tensor) -> torch.Tensor:
        """(len(heads), n): 1 on the keys the head's query sees, 0 elsewhere."""
        every_head = len(heads) == self.num_heads  # heads are sorted and unique
        return self.geometry.queries_per_key if every_head else self.geometry.queries_per_key[heads]

    def key_positions_of(self, heads: torch.Tensor) -> torch.Tensor:
        every_head = len(heads) == self.num_heads
        return self.geometry.positions if every_head else self.geometry.positions[heads]

    def own_values(self) -> torch.Tensor:
        """(B*H, L, D) value of each query's own key."""
        kv_heads_per_request = self.k.shape[0] // self.num_requests
        own_index = self.geometry.own_key_index.repeat_interleave(kv_heads_per_request, dim=0)
        own = self.v.gather(1, own_index[:, :, None].expand(-1, -1, self.v.shape[-1]))
        return own.repeat_interleave(self.num_heads // self.k.shape[0], dim=0)


def fold_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_starts: Sequence[int],
    key_ends: Sequence[int],
    query_counts: Sequence[int],
    prompt_lengths: Sequence[int],
    scale: float,
    memo: StepMemo | None = None,
) -> FoldedRows:
    """q (B, H, L, D): request b's queries (its last query_counts[b] tokens) in slots
    0..query_counts[b]-1; k, v (B, Hkv, n, D) padded, request b's keys at
    key_starts[b]..key_ends[b]-1. Computed in float32 (or float64), as RowAttention."""
    batch, num_heads, num_queries, head_dim = q.shape
    if num_queries != max(query_counts):
        raise ValueError(f"{num_queries} query slots for at most {max(query_counts)} queries")
    dtype = torch.promote_types(q.dtype, torch.float32)
    geometry = FoldedGeometry(
        key_starts=tuple(key_starts),
        key_ends=tuple(key_ends),
        prompt_lengths=tuple(prompt_lengths),
        query_counts=tuple(query_counts),
        heads_per_request=num_heads,
        num_keys=k.shape[2],
        device=q.device,
    )
    if memo is not None:
        geometry = memo.geometries.setdefault(geometry, geometry)
    return FoldedRows(
        q=q.reshape(batch * num_heads, num_queries, head_dim).to(dtype),
        k=k.flatten(0, 1).to(dtype),
        v=v.flatten(0, 1).to(dtype),
        scale=scale,
        layout=None,
        geometry=geometry,
    )


def fold_decode_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_starts: Sequence[int],
    prompt_lengths: Sequence[int],
    scale: float,
    key_ends: Sequence[int] | None = None,
    memo: StepMemo | None = None,
) -> FoldedRows:
    """fold_rows for decode rows: q (B, H, D) each request's one query; key_ends default: n
    (left-padded)."""
    return fold_rows(
        q[:, :, None],
        k,
        v,
        key_starts=key_starts,
        key_ends=key_ends if key_ends is not None else (k.shape[2],) * q.shape[0],
        query_counts=(1,) * q.shape[0],
        prompt_lengths=prompt_lengths,
        scale=scale,
        memo=memo,
    )


#: Folding computes every request at the largest one's size: rows are folded together only while
#: that at most doubles their work (a long prompt or context beside short ones would cost the
#: short ones far more than their own rows one at a time).
MAX_PADDING_FACTOR = 2.0
#: The most logits (heads x query slots x keys) one folded pass holds: its masks and bias are per
#: head, where a row one at a time shares them across its heads (64 MB of float32 logits).
MAX_FOLDED_LOGITS = 1 << 24


def fold_groups(sizes: Sequence[int], num_heads: int) -> list[list[int]]:
    """Which rows to fold together, given each row's size (queries x keys): indices, by
    decreasing size, each group as large as it can be while padding it to its first (largest)
    row at most doubles its work and its logits stay within MAX_FOLDED_LOGITS (a row larger than
    that alone is for the caller to keep out: folds_size)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    groups: list[list[int]] = []
    work = 0
    for i in order:
        padded = (len(groups[-1]) + 1) * sizes[groups[-1][0]] if groups else 0
        if (
            groups
            and padded <= MAX_PADDING_FACTOR * (work + sizes[i])
            and padded * num_heads <= MAX_FOLDED_LOGITS
        ):
            groups[-1].append(i)
            work += sizes[i]
        else:
            groups.append([i])
            work = sizes[i]
    return groups


def folds_size(num_queries: int, num_keys: int, num_heads: int) -> bool:
    """Whether a row of this size folds: its logits alone fit in one folded pass."""
    return num_queries * num_keys * num_heads <= MAX_FOLDED_LOGITS


def folds_queries(ops: Sequence[ScopedOp]) -> bool:
    """Whether these operations fold on rows of several queries: each acts on every query row
    (the folded scopes hold one query selection for every request)."""
    return all(scoped.query_rows == ALL_QUERY_ROWS and not scoped.last_query_only for scoped in ops)


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
    if rows.num_queries > 1 and not folds_queries([scoped for _, scoped in members]):
        raise ValueError("operations on some query rows only do not fold on rows of several queries")
    for request, scoped in members:
        if not query_selection(scoped.query_rows, scoped.last_query_only, 1, cpu)[0]:
            continue  # the op does not act on this request's one query row
        start, end = rows.key_starts[request], rows.key_ends[request]
        span = slice(request * num_heads, (request + 1) * num_heads)
        heads[span] = head_selection(scoped.heads, num_heads, cpu)
        keys[span, start:end] = key_selection(scoped.keys, end - start, rows.prompt_lengths[request], cpu)
    return Scope(
        heads=heads.to(rows.device),
        queries=torch.ones(rows.num_queries, dtype=torch.bool, device=rows.device),
        keys=keys.to(rows.device),
        key_set=None,
    )


def prepare_folded(
    rows: FoldedRows,
    ops_per_request: Sequence[Sequence[ScopedOp]],
    memo: StepMemo | None = None,
    readers: tuple[int, ...] = (),
) -> PreparedOps:
    """core.prepare for the folded rows, every head of the readers' (requests with readouts)
    materialised; with a memo, equal calls share it."""
    from attnserve.attention.core import prepare  # core dispatches here: imported when used

    def build() -> PreparedOps:
        read_heads = None
        if readers:
            read_heads = torch.zeros(rows.num_requests, rows.heads_per_request, dtype=torch.bool)
            read_heads[list(readers)] = True
            read_heads = read_heads.flatten().to(rows.device)
        return prepare(rows, folded_applied_ops(rows, ops_per_request), NO_NEEDS, read_heads)

    if memo is None:
        return build()
    key = (rows.geometry, rows.dtype, tuple(map(tuple, ops_per_request)), readers)
    return memo.prepared_for(key, build)


def attend_folded(
    rows: FoldedRows,
    ops_per_request: Sequence[Sequence[ScopedOp]],
    memo: StepMemo | None = None,
    needs_per_request: Sequence[ReadoutNeeds] | None = None,
) -> tuple[torch.Tensor, list[RowReadout | None]]:
    """(B, H, L, D): each request's attention output with its operations applied (padding slots
    hold no meaningful numbers; all zero when no request edits anything), and each request's
    readout as needs_per_request[b] asks (None when it asks for none)."""
    from attnserve.attention.core import attend_heads

    needs_per_request = needs_per_request or [NO_NEEDS] * rows.num_requests
    readers = tuple(b for b, needs in enumerate(needs_per_request) if not needs.is_empty)
    prepared = prepare_folded(rows, ops_per_request, memo, readers)
    attended = attend_heads(rows, prepared, NO_NEEDS)
    out = attended.out
    if out is None:
        out = torch.zeros_like(rows.q)
    readouts = _folded_readouts(rows, attended.probs, prepared.slot, attended.kept, needs_per_request)
    return out.reshape(rows.num_requests, rows.heads_per_request, rows.num_queries, -1), readouts


def _folded_readouts(
    rows: FoldedRows,
    probs: torch.Tensor | None,
    slot: torch.Tensor,
    kept: torch.Tensor,
    needs_per_request: Sequence[ReadoutNeeds],
) -> list[RowReadout | None]:
    """Each request's readout from its materialised heads' final probabilities, read as a row
    alone that small reads them (statistics.py on materialised heads); requests that ask alike
    are reduced together."""
    readouts: list[RowReadout | None] = [None] * rows.num_requests
    alike: dict[ReadoutNeeds, list[int]] = {}
    for request, needs in enumerate(needs_per_request):
        if not needs.is_empty:
            alike.setdefault(needs, []).append(request)
    num_heads = rows.heads_per_request
    for needs, requests in alike.items():
        heads, geometry = rows.geometry.statistics_geometry(tuple(requests), rows.dtype)
        request_probs = probs[slot[heads]].view(len(requests), num_heads, rows.num_queries, rows.num_keys)
        request_kept = kept[heads].view(len(requests), num_heads, rows.num_queries)
        statistics = [None] * len(requests)
        if needs.statistics:
            columns = mass_columns(geometry, needs)
            pieces = materialised_pieces(geometry, request_probs, columns, request_kept)
            statistics = layer_statistics(geometry, pieces, columns, request_kept)
        last_rows = None
        if needs.last_query_rows:
            # Each request's last query, in slot count - 1.
            batch = torch.arange(len(requests), device=rows.device)
            last = torch.tensor(
                [geometry.query_counts[g] - 1 for g in range(len(requests))], device=rows.device
            )
            last_rows = blend_own_key(
                request_probs[batch, :, last],
                request_kept[batch, :, last, None],
                geometry.own_key[batch, last][:, None],
            ).float()
        for g, request in enumerate(requests):
            readout = RowReadout(num_prompt_tokens=rows.prompt_lengths[request], statistics=statistics[g])
            if last_rows is not None:
                readout.last_query_rows = last_rows[g, :, rows.key_starts[request] : rows.key_ends[request]]
            readouts[request] = readout
    return readouts
