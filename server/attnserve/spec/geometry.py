"""The attention geometry of a model, as requests are checked against it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    #: Query heads per layer.
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of_config(cls, config) -> ModelGeometry:
        """From a transformers model config (num_key_value_heads and head_dim when it has them)."""
        num_heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        )
