"""Readouts on final (post-intervention) attention probabilities: of one row, or of several
requests at once (folded rows: one reduction for all, StatisticsGeometry's G requests).

Heads whose probabilities were materialised (ACT, logit-dependent biases) are read directly.
The others use the identities of docs/attention-math.md: the lse of the fused call, entropy by
identity H (values := K), masses by identity V (values := indicator columns), the own-key
probability by identity P (one dot product and the lse), the last query row from its own logits,
column sums by identity C in query chunks.
The identity blends are applied afterwards in closed form (identity U): the final map of query i
is kept_i * P_i + (1 - kept_i) * onehot(own key) (self-attention; cross-attention has no own key
and no blends). Definitions, and which statistics apply to which layout:
docs/attention-math.md#statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from attnserve.attention import kernels
from attnserve.attention.operations.base import EditedLogits
from attnserve.attention.plan import ReadoutNeeds
from attnserve.attention.readout import LayerStatistics
from attnserve.attention.row_attention import RowAttention

#: A key after token 0 is a hidden sink when its column mean exceeds this (sink statistics
#: apply where RowLayout.has_sink_statistics).
HIDDEN_SINK_THRESHOLD = 0.1
#: Mass columns before the ReadoutNeeds.mass_ranges ones: token 0, tokens 0..3.
SINK_COLUMNS = 2


@dataclass(frozen=True)
class StatisticsGeometry:
    """Where the queries and keys of G requests sit, as their statistics read them: G = 1 for a
    row alone, one per reading request for folded rows (query slots past a request's queries and
    keys outside it are padding, counted by nothing)."""

    #: (G, n) each key's token position in its request; keys_in_request (G, n) the real ones.
    key_positions: torch.Tensor
    keys_in_request: torch.Tensor
    #: (G, 1) where each request's prompt ends among its keys.
    prompt_ends: torch.Tensor
    #: (G, L) the query slots holding a query; query_counts how many each request has.
    real_queries: torch.Tensor
    query_counts: tuple[int, ...]
    #: (G, L, n) which keys each query sees, and its own key (none for cross-attention).
    visible: torch.Tensor
    own_key: torch.Tensor
    #: (G, n) how many of the request's queries see each key.
    queries_per_key: torch.Tensor
    has_own_key: bool
    has_sink_statistics: bool
    dtype: torch.dtype

    @classmethod
    def of_row(cls, row: RowAttention) -> StatisticsGeometry:
        return cls(
            key_positions=row.key_positions[None],
            keys_in_request=torch.ones(1, row.num_keys, dtype=torch.bool, device=row.device),
            prompt_ends=torch.full((1, 1), min(row.num_prompt_tokens, row.num_keys), device=row.device),
            real_queries=torch.ones(1, row.num_queries, dtype=torch.bool, device=row.device),
            query_counts=(row.num_queries,),
            visible=row.visible[None],
            own_key=row.own_key[None],
            queries_per_key=row.queries_per_key[None],
            has_own_key=row.has_own_key,
            has_sink_statistics=row.layout.has_sink_statistics,
            dtype=row.dtype,
        )

    @property
    def visible_keys(self) -> torch.Tensor:
        """(G, L) number of keys each query sees."""
        return self.visible.sum(dim=-1)


@dataclass(frozen=True)
class MassColumns:
    """The (G, n, C) indicator columns whose masses the requests' statistics read, in groups:
    token 0, tokens 0..3; each mass range (prompt positions); the image keys (when the request has
    images); the key set of each KeyEmphasis term; each term's key set within the image keys
    (these two for the entropies' bias corrections)."""

    indicators: torch.Tensor
    num_ranges: int
    has_image: bool
    num_emphasis: int

    @property
    def image(self) -> int:
        """The image keys' column."""
        return SINK_COLUMNS + self.num_ranges

    @property
    def emphasis(self) -> int:
        """The first emphasis term's column."""
        return self.image + self.has_image

    @property
    def image_emphasis(self) -> int:
        """The first emphasis term's column within the image keys."""
        return self.emphasis + self.num_emphasis


def mass_columns(
    geometry: StatisticsGeometry, needs: ReadoutNeeds, emphasis: Sequence[torch.Tensor] = ()
) -> MassColumns:
    """emphasis: the key set (n,) of each KeyEmphasis term of a row alone (the fused heads'
    entropies need their masses; materialised heads need none)."""
    positions, inside = geometry.key_positions, geometry.keys_in_request

    def prompt_range(start: int, end: int) -> torch.Tensor:
        return inside & (positions >= start) & (positions < geometry.prompt_ends.clamp(max=end))

    columns = [inside & (positions == 0), inside & (positions < 4)]
    columns += [prompt_range(start, end) for start, end in needs.mass_ranges]
    emphasis = [keys.expand_as(positions) for keys in emphasis]
    if needs.image_keys:
        image = torch.stack([prompt_range(start, end) for start, end in needs.image_keys]).any(dim=0)
        columns += [image, *emphasis, *(keys & image for keys in emphasis)]
    else:
        columns += emphasis
    return MassColumns(
        torch.stack(columns, dim=-1).to(geometry.dtype),
        len(needs.mass_ranges),
        bool(needs.image_keys),
        len(emphasis),
    )


@dataclass
class HeadPieces:
    """Per-head quantities of a group of heads of G requests, before the identity blends.

    entropy, own_prob (G, h, L); masses (G, h, L, C) over MassColumns; column_sum (G, h, n) is
    sum_i kept_i * p_ij (a padding query slot adds only to its request's token 0, whose column no
    statistic reads); image_plogp (G, h, L) is sum over image keys j of p_ij log p_ij (0 without
    image keys).
    """

    entropy: torch.Tensor
    own_prob: torch.Tensor
    masses: torch.Tensor
    column_sum: torch.Tensor
    image_plogp: torch.Tensor

    @classmethod
    def concat(cls, parts: list[HeadPieces]) -> HeadPieces:
        """The parts' heads side by side."""
        return cls(*(torch.cat([getattr(part, f.name) for part in parts], dim=1) for f in fields(cls)))


def materialised_pieces(
    geometry: StatisticsGeometry, probs: torch.Tensor, columns: MassColumns, kept: torch.Tensor
) -> HeadPieces:
    """From explicit probabilities (G, h, L, n); kept (G, h, L)."""
    batch, heads, queries, _ = probs.shape
    plogp = torch.special.xlogy(probs, probs)
    image_plogp = torch.zeros_like(plogp[..., 0])
    if columns.has_image:
        image = columns.indicators[..., columns.image, None]
        image_plogp = (plogp.flatten(1, 2) @ image).view(batch, heads, queries)
    return HeadPieces(
        entropy=-plogp.sum(dim=-1),
        own_prob=(probs * geometry.own_key[:, None]).sum(dim=-1),
        masses=(probs.flatten(1, 2) @ columns.indicators).view(batch, heads, queries, -1),
        column_sum=(probs * kept[..., None]).sum(dim=2),
        image_plogp=image_plogp,
    )


def fused_pieces(
    row: RowAttention,
    edited: EditedLogits,
    heads: torch.Tensor,
    lse: torch.Tensor,
    key_means: torch.Tensor,
    masses: torch.Tensor,
    columns: MassColumns,
    kept: torch.Tensor,
) -> HeadPieces:
    """For heads of a row alone without materialised probabilities (G = 1). lse (h, L); key_means
    (h, L, D or 2D): sum_j p_ij k_j, then with image keys the same sum over them; masses (h, L, C)
    from the fused call; kept (h, L)."""
    q = edited.q[heads]
    bias = edited.bias if edited.bias.shape[0] == 1 else edited.bias[heads]
    head_dim = q.shape[-1]

    def expected_logit(key_mean: torch.Tensor, first_emphasis: int) -> torch.Tensor:
        """sum_j p_ij (s_ij + b_ij) over the keys key_mean sums over: the bias part is log(alpha)
        times the emphasised mass (masked keys carry no probability)."""
        total = row.scale * (q * key_mean).sum(dim=-1)
        for index, term in enumerate(edited.emphasis):
            acting = term.head_query.expand(row.num_heads, -1)[heads]
            total = total + torch.where(acting, term.log_alpha * masses[..., first_emphasis + index], 0.0)
        return total

    # docs/attention-math.md#identity-h: H_i = lse_i - sum_j p_ij (s_ij + b_ij); on the image
    # keys I, sum_{j in I} p_ij log p_ij = sum_{j in I} p_ij (s_ij + b_ij) - m_i(I) lse_i.
    entropy = lse - expected_logit(key_means[..., :head_dim], columns.emphasis)
    image_plogp = torch.zeros_like(lse)
    if columns.has_image:
        image_plogp = (
            expected_logit(key_means[..., head_dim:], columns.image_emphasis)
            - masses[..., columns.image] * lse
        )

    # docs/attention-math.md#identity-p on the own key (probability 0 where there is none).
    keys = row.keys_of(heads)
    own_prob = torch.zeros_like(lse)
    if row.has_own_key:
        own_key_vectors = row.own_keys(heads)
        own_bias = torch.diagonal(bias, offset=row.num_keys - row.num_queries, dim1=-2, dim2=-1)
        own_prob = torch.exp(row.scale * (q * own_key_vectors).sum(dim=-1) + own_bias - lse)

    # docs/attention-math.md#identity-c: column sums need every p_ij once; O(chunk * n) memory.
    column_sum = torch.zeros(len(heads), row.num_keys, dtype=row.dtype, device=row.device)
    for rows, chunk in kernels.logit_chunks(q, keys, bias, row.scale):
        column_sum += (torch.exp(chunk - lse[:, rows, None]) * kept[:, rows, None]).sum(dim=1)
    return HeadPieces(
        entropy=entropy[None],
        own_prob=own_prob[None],
        masses=masses[None],
        column_sum=column_sum[None],
        image_plogp=image_plogp[None],
    )


def layer_statistics(
    geometry: StatisticsGeometry, pieces: HeadPieces, columns: MassColumns, kept: torch.Tensor
) -> list[LayerStatistics]:
    """Each request's statistics: blends applied, reduced to sums over its query rows of head
    means. kept (G, H, L) in pieces' head order. All of them come off the device at once."""
    if geometry.has_own_key:
        entropy, masses, column_sum, image_plogp = _blended(geometry, pieces, columns, kept)
    else:  # no own key, so no blends (refused): the map is the softmax's
        entropy, masses, column_sum, image_plogp = (
            pieces.entropy,
            pieces.masses,
            pieces.column_sum,
            pieces.image_plogp,
        )
    real = geometry.real_queries.to(entropy.dtype)  # (G, L)

    def query_sum(per_head: torch.Tensor) -> torch.Tensor:
        """(G, H, L) -> (G,): the head mean summed over the real query rows."""
        return (per_head.mean(dim=1) * real).sum(dim=1)

    # Each (G,): every request's sums, brought off the device together.
    sums = {
        "entropy": query_sum(entropy),
        "normalized_entropy": query_sum(_normalized(entropy, geometry.visible_keys[:, None, :])),
    }
    for column in range(SINK_COLUMNS + columns.num_ranges):
        sums[f"mass{column}"] = query_sum(masses[..., column])
    if geometry.has_sink_statistics:
        per_key = geometry.queries_per_key[:, None, :]
        column_mean = column_sum / per_key.clamp(min=1)
        hidden = (
            (column_mean > HIDDEN_SINK_THRESHOLD) & (geometry.key_positions[:, None, :] >= 1) & (per_key > 0)
        )
        sums["hidden_sinks"] = hidden.sum(dim=(1, 2)).to(entropy.dtype) / hidden.shape[1]
    if columns.has_image:
        sums.update(_image_statistics(geometry, masses[..., columns.image], image_plogp, columns))
    rows = torch.stack(list(sums.values()), dim=1).tolist()
    return [
        _layer_statistics(dict(zip(sums, row)), count, geometry, columns)
        for row, count in zip(rows, geometry.query_counts)
    ]


def _layer_statistics(
    sums: dict[str, float], count: int, geometry: StatisticsGeometry, columns: MassColumns
) -> LayerStatistics:
    sink = geometry.has_sink_statistics
    image = {}
    if columns.has_image:
        image = {
            "image_query_count": int(sums["image_query_count"]),
            "image_mass": sums["image_mass"],
            "image_entropy": sums["image_entropy"],
        }
    return LayerStatistics(
        query_count=count,
        entropy=sums["entropy"],
        normalized_entropy=sums["normalized_entropy"],
        sink_mass=sums["mass0"] if sink else None,
        sink_mass_first4=sums["mass1"] if sink else None,
        hidden_sinks=sums["hidden_sinks"] * count if sink else None,
        range_mass=[
            sums[f"mass{column}"] for column in range(SINK_COLUMNS, SINK_COLUMNS + columns.num_ranges)
        ],
        **image,
    )


def _normalized(entropy: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """entropy / ln(visible keys), 0 where a query sees one key or none."""
    visible = visible.to(entropy.dtype)
    return torch.where(visible > 1, entropy / visible.log().clamp(min=1e-30), 0.0)


def _image_statistics(
    geometry: StatisticsGeometry, image_mass: torch.Tensor, image_plogp: torch.Tensor, columns: MassColumns
) -> dict[str, torch.Tensor]:
    """Image share and renormalised image entropy (docs/attention-math.md#statistics) summed
    over the query rows that see an image key, with their count, each (G,). image_mass,
    image_plogp (G, H, L)."""
    image_keys = columns.indicators[..., columns.image].bool()  # (G, n)
    visible_image = (geometry.visible & image_keys[:, None, :]).sum(dim=-1)  # (G, L)
    seeing = (visible_image > 0) & geometry.real_queries
    # H over the image keys renormalised: log m - (1/m) sum_{j in I} p_j log p_j.
    safe_mass = image_mass.clamp(min=torch.finfo(image_mass.dtype).tiny)
    entropy = torch.where(image_mass > 0, safe_mass.log() - image_plogp / safe_mass, 0.0)
    normalized = _normalized(entropy, visible_image[:, None, :])

    def seeing_sum(per_head: torch.Tensor) -> torch.Tensor:
        return torch.where(seeing, per_head.mean(dim=1), 0.0).sum(dim=1)

    return {
        "image_query_count": seeing.sum(dim=1).to(image_mass.dtype),
        "image_mass": seeing_sum(image_mass),
        "image_entropy": seeing_sum(normalized),
    }


def _blended(
    geometry: StatisticsGeometry, pieces: HeadPieces, columns: MassColumns, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy (G, H, L), masses (G, H, L, C), column sums (G, H, n) and image p log p (G, H, L)
    of the blended map kept * P + (1 - kept) * onehot(own key) (docs/attention-math.md#identity-u)."""
    blended = kept < 1
    own_share = 1 - kept
    own_prob = kept * pieces.own_prob + own_share
    # Entropy of kept * p + (1 - kept) * onehot(own), from H(p) and p_own.
    xlogy = torch.special.xlogy
    entropy_blended = (
        -xlogy(kept, kept) * (1 - pieces.own_prob)
        + kept * (pieces.entropy + xlogy(pieces.own_prob, pieces.own_prob))
        - xlogy(own_prob, own_prob)
    )
    entropy = torch.where(blended, entropy_blended, pieces.entropy)
    own_key = geometry.own_key.to(kept.dtype)  # (G, L, n)
    own_columns = (own_key @ columns.indicators)[:, None]  # (G, 1, L, C): the own key's indicator row
    masses = torch.where(
        blended[..., None],
        kept[..., None] * pieces.masses + own_share[..., None] * own_columns,
        pieces.masses,
    )
    column_sum = pieces.column_sum + own_share @ own_key
    image_plogp = pieces.image_plogp
    if columns.has_image:
        # The image keys other than the own key are scaled by kept: sum kappa p log(kappa p).
        own_is_image = own_columns[..., columns.image]  # (G, 1, L)
        others_plogp = pieces.image_plogp - own_is_image * xlogy(pieces.own_prob, pieces.own_prob)
        others_mass = pieces.masses[..., columns.image] - own_is_image * pieces.own_prob
        image_blended = (
            kept * others_plogp + xlogy(kept, kept) * others_mass + own_is_image * xlogy(own_prob, own_prob)
        )
        image_plogp = torch.where(blended, image_blended, pieces.image_plogp)
    return entropy, masses, column_sum, image_plogp


def last_query_rows(
    row: RowAttention,
    edited: EditedLogits,
    probs: torch.Tensor | None,
    slot: torch.Tensor,
    kept: torch.Tensor,
) -> torch.Tensor:
    """(H, n) final probabilities of the last query row over its keys."""
    bias = edited.bias[:, -1:]
    rows = torch.softmax(kernels.logits(edited.q[:, -1:], row.k, bias, row.scale), dim=-1)[:, 0]
    if probs is not None:
        materialised = slot >= 0
        rows[materialised] = probs[slot[materialised], -1]
    return blend_own_key(rows, kept[:, -1:], row.own_key[-1])


def blend_own_key(probabilities: torch.Tensor, kept: torch.Tensor, own_key: torch.Tensor) -> torch.Tensor:
    """The final map kept * P + (1 - kept) * onehot(own key) of query rows' probabilities;
    kept broadcasts over the keys, own_key (n,) over the heads."""
    return kept * probabilities + (1 - kept) * own_key.to(probabilities.dtype)
