"""Perturbed-attention guidance of a GenerateImage request (PAG, SoftPAG): checked against the
model's geometry and compiled into the perturbed branch's operations per layer.

The perturbation is attention.core's IdentityBlend (output (1 - u) o_i + u v_i): weight 1 on
every head of whole layers for PAG, weight u on chosen heads for SoftPAG (named in soft.heads, or
by a SoftPAG preset of the model in soft.preset). On a DiT's joint attention layers PAG's
identity is the image block's (diffusers' PAGJointAttnProcessor2_0): the engine realises the
blend there as the image-to-image block masked to its diagonal, which is PAG's map for u = 1
only, so SoftPAG takes u = 1 (or 0) on joint layers
(docs/attention-math.md#perturbed-attention-guidance).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from attnserve_client.v1 import image_generation_pb2, intervention_pb2

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
    presets: Mapping[str, Sequence[intervention_pb2.Intervention]] = MappingProxyType({}),
) -> PerturbedGuidance:
    """presets: the model's presets by name, which soft.preset may name."""
    scale = ranged_value(msg, "scale", DEFAULT_PAG_SCALE, "pag.scale", field, violations)
    adaptive = ranged_value(msg, "adaptive_scale", 0.0, "pag.adaptive_scale", field, violations)
    if msg.HasField("soft"):
        if msg.layers:
            violations.add(f"{field}.layers", "leave empty with soft: SoftPAG names its layers in soft.heads")
        layer_ops = _soft_ops(msg.soft, f"{field}.soft", geometry, presets, violations)
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
    msg: image_generation_pb2.SoftPerturbation,
    field: str,
    geometry: ModelGeometry,
    presets: Mapping[str, Sequence[intervention_pb2.Intervention]],
    violations: Violations,
) -> dict[int, tuple[ScopedOp, ...]]:
    if not msg.preset:
        u = ranged_value(msg, "u", 1.0, "pag.soft.u", field, violations)
        if not msg.heads:
            violations.add(f"{field}.heads", "name at least one self- or joint attention layer and its heads")
        return _head_ops(msg.heads, u, f"{field}.heads", geometry, violations)
    if msg.heads:
        violations.add(f"{field}.heads", "leave empty with preset: the preset names the heads")
    preset = soft_preset(msg.preset, presets)
    if isinstance(preset, str):
        violations.add(f"{field}.preset", preset)
        return {}
    layer_heads, preset_u = preset
    u = ranged_value(msg, "u", preset_u, "pag.soft.u", field, violations)
    # The preset's heads were written for a model; report a mismatch with this one on the name.
    found = Violations()
    ops = _head_ops(layer_heads, u, "heads", geometry, found)
    for violation in found.items:
        violations.add(
            f"{field}.preset", f"preset {quoted(msg.preset)}: {violation.field}: {violation.description}"
        )
    return ops


def soft_preset(
    name: str, presets: Mapping[str, Sequence[intervention_pb2.Intervention]]
) -> tuple[Sequence[intervention_pb2.LayerHeads], float] | str:
    """(heads, u) of a SoftPAG preset: one identity_blend intervention whose selector names only
    layer_heads; or why the name is not one."""
    if name not in presets:
        return f"unknown preset {quoted(name)}; GetModel lists this model's presets"
    interventions = presets[name]
    only = interventions[0] if len(interventions) == 1 else None
    if (
        only is None
        or only.WhichOneof("operation") != "identity_blend"
        or [f.name for f, _ in only.selector.ListFields()] != ["layer_heads"]
    ):
        return (
            f"preset {quoted(name)} is not a SoftPAG preset (one identity_blend intervention on "
            "layer_heads, as attnserve calibrate --method headhunter writes)"
        )
    blend = only.identity_blend
    return only.selector.layer_heads, blend.weight if blend.HasField("weight") else 1.0


def _head_ops(
    heads_of_layers: Sequence[intervention_pb2.LayerHeads],
    u: float,
    field: str,
    geometry: ModelGeometry,
    violations: Violations,
) -> dict[int, tuple[ScopedOp, ...]]:
    """IdentityBlend(u) on each self- or joint attention layer's heads."""
    ops: dict[int, tuple[ScopedOp, ...]] = {}
    for i, layer_heads in enumerate(heads_of_layers):
        at = f"{field}[{i}]"
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
                "pag.soft.u",
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
