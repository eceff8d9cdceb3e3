"""DAAM's cross-attention heatmaps per prompt word (Tang et al., "What the DAAM", castorini/daam).

For one image: every cross-attention call of the UNet's down and up blocks in the conditional
branch gives per head a map over the image tokens for each text token (on an SD3 transformer,
every joint attention call: the image queries' probabilities at the text keys, shares of the
whole joint row). Each map is upsampled
bicubically to the latent grid and clamped at 0; the maps are averaged over heads and layers
and summed over steps. A word's map is the mean over its tokens' maps, upsampled to the image
size and min-max normalised to [0, 1] (docs/attention-math.md#word-heatmaps-daam). Two sets of
words (content and style, "The Cow of Rembrandt") compare by the IoU of their maps binarised at
thresholds 0.1 .. 0.9 (docs/attention-math.md#content-vs-style-overlap). Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cross_attention_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, Lq, Lk) probabilities of one row's unedited cross-attention, in float32.
    q (H, Lq, D), k (H, Lk, D)."""
    return torch.softmax(scale * q.float() @ k.float().transpose(-1, -2), dim=-1)


def key_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, keys: range) -> torch.Tensor:
    """(H, Lq, len(keys)) probabilities of one row's unedited attention over all of k, at the key
    indices `keys` (a joint row's text keys), in float32: one fused call whose values are those
    keys' indicator columns (docs/attention-math.md#identity-v), so the (Lq, Lk) map over every
    key is never held. q (H, Lq, D), k (H, Lk, D)."""
    indicators = torch.zeros(k.shape[-2], len(keys), dtype=torch.float32, device=k.device)
    indicators[torch.tensor(keys, device=k.device), torch.arange(len(keys), device=k.device)] = 1.0
    values = indicators.expand(k.shape[0], -1, -1)
    return F.scaled_dot_product_attention(q.float(), k.float(), values, scale=scale)


def token_maps(probs: torch.Tensor, grid: tuple[int, int], latent: tuple[int, int]) -> torch.Tensor:
    """(Lk, *latent): one call's maps per text token, each head's map over the (rows, cols) grid
    of image tokens upsampled bicubically to the latent grid and clamped at 0, then averaged over
    heads."""
    heads, num_queries, num_keys = probs.shape
    rows, cols = grid
    if rows * cols != num_queries:
        raise ValueError(f"{num_queries} image tokens do not fill a {rows} x {cols} grid")
    maps = probs.transpose(1, 2).reshape(heads, num_keys, rows, cols)
    upsampled = F.interpolate(maps, size=latent, mode="bicubic", align_corners=False).clamp_min(0)
    return upsampled.mean(dim=0)


def query_grid(num_queries: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) grid of a layer's image tokens: the latent grid downsampled by a power of 2."""
    rows, cols = latent
    factor = 1
    while (rows // factor) * (cols // factor) > num_queries and factor <= max(rows, cols):
        factor *= 2
    if (rows // factor) * (cols // factor) != num_queries:
        raise ValueError(f"{num_queries} image tokens fit no downsampling of the {rows} x {cols} latent grid")
    return rows // factor, cols // factor


def word_heatmap(summed: torch.Tensor, positions: Sequence[int], image: tuple[int, int]) -> torch.Tensor:
    """(height, width) in [0, 1]: the mean of the token maps at positions (summed (Lk, *latent),
    already averaged over layers), upsampled bicubically to the image size, min-max normalised."""
    return _normalised_image(summed[list(positions)].mean(dim=0), image)


def word_set_heatmap(
    summed: torch.Tensor, words: Sequence[Sequence[int]], image: tuple[int, int]
) -> torch.Tensor:
    """(height, width) in [0, 1]: the mean over words (each given by its positions) of each
    word's mean token map, upsampled and min-max normalised as a word's heatmap is."""
    maps = torch.stack([summed[list(positions)].mean(dim=0) for positions in words])
    return _normalised_image(maps.mean(dim=0), image)


def _normalised_image(latent_map: torch.Tensor, image: tuple[int, int]) -> torch.Tensor:
    upsampled = F.interpolate(latent_map[None, None], size=image, mode="bicubic", align_corners=False)[0, 0]
    low, high = upsampled.min(), upsampled.max()
    return (upsampled - low) / (high - low).clamp_min(torch.finfo(upsampled.dtype).tiny)


#: "The Cow of Rembrandt" binarises the content and style maps at these thresholds.
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def heatmap_iou(
    a: torch.Tensor, b: torch.Tensor, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> torch.Tensor:
    """(len(thresholds),): per threshold t, |A ∩ B| / |A ∪ B| of the pixel sets A = {a >= t},
    B = {b >= t} of two maps of one shape; 0 where the union is empty."""
    levels = torch.tensor(thresholds, dtype=a.dtype, device=a.device).view(-1, *([1] * a.dim()))
    above_a, above_b = a[None] >= levels, b[None] >= levels
    intersection = (above_a & above_b).flatten(1).sum(dim=1)
    union = (above_a | above_b).flatten(1).sum(dim=1)
    return torch.where(union > 0, intersection / union.clamp_min(1), 0.0)
