"""image_attention: where the model looked in each image, per generated token: the attention of
the row that predicts the token over each image's patch tokens, as a grid per image, for chosen
layers, heads and steps, averaged over them, one map per layer (its heads' mean) or one per layer
and head.

Stage: the last query rows attention.core computes on the final (post-intervention) map, in the
calls of the chosen layers and steps; the columns of each image's tokens are cut out. State: the
step's maps per (image, layer, head); per token, so each step's maps go out with its token.
The weights are attention probabilities (shares of the whole row, not renormalised over the
image), so a map also says how much of the row went to the image at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import readout_pb2

from ..attention.plan import NO_NEEDS, ReadoutNeeds
from ..attention.readout import RowReadout
from ..spec.errors import Violations
from .base import CallSite, Readout, image_readout_layers

FIELD = "readouts.image_attention"
ROWS = ReadoutNeeds(last_query_rows=True)


@dataclass(frozen=True)
class ImageAttentionSettings:
    name: ClassVar[str] = "image_attention"
    layers: frozenset[int] = frozenset()
    #: Query heads, ascending; () is every head.
    heads: tuple[int, ...] = ()
    #: Empty: every step.
    steps: frozenset[int] = frozenset()
    per_head: bool = False
    per_layer: bool = False
    #: Half-open prompt positions of each image's tokens (a square grid of patches each).
    image_spans: tuple[tuple[int, int], ...] = ()

    def needs(self, layer: int, step: int) -> ReadoutNeeds:
        if layer in self.layers and (not self.steps or step in self.steps):
            return ROWS
        return NO_NEEDS


@dataclass
class ImageAttentionStep:
    """One step's maps: (image, layer, head) -> patch weights, row-major; head is None for a
    layer's mean over its heads (per_layer)."""

    per_head: bool = False
    per_layer: bool = False
    maps: dict[tuple[int, int, int | None], list[float]] = field(default_factory=dict)


class ImageAttention(Readout):
    name = ImageAttentionSettings.name
    per_token = True

    def asked(self, spec: readout_pb2.ReadoutSpec) -> bool:
        return spec.HasField("image_attention")

    def compile(self, spec, ctx, violations: Violations) -> ImageAttentionSettings:
        maps = spec.image_attention
        layers = image_readout_layers(maps, FIELD, ctx, violations)
        for i, step in enumerate(maps.steps):
            if not 0 <= step < ctx.max_tokens:
                violations.add(
                    f"{FIELD}.steps[{i}]", f"step {step} must be in [0, {ctx.max_tokens}) (max_tokens)"
                )
        heads = tuple(sorted(set(maps.heads)))
        if maps.per_head and maps.per_layer:
            violations.add(f"{FIELD}.per_layer", "set per_head or per_layer, not both")
        per_step = sum(end - start for start, end in ctx.image_spans)
        if maps.per_head:
            per_step *= sum(len(heads) or layer.num_heads for layer in layers)
        elif maps.per_layer:
            per_step *= len(layers)
        values = per_step * (len(set(maps.steps)) or ctx.max_tokens)
        if values > ctx.limits.max_readout_values:
            violations.add(
                FIELD,
                f"up to {values} attention weights exceed the limit of {ctx.limits.max_readout_values}; "
                "ask for fewer steps, or for the mean instead of per_head",
            )
        return ImageAttentionSettings(
            layers=frozenset(layer.index for layer in layers),
            heads=heads,
            steps=frozenset(maps.steps),
            per_head=maps.per_head,
            per_layer=maps.per_layer,
            image_spans=tuple(ctx.image_spans),
        )

    def new_state(self) -> ImageAttentionStep:
        return ImageAttentionStep()

    def record(
        self, state: ImageAttentionStep, settings: ImageAttentionSettings, call: CallSite, readout: RowReadout
    ) -> None:
        if readout.last_query_rows is None or settings.needs(call.layer, call.step) is NO_NEEDS:
            return
        state.per_head = settings.per_head
        state.per_layer = settings.per_layer
        rows = readout.last_query_rows  # (heads, keys)
        heads = settings.heads or range(rows.shape[0])
        for image, (start, end) in enumerate(settings.image_spans):
            if settings.per_layer:
                state.maps[(image, call.layer, None)] = rows[list(heads), start:end].mean(0).tolist()
                continue
            for head in heads:
                state.maps[(image, call.layer, head)] = rows[head, start:end].tolist()

    def merge(self, state: ImageAttentionStep, other: ImageAttentionStep) -> None:
        state.per_head = state.per_head or other.per_head
        state.per_layer = state.per_layer or other.per_layer
        state.maps.update(other.maps)

    def write_token(self, token: pb.GeneratedToken, state: ImageAttentionStep) -> None:
        token.image_attention.extend(image_attention_maps(state, token.index))


def image_attention_maps(state: ImageAttentionStep, step: int) -> list[readout_pb2.ImageAttentionMap]:
    """The step's maps: each (layer, head)'s, each layer's, or per image their mean over layers
    and heads."""
    out = []
    if state.per_head:
        for (image, layer, head), weights in sorted(state.maps.items()):
            out.append(_map(image, step, weights, layer=layer, head=head))
        return out
    if state.per_layer:
        for (image, layer, _), weights in sorted(state.maps.items(), key=lambda item: item[0][:2]):
            out.append(_map(image, step, weights, layer=layer))
        return out
    by_image: dict[int, list[list[float]]] = {}
    for (image, _, _), weights in sorted(state.maps.items()):
        by_image.setdefault(image, []).append(weights)
    for image, maps in sorted(by_image.items()):
        mean = [sum(column) / len(maps) for column in zip(*maps)]
        out.append(_map(image, step, mean))
    return out


def _map(image: int, step: int, weights: list[float], **where) -> readout_pb2.ImageAttentionMap:
    return readout_pb2.ImageAttentionMap(
        image=image, step=step, grid_size=math.isqrt(len(weights)), weights=weights, **where
    )
