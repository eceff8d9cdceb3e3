"""The word_heatmaps readout of GenerateImage (DAAM): per prompt word and image, where the
conditional branch's cross-attention put that word (the math: attention/heatmaps.py).

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

from ..attention.heatmaps import query_grid, token_maps, word_heatmap
from ..spec.errors import Violations
from ..spec.words import MAX_WORDS, resolve_words, word_positions


@dataclass(frozen=True)
class HeatmapWord:
    word: str
    #: Positions of its tokens among the prompt's text-encoder tokens.
    positions: tuple[int, ...]


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
