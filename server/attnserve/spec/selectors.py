"""Checks of the selectors a spec uses to name layers, heads and prompt ranges, shared by the
intervention compiler (compile.py) and the readouts (attnserve.readouts)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from .errors import Violations, quoted
from .geometry import AttentionLayer, ModelGeometry


def selected_layers(
    indices: Sequence[int], patterns: Sequence[str], field: str, geo: ModelGeometry, violations: Violations
) -> list[AttentionLayer]:
    """The layers named by index (field.layers) or by name pattern (field.layer_names), in index order."""
    selected = {
        index
        for i, index in enumerate(indices)
        if check_index(index, geo.num_layers, f"{field}.layers[{i}]", "layer", violations)
    }
    selected |= layers_named(patterns, f"{field}.layer_names", geo, violations)
    return [geo.layers[index] for index in sorted(selected)]


# Bounds that keep matching cheap (translating a glob takes time quadratic in its length).
MAX_LAYER_NAME_PATTERNS = 16
MAX_LAYER_NAME_PATTERN_LENGTH = 128


def layers_named(patterns: Sequence[str], field: str, geo: ModelGeometry, violations: Violations) -> set[int]:
    """Indices of the layers whose names match a glob pattern; each pattern must match one."""
    if len(patterns) > MAX_LAYER_NAME_PATTERNS:
        violations.add(field, f"{len(patterns)} patterns exceed the limit of {MAX_LAYER_NAME_PATTERNS}")
        return set()
    matched: set[int] = set()
    for i, pattern in enumerate(patterns):
        if len(pattern) > MAX_LAYER_NAME_PATTERN_LENGTH:
            violations.add(
                f"{field}[{i}]",
                f"pattern {quoted(pattern)} is longer than {MAX_LAYER_NAME_PATTERN_LENGTH} characters",
            )
            continue
        match = re.compile(fnmatch.translate(pattern)).match
        hits = {layer.index for layer in geo.layers if match(layer.name)}
        if not hits:
            violations.add(
                f"{field}[{i}]", f"pattern {quoted(pattern)} matches no layer; GetModel lists the layers"
            )
        matched |= hits
    return matched


def checked_heads(heads: Sequence[int], field: str, layers: Sequence[AttentionLayer], violations: Violations):
    """heads (None for every head), each checked on every one of layers."""
    for i, head in enumerate(heads):
        lacking = next((layer for layer in layers if not 0 <= head < layer.num_heads), None)
        if lacking is not None:
            n = lacking.num_heads
            violations.add(
                f"{field}[{i}]",
                f"head {head} is out of range on layer {lacking.index} ({quoted(lacking.name)}), "
                f"which has {n} heads (0..{n - 1})",
            )
    return tuple(sorted(set(heads))) if heads else None


def check_index(value: int, size: int, field: str, what: str, violations: Violations) -> bool:
    if 0 <= value < size:
        return True
    violations.add(field, f"{what} {value} is out of range: this model has {size} ({what} 0..{size - 1})")
    return False


def prompt_ranges(
    ranges, field: str, prompt_tokens: int, violations: Violations
) -> tuple[tuple[int, int], ...]:
    out = []
    for i, r in enumerate(ranges):
        if not 0 <= r.start < r.end <= prompt_tokens:
            violations.add(
                f"{field}[{i}]",
                f"range [{r.start}, {r.end}) must satisfy 0 <= start < end <= {prompt_tokens} (prompt tokens)",
            )
        out.append((r.start, r.end))
    return tuple(out)


def image_indices(
    image_tokens, field: str, image_spans: Sequence[tuple[int, int]], violations: Violations
) -> tuple[int, ...]:
    """The images an ImageTokens selector names (every image when it names none), checked."""
    if not image_spans:
        violations.add(field, "the request has no images (image parts of chat messages)")
        return ()
    before = len(violations.items)
    for i, image in enumerate(image_tokens.images):
        if not 0 <= image < len(image_spans):
            violations.add(
                f"{field}.images[{i}]",
                f"image {image} is out of range: the request has {len(image_spans)} "
                f"(images 0..{len(image_spans) - 1})",
            )
    if len(violations.items) > before:
        return ()
    return tuple(sorted(set(image_tokens.images))) or tuple(range(len(image_spans)))
