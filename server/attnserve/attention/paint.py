"""PAINT's visual token selection (docs/attention-math.md#paint), pure torch.

PAINT ("Fixing imbalanced attention") rescales the language model's logits on two sets of image
tokens, chosen from the vision encoder's attention of its CLS token over the patches:
- local tokens: the top quarter of the patches by CLS->patch attention in the encoder's first
  layer, minus the summary tokens;
- summary tokens: the patches whose CLS->patch attention in the encoder's penultimate layer is
  an outlier, above Q3 + 1.5 IQR of that layer's CLS->patch attention.
The rescale itself is LogitRescale (s + alpha |s|) on the chosen keys, the last query row only.
Here: the CLS rows, the selection, and the resolution of a plan's VisualKeys into key ranges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from .plan import KeySet, RequestPlan, ScopedOp

#: Share of the patches that are local candidates (the first layer's top quarter).
TOP_FRACTION = 0.25
#: Tukey's fence: outliers lie above Q3 + IQR_FENCE * (Q3 - Q1).
IQR_FENCE = 1.5


def cls_patch_attention(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """query, key (images, heads, 1 + patches, head_dim), token 0 the CLS token: the head-mean
    softmax row of the CLS query over every key, at the patch keys: (images, patches) float32."""
    logits = torch.einsum("bhd,bhkd->bhk", query[:, :, 0].float(), key.float()) * scale
    return logits.softmax(dim=-1)[:, :, 1:].mean(dim=1)


def paint_tokens(first_layer: torch.Tensor, penultimate_layer: torch.Tensor) -> tuple[list[int], list[int]]:
    """One image's (local, summary) patch indices, ascending, from its CLS->patch attention
    (patches,) in the encoder's first and penultimate layers."""
    num_patches = first_layer.shape[0]
    top = torch.topk(first_layer.float(), max(1, int(TOP_FRACTION * num_patches))).indices
    quartiles = torch.tensor([0.25, 0.75], device=penultimate_layer.device)
    q1, q3 = torch.quantile(penultimate_layer.float(), quartiles)
    summary = (penultimate_layer > q3 + IQR_FENCE * (q3 - q1)).nonzero().squeeze(1)
    local = sorted(set(top.tolist()) - set(summary.tolist()))
    return local, sorted(summary.tolist())


def paint_layers(num_layers: int) -> tuple[int, int]:
    """The vision encoder layers PAINT reads: the first and the penultimate."""
    return 0, max(num_layers - 2, 0)


def runs(positions: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Ascending positions as half-open ranges of consecutive positions."""
    out: list[list[int]] = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return tuple((a, b) for a, b in out)


def resolve_visual_keys(
    plan: RequestPlan,
    image_spans: Sequence[tuple[int, int]],
    tokens: Mapping[str, Sequence[Sequence[int]]],
) -> RequestPlan:
    """The plan with every KeySet's VisualKeys turned into prompt ranges. tokens maps a part
    ("paint_local", "paint_summary") to each image's chosen patch indices; image k's patch p is
    prompt position image_spans[k][0] + p. A KeySet left with no key selects none."""

    def resolved(keys: KeySet) -> KeySet:
        if keys.visual is None:
            return keys
        positions = [
            image_spans[image][0] + patch
            for image in keys.visual.images
            for patch in tokens[keys.visual.part][image]
        ]
        ranges = keys.ranges + runs(sorted(positions))
        return dataclasses.replace(keys, ranges=ranges or ((0, 0),), visual=None)

    def scoped(op: ScopedOp) -> ScopedOp:
        return dataclasses.replace(op, keys=resolved(op.keys))

    layer_ops = {
        layer: tuple((steps, scoped(op)) for steps, op in ops) for layer, ops in plan.layer_ops.items()
    }
    return dataclasses.replace(plan, layer_ops=layer_ops)


def resolve_paint_keys(
    plan: RequestPlan,
    image_spans: Sequence[tuple[int, int]],
    first_layer: torch.Tensor,
    penultimate_layer: torch.Tensor,
) -> RequestPlan:
    """The plan with PAINT's tokens chosen for the request's images: first_layer and
    penultimate_layer (images, patches) are each image's CLS->patch attention in those encoder
    layers, image k's tokens at image_spans[k]."""
    chosen = [paint_tokens(first, penultimate) for first, penultimate in zip(first_layer, penultimate_layer)]
    tokens = {"paint_local": [c[0] for c in chosen], "paint_summary": [c[1] for c in chosen]}
    return resolve_visual_keys(plan, image_spans, tokens)


def needs_visual_keys(plan: RequestPlan) -> bool:
    return any(op.keys.visual is not None for ops in plan.layer_ops.values() for _, op in ops)


def visual_share(rows: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """rows (..., keys): attention rows over a prompt whose image tokens sit at image_positions
    (indices into keys): each row's mass on the image tokens, (...) float32."""
    return rows.float()[..., image_positions].sum(dim=-1)


def paint_head_gains(sensitivity: torch.Tensor, *, step: float, max_gain: float) -> torch.Tensor:
    """PAINT's head-specific modulation (docs/attention-math.md#paint-head-gains): each head's
    gain is its visual sensitivity (sensitivity (layers, heads), the mean visual share of its
    last query row on calibration images) over the mean of every head's, rounded to a multiple
    of step and clipped to [0, max_gain]. A gain of 0 leaves the head unmodulated."""
    mean = sensitivity.float().mean()
    if mean <= 0:
        raise ValueError("no head attends to the image tokens; the gains are undefined")
    gains = torch.round(sensitivity.float() / mean / step) * step
    return gains.clamp(0.0, max_gain)
