"""Validate a request's intervention and readout specs and compile them into a RequestPlan.

Engine-free: everything is checked against the model's geometry, the limits and the prompt
length, so nothing invalid reaches a model. Field paths in violations use the proto field
names of GenerateRequest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from attnserve_client.v1 import intervention_pb2, readout_pb2

from ..attention import plan as P
from ..readouts import READOUTS
from .errors import Unsupported, Violations, quoted
from .geometry import AttentionKind, AttentionLayer, ModelGeometry
from .ranges import ranged_value
from .selectors import check_index, checked_heads, image_indices, prompt_ranges, selected_layers
from .words import position_ranges, resolve_words


@dataclass(frozen=True)
class SpecLimits:
    max_interventions: int
    max_readout_values: int


@dataclass(frozen=True)
class SpecContext:
    """What a spec is checked against."""

    geometry: ModelGeometry
    limits: SpecLimits
    #: Preset name -> its interventions.
    presets: Mapping[str, Sequence[intervention_pb2.Intervention]]
    prompt_tokens: int
    max_tokens: int
    supported_operations: frozenset[str]
    supported_readouts: frozenset[str] = frozenset(READOUTS)
    #: Why the engine offers no interventions or readouts for this model, when it offers none.
    unsupported_reason: str | None = None
    #: Half-open prompt positions of each image's tokens (vision-language models).
    image_spans: tuple[tuple[int, int], ...] = ()
    #: Whether the engine can choose PAINT's image tokens (it reads the vision tower's attention).
    chooses_visual_tokens: bool = True
    #: A prompt word's token positions, every occurrence (diffusion models); None where key
    #: selectors take no words.
    word_positions: Callable[[str], tuple[int, ...]] | None = None


def compile_plan(
    interventions: intervention_pb2.InterventionSpec,
    readouts: readout_pb2.ReadoutSpec,
    ctx: SpecContext,
) -> P.RequestPlan:
    """Check both specs (raising InvalidRequest with every violation) and compile them."""
    violations = Violations()
    expanded: list[tuple[str, intervention_pb2.Intervention]] = []
    for i, name in enumerate(interventions.presets):
        field = f"interventions.presets[{i}]"
        if name not in ctx.presets:
            violations.add(field, f"unknown preset {quoted(name)}; GetModel lists this model's presets")
            continue
        expanded.extend((field, iv) for iv in ctx.presets[name])
    expanded.extend(
        (f"interventions.interventions[{i}]", iv) for i, iv in enumerate(interventions.interventions)
    )
    if len(expanded) > ctx.limits.max_interventions:
        violations.add(
            "interventions",
            f"{len(expanded)} interventions (presets expanded) exceed the limit of "
            f"{ctx.limits.max_interventions}",
        )
        violations.raise_if_any()

    layer_ops: dict[int, list[tuple[P.StepRange, P.ScopedOp]]] = {}
    applied: list[str] = []
    for field, iv in expanded:
        compiled = _compile_intervention(iv, field, ctx, violations)
        if compiled is None or compiled[2].op.is_identity:
            continue
        placements, steps, scoped = compiled
        applied.append(scoped.op.name)
        for layer, heads in placements:
            layer_ops.setdefault(layer, []).append((steps, dataclasses.replace(scoped, heads=heads)))

    compiled_readouts = _compile_readouts(readouts, ctx, violations)
    violations.raise_if_any()
    return P.RequestPlan(
        layer_ops={layer: tuple(ops) for layer, ops in layer_ops.items()},
        readouts=compiled_readouts,
        applied_operations=tuple(applied),
        image_keys=tuple(ctx.image_spans),
    )


# --- Interventions ----------------------------------------------------------------------------

_EVERY_KEY = P.KeySet(include_generated=True)


def _compile_intervention(
    iv: intervention_pb2.Intervention, field: str, ctx: SpecContext, violations: Violations
) -> tuple[list[tuple[int, tuple[int, ...] | None]], P.StepRange, P.ScopedOp] | None:
    before = len(violations.items)
    kind = iv.WhichOneof("operation")
    if kind is None:
        violations.add(f"{field}.operation", "set exactly one operation (e.g. sink_calibration)")
        return None
    if kind not in ctx.supported_operations:
        raise Unsupported(_unsupported(f"{field}: operation {kind}", ctx))
    op = _operation(kind, getattr(iv, kind), f"{field}.{kind}", violations)

    sel = iv.selector
    sfield = f"{field}.selector"
    placements = _placements(sel, sfield, ctx.geometry, violations)
    has_keys = sel.HasField("keys")
    if kind == "sink_calibration" and has_keys:
        violations.add(f"{sfield}.keys", "sink_calibration finds its own keys; leave keys unset")
    if has_keys:
        keys = _key_set(sel.keys, f"{sfield}.keys", ctx, violations)
    else:  # a temperature acts on every logit; key operations default to the prompt's keys
        keys = _EVERY_KEY if kind == "temperature" else P.ALL_PROMPT_KEYS
    if kind == "identity_blend":
        _check_own_keys(placements, sfield, ctx.geometry, violations)
    steps = _step_range(sel, sfield, violations)
    if len(violations.items) > before:
        return None
    scoped = P.ScopedOp(op=op, keys=keys, last_query_only=sel.queries == intervention_pb2.QUERY_SCOPE_LAST)
    return placements, steps, scoped


def _placements(
    sel: intervention_pb2.Selector, field: str, geo: ModelGeometry, violations: Violations
) -> list[tuple[int, tuple[int, ...] | None]]:
    """(layer, heads) pairs a selector covers; heads None means every head."""
    kind = _attention_kind(sel.attention, f"{field}.attention", geo, violations)
    if sel.layer_heads and (sel.layers or sel.layer_names or sel.heads):
        violations.add(f"{field}.layer_heads", "use either layer_heads or layers/layer_names/heads, not both")
        return []
    if sel.layer_heads:
        out = []
        for i, lh in enumerate(sel.layer_heads):
            lh_field = f"{field}.layer_heads[{i}]"
            if not check_index(lh.layer, geo.num_layers, f"{lh_field}.layer", "layer", violations):
                continue
            layer = geo.layers[lh.layer]
            _check_kinds([layer], kind, f"{field}.attention", violations)
            out.append((lh.layer, checked_heads(lh.heads, f"{lh_field}.heads", [layer], violations)))
        return out
    if sel.layers or sel.layer_names:
        layers = selected_layers(sel.layers, sel.layer_names, field, geo, violations)
        _check_kinds(layers, kind, f"{field}.attention", violations)
    else:
        layers = [layer for layer in geo.layers if kind in (None, layer.kind)]
    # With no valid layer selected, heads are still checked (against every layer).
    heads = checked_heads(sel.heads, f"{field}.heads", layers or geo.layers, violations)
    return [(layer.index, heads) for layer in layers]


_ATTENTION_KINDS = {
    intervention_pb2.ATTENTION_KIND_SELF: AttentionKind.SELF,
    intervention_pb2.ATTENTION_KIND_CROSS: AttentionKind.CROSS,
    intervention_pb2.ATTENTION_KIND_JOINT: AttentionKind.JOINT,
}


def _attention_kind(
    value: int, field: str, geo: ModelGeometry, violations: Violations
) -> AttentionKind | None:
    """The kind a selector asks for; None (unset) accepts every kind."""
    if value == intervention_pb2.ATTENTION_KIND_UNSPECIFIED:
        return None
    kind = _ATTENTION_KINDS.get(value)
    if kind is None:
        violations.add(field, f"unknown attention kind {value}")
    elif kind not in geo.kinds:
        has = ", ".join(sorted(_kind_text(k) for k in geo.kinds))
        violations.add(
            field, f"this model has no {_kind_text(kind)} layer (it has {has}); GetModel lists its layers"
        )
    return kind


def _check_kinds(
    layers: Sequence[AttentionLayer], kind: AttentionKind | None, field: str, violations: Violations
) -> None:
    """One violation when some of the selected layers are not of the kind asked for."""
    others = [layer for layer in layers if kind not in (None, layer.kind)]
    if others:
        first = others[0]
        violations.add(
            field,
            f"{len(others)} selected layer(s) are not {_kind_text(kind)}, e.g. layer {first.index} "
            f"({quoted(first.name)}, {_kind_text(first.kind)})",
        )


def _check_own_keys(placements, field: str, geo: ModelGeometry, violations: Violations) -> None:
    """identity_blend needs each query's own key: no cross-attention layer (attention.core)."""
    cross = [geo.layers[layer] for layer, _ in placements if geo.layers[layer].kind is AttentionKind.CROSS]
    if cross:
        violations.add(
            f"{field}.attention",
            f"identity_blend needs self-attention (each query's own key), but {len(cross)} selected "
            f"layer(s) are cross-attention, e.g. layer {cross[0].index} ({quoted(cross[0].name)}); "
            "set attention to ATTENTION_KIND_SELF",
        )


