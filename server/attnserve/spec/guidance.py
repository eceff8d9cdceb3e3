"""Perturbed-attention guidance of a GenerateImage request (PAG, SoftPAG): checked against the
model's geometry and compiled into the perturbed branch's operations per layer.

The perturbation is attention.core's IdentityBlend (output (1 - u) o_i + u v_i): weight 1 on
every head of whole layers for PAG, weight u on chosen heads for SoftPAG. On a DiT's joint
attention layers PAG's identity is the image block's (diffusers' PAGJointAttnProcessor2_0): the
engine realises the blend there as the image-to-image block masked to its diagonal, which is
PAG's map for u = 1 only, so SoftPAG takes u = 1 (or 0) on joint layers
(docs/attention-math.md#perturbed-attention-guidance).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from attnserve_client.v1 import image_generation_pb2

from ..attention.plan import IdentityBlend, ScopedOp
from .errors import Violations, quoted
from .geometry import AttentionKind, AttentionLayer, Component, ModelGeometry
from .ranges import ranged_value
from .selectors import check_index, checked_heads

#: diffusers' default PAG layers: its UNet PAG pipelines' ("mid"), and its SD3 PAG pipeline's
#: ("blocks.1", the second transformer block).
DEFAULT_PAG_LAYERS = ("mid",)
DEFAULT_DIT_PAG_LAYERS = ("blocks.1",)
#: The kinds of layer PAG perturbs: diffusers' PAG pipelines take every attention layer that is
#: not cross-attention.
PERTURBED_KINDS = frozenset({AttentionKind.SELF, AttentionKind.JOINT})
DEFAULT_PAG_SCALE = 3.0
MAX_PAG_LAYER_PATTERNS = 16
MAX_PAG_LAYER_PATTERN_LENGTH = 128


@dataclass(frozen=True)
class PerturbedGuidance:
    """PAG or SoftPAG: a perturbed conditional branch whose attention is (partly) the identity.

    eps = eps_u + w (eps_c - eps_u) + s(t) (eps_c - eps_ptb), s(t) = max(0, scale -
    adaptive_scale (1000 - t)) (docs/attention-math.md#perturbed-attention-guidance).
    """

    scale: float
    adaptive_scale: float
    #: Layer index -> the perturbed branch's operations there.
    layer_ops: Mapping[int, tuple[ScopedOp, ...]]

    def scale_at(self, timestep: float) -> float:
        return max(0.0, self.scale - self.adaptive_scale * (1000 - timestep))


def compile_guidance(
    msg: image_generation_pb2.PerturbedAttentionGuidance,
    field: str,
    geometry: ModelGeometry,
    violations: Violations,
) -> PerturbedGuidance:
    scale = ranged_value(msg, "scale", DEFAULT_PAG_SCALE, "pag.scale", field, violations)
    adaptive = ranged_value(msg, "adaptive_scale", 0.0, "pag.adaptive_scale", field, violations)
    if msg.HasField("soft"):
        if msg.layers:
            violations.add(f"{field}.layers", "leave empty with soft: SoftPAG names its layers in soft.heads")
        layer_ops = _soft_ops(msg.soft, f"{field}.soft", geometry, violations)
    else:
        patterns = tuple(msg.layers) or default_pag_layers(geometry)
        layers = pag_layers(patterns, f"{field}.layers", geometry, violations)
        layer_ops = {layer.index: (ScopedOp(IdentityBlend(1.0)),) for layer in layers}
    return PerturbedGuidance(scale=scale, adaptive_scale=adaptive, layer_ops=layer_ops)


def default_pag_layers(geometry: ModelGeometry) -> tuple[str, ...]:
    """diffusers' default PAG layer ids for the model: its SD3 pipeline's for a DiT."""
    if any(layer.component is Component.DIT_BLOCK for layer in geometry.layers):
        return DEFAULT_DIT_PAG_LAYERS
    return DEFAULT_PAG_LAYERS


def pag_layers(
    patterns: tuple[str, ...], field: str, geometry: ModelGeometry, violations: Violations
) -> list[AttentionLayer]:
    """The self- and joint attention layers diffusers' PAG pipelines pick for these layer ids:
    those whose name the id (a regular expression) is found in, except that an id ending in a
    number does not pick a layer whose name ends in another number (pipelines/pag/pag_utils.py)."""
    if len(patterns) > MAX_PAG_LAYER_PATTERNS:
        violations.add(field, f"{len(patterns)} layer ids exceed the limit of {MAX_PAG_LAYER_PATTERNS}")
        return []
    selected: dict[int, AttentionLayer] = {}
    for i, pattern in enumerate(patterns):
        if len(pattern) > MAX_PAG_LAYER_PATTERN_LENGTH:
            violations.add(f"{field}[{i}]", f"longer than {MAX_PAG_LAYER_PATTERN_LENGTH} characters")
            continue
        try:
            search = re.compile(pattern).search
        except re.error as err:
            violations.add(f"{field}[{i}]", f"{quoted(pattern)} is not a regular expression: {err}")
            continue
        hits = [
            layer
            for layer in geometry.layers
            if layer.kind in PERTURBED_KINDS
            and search(layer.name) is not None
            and not _fake_integral_match(pattern, layer.name)
        ]
        if not hits:
            violations.add(
                f"{field}[{i}]",
                f"{quoted(pattern)} matches no self- or joint attention layer; GetModel lists the layers",
            )
        selected |= {layer.index: layer for layer in hits}
    return [selected[index] for index in sorted(selected)]


def _fake_integral_match(pattern: str, name: str) -> bool:
    last_id, last_name = pattern.split(".")[-1], name.split(".")[-1]
    return last_id.isnumeric() and last_name.isnumeric() and last_id == last_name


def _soft_ops(
    msg: image_generation_pb2.SoftPerturbation, field: str, geometry: ModelGeometry, violations: Violations
) -> dict[int, tuple[ScopedOp, ...]]:
    u = ranged_value(msg, "u", 1.0, "pag.soft.u", field, violations)
    if not msg.heads:
        violations.add(f"{field}.heads", "name at least one self- or joint attention layer and its heads")
    ops: dict[int, tuple[ScopedOp, ...]] = {}
    for i, layer_heads in enumerate(msg.heads):
        at = f"{field}.heads[{i}]"
        if not check_index(layer_heads.layer, geometry.num_layers, f"{at}.layer", "layer", violations):
            continue
        layer = geometry.layers[layer_heads.layer]
        if layer.kind not in PERTURBED_KINDS:
            violations.add(
                f"{at}.layer",
                f"layer {layer.index} ({quoted(layer.name)}) is not a self- or joint attention layer",
            )
            continue
        if layer.kind is AttentionKind.JOINT and u not in (0.0, 1.0):
            violations.add(
                f"{field}.u",
                f"on joint attention (layer {layer.index}, {quoted(layer.name)}) SoftPAG takes u = 1 "
                "(PAG's perturbation on the chosen heads) or 0, not a blend in between",
            )
            continue
        if layer.index in ops:
            violations.add(f"{at}.layer", f"layer {layer.index} is named twice")
            continue
        heads = checked_heads(layer_heads.heads, f"{at}.heads", [layer], violations)
        ops[layer.index] = (ScopedOp(IdentityBlend(u), heads=heads),)
    return ops
