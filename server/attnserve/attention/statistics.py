"""Readouts of one row on its final (post-intervention) attention probabilities.

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
class MassColumns:
    """The (n, C) indicator columns whose masses a row's statistics read, in groups: token 0,
    tokens 0..3; each mass range (prompt positions); the image keys (when the request has
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
    row: RowAttention, needs: ReadoutNeeds, emphasis: Sequence[torch.Tensor] = ()
) -> MassColumns:
    """emphasis: the key set (n,) of each KeyEmphasis term (the fused heads' entropies need their
    masses; materialised heads need none)."""
    positions = row.key_positions
    prompt_end = min(row.num_prompt_tokens, row.num_keys)

    def prompt_range(start: int, end: int) -> torch.Tensor:
        return (positions >= start) & (positions < min(end, prompt_end))

    columns = [positions == 0, positions < 4]
    columns += [prompt_range(start, end) for start, end in needs.mass_ranges]
    if needs.image_keys:
        image = torch.stack([prompt_range(start, end) for start, end in needs.image_keys]).any(dim=0)
        columns += [image, *emphasis, *(keys & image for keys in emphasis)]
    else:
        columns += emphasis
    return MassColumns(
        torch.stack(columns, dim=1).to(row.dtype),
        len(needs.mass_ranges),
        bool(needs.image_keys),
        len(emphasis),
    )


@dataclass
class HeadPieces:
    """Per-head quantities of a group of heads, before the identity blends.

    entropy, own_prob (h, L); masses (h, L, C) over MassColumns; column_sum (h, n) is
    sum_i kept_i * p_ij; image_plogp (h, L) is sum over image keys j of p_ij log p_ij (0
    without image keys).
    """

    entropy: torch.Tensor
    own_prob: torch.Tensor
    masses: torch.Tensor
    column_sum: torch.Tensor
    image_plogp: torch.Tensor

    @classmethod
    def concat(cls, parts: list[HeadPieces]) -> HeadPieces:
        return cls(*(torch.cat([getattr(part, f.name) for part in parts]) for f in fields(cls)))


def materialised_pieces(
    row: RowAttention, probs: torch.Tensor, columns: MassColumns, kept: torch.Tensor
) -> HeadPieces:
    """From explicit probabilities (h, L, n); kept (h, L)."""
    plogp = torch.special.xlogy(probs, probs)
    image_plogp = (
        plogp @ columns.indicators[:, columns.image] if columns.has_image else torch.zeros_like(plogp[..., 0])
    )
    return HeadPieces(
        entropy=-plogp.sum(dim=-1),
        own_prob=(probs * row.own_key).sum(dim=-1),
        masses=probs @ columns.indicators,
        column_sum=(probs * kept[:, :, None]).sum(dim=1),
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
    """For heads without materialised probabilities. lse (h, L); key_means (h, L, D or 2D): sum_j
    p_ij k_j, then with image keys the same sum over them; masses (h, L, C) from the fused call;
    kept (h, L)."""
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
        entropy=entropy, own_prob=own_prob, masses=masses, column_sum=column_sum, image_plogp=image_plogp
    )


def layer_statistics(
    row: RowAttention, pieces: HeadPieces, columns: MassColumns, kept: torch.Tensor
) -> LayerStatistics:
    """Blends applied, reduced to sums over query rows of head means. kept (H, L) in pieces' head order."""
    if row.has_own_key:
        entropy, masses, column_sum, image_plogp = _blended(row, pieces, columns, kept)
    else:  # no own key, so no blends (refused): the map is the softmax's
        entropy, masses, column_sum, image_plogp = (
            pieces.entropy,
            pieces.masses,
            pieces.column_sum,
            pieces.image_plogp,
        )

    normalized = _normalized(entropy, row.visible_keys)
    head_mean_mass = masses.mean(dim=0).sum(dim=0)  # (C,)
    sink_mass = sink_mass_first4 = hidden_sinks = None
    if row.layout.has_sink_statistics:
        column_mean = column_sum / row.queries_per_key.clamp(min=1)
        hidden = (column_mean > HIDDEN_SINK_THRESHOLD) & (row.key_positions >= 1) & (row.queries_per_key > 0)
        sink_mass, sink_mass_first4 = float(head_mean_mass[0]), float(head_mean_mass[1])
        hidden_sinks = int(hidden.sum()) / hidden.shape[0] * row.num_queries
    image = {}
    if columns.has_image:
        image = _image_statistics(row, masses[..., columns.image], image_plogp, columns)
    return LayerStatistics(
        query_count=row.num_queries,
        entropy=float(entropy.mean(dim=0).sum()),
        normalized_entropy=float(normalized.mean(dim=0).sum()),
        sink_mass=sink_mass,
        sink_mass_first4=sink_mass_first4,
        hidden_sinks=hidden_sinks,
        range_mass=[float(m) for m in head_mean_mass[SINK_COLUMNS : SINK_COLUMNS + columns.num_ranges]],
        **image,
    )


def _normalized(entropy: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """entropy / ln(visible keys), 0 where a query sees one key or none."""
    visible = visible.to(entropy.dtype)
    return torch.where(visible > 1, entropy / visible.log().clamp(min=1e-30), 0.0)


def _image_statistics(
    row: RowAttention, image_mass: torch.Tensor, image_plogp: torch.Tensor, columns: MassColumns
) -> dict:
    """Image share and renormalised image entropy (docs/attention-math.md#statistics) summed
    over the query rows that see an image key, with their count. image_mass, image_plogp (H, L)."""
    image_keys = columns.indicators[:, columns.image].bool()
    visible_image = (row.visible & image_keys).sum(dim=1)  # (L,)
    seeing = visible_image > 0
    # H over the image keys renormalised: log m - (1/m) sum_{j in I} p_j log p_j.
    safe_mass = image_mass.clamp(min=torch.finfo(image_mass.dtype).tiny)
    entropy = torch.where(image_mass > 0, safe_mass.log() - image_plogp / safe_mass, 0.0)
    normalized = _normalized(entropy, visible_image)
    return {
        "image_query_count": int(seeing.sum()),
        "image_mass": float(image_mass.mean(dim=0)[seeing].sum()),
        "image_entropy": float(normalized.mean(dim=0)[seeing].sum()),
    }


def _blended(
    row: RowAttention, pieces: HeadPieces, columns: MassColumns, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy (H, L), masses (H, L, C), column sums (H, n) and image p log p (H, L) of the
    blended map kept * P + (1 - kept) * onehot(own key) (docs/attention-math.md#identity-u)."""
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
    own_columns = columns.indicators[row.query_positions]  # (L, C): the own key's indicator row
    masses = torch.where(
        blended[:, :, None],
        kept[:, :, None] * pieces.masses + own_share[:, :, None] * own_columns,
        pieces.masses,
    )
    column_sum = pieces.column_sum + own_share @ row.own_key.to(row.dtype)
    image_plogp = pieces.image_plogp
    if columns.has_image:
        # The image keys other than the own key are scaled by kept: sum kappa p log(kappa p).
        own_is_image = own_columns[:, columns.image]  # (L,)
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
    return blended_last_query_rows(row, rows, kept)


def blended_last_query_rows(row: RowAttention, rows: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(H, n) the last query's final map from its softmax probabilities rows (H, n) and the
    blends' kept (H, L)."""
    kept_last = kept[:, -1:]
    return kept_last * rows + (1 - kept_last) * row.own_key[-1].to(row.dtype)
