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
