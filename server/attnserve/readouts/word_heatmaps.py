"""The word_heatmaps readout of GenerateImage (DAAM): per prompt word and image, where the
conditional branch's cross-attention put that word, and how much the content words' and the style
words' maps overlap (the math: attention/heatmaps.py).

Diffusion's readouts follow the same life as the text readouts of this package (compile once,
record each attention call, accumulate over steps, write into the last message), but a
different response (GenerateImageComplete) and a different source: the unedited cross-attention
map of one batch row, which the diffusers engine reads in its attention processor. So this
module is not in READOUTS, whose contract is the text engines'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from attnserve_client.v1 import image_generation_pb2 as pb

from ..attention.heatmaps import (
    IOU_THRESHOLDS,
    heatmap_iou,
    query_grid,
    token_maps,
    word_heatmap,
    word_set_heatmap,
)
from ..spec.errors import Violations
from ..spec.words import MAX_WORDS, resolve_words, word_positions


@dataclass(frozen=True)
class HeatmapWord:
    word: str
    #: Positions of its tokens among the prompt's text-encoder tokens.
    positions: tuple[int, ...]


@dataclass(frozen=True)
class ContentStyleWords:
    """The two word sets whose maps' overlap a request reads ("The Cow of Rembrandt")."""

    content: tuple[HeatmapWord, ...]
    style: tuple[HeatmapWord, ...]


def compile_words(
    spec: pb.WordHeatmapsSpec,
    prompt_token_ids: Sequence[int],
    tokenizer,
    pixels: int,
    max_values: int,
    violations: Violations,
) -> tuple[HeatmapWord, ...]:
    """Each asked word with its token positions in the prompt; pixels = images x height x width."""
    field = "word_heatmaps.words"
    if len(spec.words) * pixels > max_values and len(spec.words) <= MAX_WORDS:
        violations.add(
            field,
            f"{len(spec.words)} words x {pixels} pixels (images x height x width) exceed "
            f"max_readout_values ({max_values})",
        )
    found = resolve_words(
        spec.words, field, lambda word: word_positions(word, prompt_token_ids, tokenizer), violations
    )
    return tuple(HeatmapWord(word, positions) for word, positions in found)


def compile_content_style(
    spec: pb.WordHeatmapsSpec, prompt_token_ids: Sequence[int], tokenizer, violations: Violations
) -> ContentStyleWords | None:
    """The content and style words with their positions; None when neither set is asked for."""
    if not spec.content_words and not spec.style_words:
        return None
    sets = []
    for name in ("content_words", "style_words"):
        field = f"word_heatmaps.{name}"
        words = getattr(spec, name)
        if not words:
            violations.add(field, "name content_words and style_words together (at least one word each)")
        found = resolve_words(
            words, field, lambda word: word_positions(word, prompt_token_ids, tokenizer), violations
        )
        sets.append(tuple(HeatmapWord(word, positions) for word, positions in found))
    return ContentStyleWords(*sets)


class HeatmapAccumulator:
    """One image's token maps, summed over steps and averaged over the layers of each step."""

    def __init__(self, latent: tuple[int, int], num_layers: int):
        self.latent = latent
        self.num_layers = num_layers
        self.summed: torch.Tensor | None = None

    def record(self, probs: torch.Tensor) -> None:
        """Add one layer's (H, Lq, Lk) cross-attention probabilities of one step."""
        maps = token_maps(probs, query_grid(probs.shape[1], self.latent), self.latent) / self.num_layers
        self.summed = maps if self.summed is None else self.summed + maps

    def heatmaps(self, words: Sequence[HeatmapWord], image: tuple[int, int]) -> list[torch.Tensor]:
        """Each word's (height, width) heatmap."""
        if self.summed is None:
            raise RuntimeError("no cross-attention was recorded")
        return [word_heatmap(self.summed, word.positions, image) for word in words]

    def content_style_iou(self, words: ContentStyleWords, image: tuple[int, int]) -> tuple[float, ...]:
        """The IoU of the content and style maps at each of IOU_THRESHOLDS."""
        if self.summed is None:
            raise RuntimeError("no cross-attention was recorded")
        content = word_set_heatmap(self.summed, [word.positions for word in words.content], image)
        style = word_set_heatmap(self.summed, [word.positions for word in words.style], image)
        return tuple(heatmap_iou(content, style).tolist())


def write(
    complete: pb.GenerateImageComplete,
    words: Sequence[HeatmapWord],
    per_image: Sequence[Sequence[torch.Tensor]],
) -> None:
    """Write each image's word heatmaps into the last message."""
    for image, maps in enumerate(per_image):
        for word, heatmap in zip(words, maps):
            complete.word_heatmaps.add(
                word=word.word,
                image=image,
                token_positions=word.positions,
                width=heatmap.shape[1],
                height=heatmap.shape[0],
                values=heatmap.flatten().tolist(),
            )


def write_overlaps(complete: pb.GenerateImageComplete, per_image: Sequence[Sequence[float]]) -> None:
    """Write each image's content-vs-style IoU curve into the last message."""
    for image, iou in enumerate(per_image):
        complete.content_style_overlaps.add(image=image, thresholds=IOU_THRESHOLDS, iou=iou)