def _kind_text(kind: AttentionKind) -> str:
    return f"{kind.value}-attention"


def _key_set(keys: intervention_pb2.KeySelector, field: str, ctx: SpecContext, violations: Violations):
    ranges = prompt_ranges(keys.ranges, f"{field}.ranges", ctx.prompt_tokens, violations)
    visual = None
    if keys.HasField("image_tokens"):
        images = image_indices(keys.image_tokens, f"{field}.image_tokens", ctx.image_spans, violations)
        part = _VISUAL_PARTS.get(keys.image_tokens.tokens)
        if part is None:
            violations.add(f"{field}.image_tokens.tokens", f"unknown value {keys.image_tokens.tokens}")
        elif part == "all":
            ranges = tuple(ranges) + tuple(ctx.image_spans[i] for i in images)
        elif not ctx.chooses_visual_tokens:
            raise Unsupported(
                _unsupported(
                    f"{field}.image_tokens.tokens: PAINT's tokens (they need the vision tower's attention)",
                    ctx,
                )
            )
        else:
            visual = P.VisualKeys(images=images, part=part)
    if keys.words:
        ranges = tuple(ranges) + _word_ranges(keys.words, f"{field}.words", ctx, violations)
    return P.KeySet(
        ranges=ranges, invert=keys.invert, include_generated=keys.include_generated, visual=visual
    )


