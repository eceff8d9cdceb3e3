"""The attention layers of a model, as requests are checked against them.

A model is described, not assumed: its geometry lists every attention layer with its name,
kind, component and shape, so layers may differ (a UNet's blocks, a VLM's vision tower) and
selectors address them by index or by name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AttentionKind(enum.Enum):
    #: A sequence attends to itself (a language model's or a vision tower's layers).
    SELF = "self"
    #: Queries attend to another sequence's keys (a UNet's text cross-attention).
    CROSS = "cross"
    #: Queries and keys span two streams concatenated (an SD3 or Flux DiT block).
    JOINT = "joint"


class Component(enum.Enum):
    """The part of a model an attention layer belongs to."""

    LANGUAGE_MODEL = "language_model"
    VISION_TOWER = "vision_tower"
    UNET_BLOCK = "unet_block"
    DIT_BLOCK = "dit_block"


@dataclass(frozen=True)
class AttentionLayer:
    #: The attention module's path in the model, e.g. "model.layers.5.self_attn".
    name: str
    #: Position in ModelGeometry.layers; selectors and plans address the layer by it.
    index: int
    kind: AttentionKind
    #: Whether a query sees only the keys at or before its own position.
    causal: bool
    component: Component
    #: Query heads.
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class ModelGeometry:
    #: Every attention layer of the model; layers[i].index == i.
    layers: tuple[AttentionLayer, ...]

    def __post_init__(self) -> None:
        for position, layer in enumerate(self.layers):
            if layer.index != position:
                raise ValueError(f"layer {layer.name!r} has index {layer.index} at position {position}")

    @classmethod
    def causal_lm(cls, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> ModelGeometry:
        """A decoder-only language model: num_layers causal self-attention layers of one shape,
        named as transformers and vLLM name them ("model.layers.<i>.self_attn")."""
        return cls(
            tuple(
                AttentionLayer(
                    name=f"model.layers.{i}.self_attn",
                    index=i,
                    kind=AttentionKind.SELF,
                    causal=True,
                    component=Component.LANGUAGE_MODEL,
                    num_heads=num_heads,
                    num_kv_heads=num_kv_heads,
                    head_dim=head_dim,
                )
                for i in range(num_layers)
            )
        )

    @classmethod
    def of_config(cls, config) -> ModelGeometry:
        """From a transformers causal-LM config (num_key_value_heads and head_dim when it has them)."""
        num_heads = config.num_attention_heads
        return cls.causal_lm(
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kinds(self) -> frozenset[AttentionKind]:
        """The kinds of attention the model has a layer of."""
        return frozenset(layer.kind for layer in self.layers)

    @property
    def language_model_layers(self) -> tuple[AttentionLayer, ...]:
        return tuple(layer for layer in self.layers if layer.component == Component.LANGUAGE_MODEL)

    # The shape the language model's layers share (GetModel's num_heads, num_kv_heads and
    # head_dim; calibration); 0 when they differ or the model has none.

    @property
    def num_heads(self) -> int:
        return self._language_model_shared("num_heads")

    @property
    def num_kv_heads(self) -> int:
        return self._language_model_shared("num_kv_heads")

    @property
    def head_dim(self) -> int:
        return self._language_model_shared("head_dim")

    def _language_model_shared(self, attribute: str) -> int:
        values = {getattr(layer, attribute) for layer in self.language_model_layers}
        return values.pop() if len(values) == 1 else 0
