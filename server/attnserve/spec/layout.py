"""The layout bindings of a GenerateImage request (BizGen-style): checked, and compiled into the
key emphases of every cross-attention layer (attention/layout_binding.py)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

from attnserve_client.v1 import image_generation_pb2

from ..attention.layout_binding import Box, binding_ops
from ..attention.plan import ALL_STEPS, KeySet, RequestPlan, ScopedOp
from .errors import Violations
from .ranges import ranged_value
from .selectors import prompt_ranges
from .words import position_ranges, resolve_words

MAX_BINDINGS = 16
DEFAULT_STRENGTH = 5.0


def compile_layout(
    bindings: Sequence[image_generation_pb2.LayoutBinding],
    grids: Mapping[int, tuple[int, int]],
    prompt_tokens: int,
    word_positions: Callable[[str], tuple[int, ...]],
    violations: Violations,
) -> dict[int, tuple[ScopedOp, ...]]:
    """Cross-attention layer -> the bindings' operations there, binding by binding; grids maps
    each cross-attention layer to the (rows, cols) grid of its image tokens at the request's size."""
    if not bindings:
        return {}
    if len(bindings) > MAX_BINDINGS:
        violations.add("layout", f"{len(bindings)} bindings exceed the limit of {MAX_BINDINGS}")
        return {}
    if not grids:
        violations.add("layout", "this model has no cross-attention over a grid of image tokens to bind")
        return {}
    ops: dict[int, tuple[ScopedOp, ...]] = {layer: () for layer in grids}
    for i, binding in enumerate(bindings):
        field = f"layout[{i}]"
        before = len(violations.items)
        box = _box(binding, field, violations)
        alpha = ranged_value(binding, "strength", DEFAULT_STRENGTH, "layout.strength", field, violations)
        if not binding.words and not binding.ranges:
            violations.add(f"{field}.words", "name the bound prompt span: words or ranges")
        ranges = prompt_ranges(binding.ranges, f"{field}.ranges", prompt_tokens, violations)
        for _, positions in resolve_words(binding.words, f"{field}.words", word_positions, violations):
            ranges += position_ranges(positions)
        if len(violations.items) > before:
            continue
        keys = KeySet(ranges=ranges)
        for layer, grid in grids.items():
            ops[layer] += binding_ops(box, grid, keys, alpha)
    return ops


def _box(binding: image_generation_pb2.LayoutBinding, field: str, violations: Violations) -> Box:
    box = (binding.x0, binding.y0, binding.x1, binding.y1)
    for name, value in zip(("x0", "y0", "x1", "y1"), box):
        if not (math.isfinite(value) and 0 <= value <= 1):
            violations.add(f"{field}.{name}", f"must be a fraction in [0, 1] (got {value:g})")
    for low, high in (("x0", "x1"), ("y0", "y1")):
        if not getattr(binding, low) < getattr(binding, high):
            violations.add(f"{field}.{high}", f"must be greater than {low}")
    return box


def with_layout(plan: RequestPlan, layout_ops: Mapping[int, tuple[ScopedOp, ...]]) -> RequestPlan:
    """The plan with the layout's operations after its interventions, at every step."""
    if not any(layout_ops.values()):
        return plan
    layer_ops = dict(plan.layer_ops)
    for layer, ops in layout_ops.items():
        layer_ops[layer] = tuple(layer_ops.get(layer, ())) + tuple((ALL_STEPS, op) for op in ops)
    return dataclasses.replace(plan, layer_ops=layer_ops)