def _word_ranges(words, field: str, ctx: SpecContext, violations: Violations) -> tuple[tuple[int, int], ...]:
    if ctx.word_positions is None:
        # A language model's tokenizer splits a word differently alone than inside a prompt
        # (leading spaces, merges), so a word could match the wrong tokens or none.
        violations.add(field, "prompt words select keys on diffusion models only; use ranges")
        return ()
    found = resolve_words(words, field, ctx.word_positions, violations)
    return tuple(r for _, positions in found for r in position_ranges(positions))


_VISUAL_PARTS = {
    intervention_pb2.VISUAL_TOKENS_UNSPECIFIED: "all",
    intervention_pb2.VISUAL_TOKENS_ALL: "all",
    intervention_pb2.VISUAL_TOKENS_PAINT_LOCAL: "paint_local",
    intervention_pb2.VISUAL_TOKENS_PAINT_SUMMARY: "paint_summary",
}


def _step_range(sel: intervention_pb2.Selector, field: str, violations: Violations) -> P.StepRange:
    if not sel.HasField("steps"):
        return P.ALL_STEPS
    steps = sel.steps
    end = steps.end if steps.HasField("end") else None
    if steps.start < 0:
        violations.add(f"{field}.steps.start", "must be >= 0")
    if end is not None and end <= steps.start:
        violations.add(f"{field}.steps.end", "must be greater than start")
    return P.StepRange(steps.start, end)


# --- Operation parameters ---------------------------------------------------------------------


def _operation(kind: str, msg, field: str, violations: Violations) -> P.Operation:
    """The operation's dataclass from its message: float parameters (unset: the dataclass
    default) within their PARAMETER_RANGES entry "<kind>.<name>", integer ones >= 0."""
    values = {}
    for parameter in dataclasses.fields(P.OPERATIONS[kind]):
        name = parameter.name
        if parameter.type == "int":
            values[name] = getattr(msg, name)
            if values[name] < 0:
                violations.add(f"{field}.{name}", f"must be >= 0 (got {values[name]})")
        else:
            values[name] = ranged_value(msg, name, parameter.default, f"{kind}.{name}", field, violations)
    return P.OPERATIONS[kind](**values)


# --- Readouts ---------------------------------------------------------------------------------


def _compile_readouts(
    spec: readout_pb2.ReadoutSpec, ctx: SpecContext, violations: Violations
) -> tuple[P.ReadoutSettings, ...]:
    asked = [readout for readout in READOUTS.values() if readout.asked(spec)]
    missing = [readout.name for readout in asked if readout.name not in ctx.supported_readouts]
    if missing:
        raise Unsupported(_unsupported(f"readouts.{missing[0]}", ctx))
    return tuple(readout.compile(spec, ctx, violations) for readout in asked)


def _unsupported(what: str, ctx: SpecContext) -> str:
    reason = f" ({ctx.unsupported_reason})" if ctx.unsupported_reason else ""
    return f"{what} is not supported by this model's engine{reason}; GetModel lists what is"
