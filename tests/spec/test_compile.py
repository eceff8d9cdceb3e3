"""compile_plan: defaults, selector expansion, identity dropping, and every violation's field path.
Also the per-call views of the compiled plan (RequestPlan.for_call and the readouts' needs)."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
from attnserve.attention import plan as P
from attnserve.readouts.attention_rows import AttentionRowsSettings
from attnserve.readouts.layer_statistics import LayerStatisticsSettings
from attnserve.readouts.summary import SummarySettings
from attnserve.spec.compile import SpecContext, SpecLimits, compile_plan
from attnserve.spec.errors import InvalidRequest, Unsupported
from attnserve.spec.geometry import AttentionKind, AttentionLayer, Component, ModelGeometry
from attnserve.spec.selectors import MAX_LAYER_NAME_PATTERN_LENGTH, MAX_LAYER_NAME_PATTERNS
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import readout_pb2 as rpb

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS = 30, 9, 3
PROMPT_TOKENS = 12
MAX_TOKENS = 16
ALL_OPERATIONS = frozenset(P.OPERATIONS)

EMPHASIS_PRESET = [
    ipb.Intervention(selector=ipb.Selector(layers=[3]), key_emphasis=ipb.KeyEmphasis(alpha=0.5)),
    ipb.Intervention(selector=ipb.Selector(layers=[4]), head_output_scale=ipb.HeadOutputScale(scale=2.0)),
]


def make_context(**overrides) -> SpecContext:
    context = SpecContext(
        geometry=ModelGeometry.causal_lm(
            num_layers=NUM_LAYERS, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=64
        ),
        limits=SpecLimits(max_interventions=6, max_readout_values=100_000),
        presets={"emphasis": EMPHASIS_PRESET},
        prompt_tokens=PROMPT_TOKENS,
        max_tokens=MAX_TOKENS,
        supported_operations=ALL_OPERATIONS,
    )
    return dataclasses.replace(context, **overrides)


def compile_interventions(*interventions: ipb.Intervention, presets=(), context=None) -> P.RequestPlan:
    spec = ipb.InterventionSpec(presets=list(presets), interventions=list(interventions))
    return compile_plan(spec, rpb.ReadoutSpec(), context or make_context())


def compile_readouts(readouts: rpb.ReadoutSpec, context=None) -> P.RequestPlan:
    return compile_plan(ipb.InterventionSpec(), readouts, context or make_context())


def attention_rows_of(readouts: rpb.ReadoutSpec, context=None) -> AttentionRowsSettings:
    (settings,) = compile_readouts(readouts, context).readouts
    return settings


def violation_fields(interventions=(), readouts=None, presets=(), context=None) -> list[str]:
    spec = ipb.InterventionSpec(presets=list(presets), interventions=list(interventions))
    with pytest.raises(InvalidRequest) as caught:
        compile_plan(spec, readouts or rpb.ReadoutSpec(), context or make_context())
    return [v.field for v in caught.value.violations]


def single_op(plan: P.RequestPlan) -> P.ScopedOp:
    """The one ScopedOp of a plan placed on exactly one layer."""
    ((_layer, entries),) = plan.layer_ops.items()
    ((_, scoped),) = entries
    return scoped


def on_layer(layer: int, **operation) -> ipb.Intervention:
    return ipb.Intervention(selector=ipb.Selector(layers=[layer]), **operation)


# --- Defaults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        ({"sink_calibration": ipb.SinkCalibration()}, P.SinkCalibration(tau=0.1, beta=0.4, min_queries=0)),
        ({"key_emphasis": ipb.KeyEmphasis()}, P.KeyEmphasis(alpha=0.01)),
        ({"logit_rescale": ipb.LogitRescale()}, P.LogitRescale(alpha=0.7)),
        ({"head_output_scale": ipb.HeadOutputScale()}, P.HeadOutputScale(scale=0.0)),
        ({"identity_blend": ipb.IdentityBlend()}, P.IdentityBlend(weight=1.0)),
        ({"key_mask": ipb.KeyMask()}, P.KeyMask()),
    ],
)
def test_unset_parameters_take_their_defaults(operation, expected):
    plan = compile_interventions(on_layer(5, **operation))
    assert single_op(plan).op == expected


def test_temperature_default_is_identity_and_dropped():
    plan = compile_interventions(on_layer(5, temperature=ipb.Temperature()))
    assert plan.layer_ops == {}
    assert plan.applied_operations == ()


def test_explicit_parameters_override_defaults():
    plan = compile_interventions(
        on_layer(2, sink_calibration=ipb.SinkCalibration(tau=0.25, beta=0.0, min_queries=3))
    )
    op = single_op(plan).op
    assert op.tau == pytest.approx(0.25)
    assert op.beta == 0.0  # explicit zero is not mistaken for "unset"
    assert op.min_queries == 3


def test_explicit_zero_scale_differs_from_unset_weight():
    plan = compile_interventions(on_layer(1, identity_blend=ipb.IdentityBlend(weight=0.5)))
    assert single_op(plan).op == P.IdentityBlend(weight=0.5)


# --- Placement --------------------------------------------------------------------------------


def test_empty_layers_selects_every_layer_and_every_head():
    plan = compile_interventions(ipb.Intervention(key_mask=ipb.KeyMask()))
    assert sorted(plan.layer_ops) == list(range(NUM_LAYERS))
    for entries in plan.layer_ops.values():
        ((steps, scoped),) = entries
        assert scoped.heads is None
        assert steps == P.ALL_STEPS


def test_layers_and_heads_are_deduplicated_and_sorted():
    iv = ipb.Intervention(selector=ipb.Selector(layers=[7, 2, 7], heads=[8, 0, 8]), key_mask=ipb.KeyMask())
    plan = compile_interventions(iv)
    assert sorted(plan.layer_ops) == [2, 7]
    for entries in plan.layer_ops.values():
        ((_, scoped),) = entries
        assert scoped.heads == (0, 8)
    assert plan.applied_operations == ("key_mask",)  # one intervention, however many layers


def test_layer_heads_give_each_layer_its_own_heads():
    selector = ipb.Selector(
        layer_heads=[
            ipb.LayerHeads(layer=4, heads=[2, 1]),
            ipb.LayerHeads(layer=29),
            ipb.LayerHeads(layer=0, heads=[8]),
        ]
    )
    plan = compile_interventions(ipb.Intervention(selector=selector, head_output_scale=ipb.HeadOutputScale()))
    heads_by_layer = {layer: entries[0][1].heads for layer, entries in plan.layer_ops.items()}
    assert heads_by_layer == {4: (1, 2), 29: None, 0: (8,)}


def test_ops_keep_application_order_per_layer():
    plan = compile_interventions(
        on_layer(3, key_mask=ipb.KeyMask()),
        ipb.Intervention(temperature=ipb.Temperature(temperature=2.0)),
        on_layer(3, logit_rescale=ipb.LogitRescale(alpha=0.2)),
    )
    ops_on_3 = [type(scoped.op) for _, scoped in plan.layer_ops[3]]
    assert ops_on_3 == [P.KeyMask, P.Temperature, P.LogitRescale]
    assert [type(scoped.op) for _, scoped in plan.layer_ops[4]] == [P.Temperature]
    assert plan.applied_operations == ("key_mask", "temperature", "logit_rescale")


def test_presets_expand_before_explicit_interventions():
    plan = compile_interventions(on_layer(3, key_mask=ipb.KeyMask()), presets=["emphasis"])
    assert plan.applied_operations == ("key_emphasis", "head_output_scale", "key_mask")
    assert [type(scoped.op) for _, scoped in plan.layer_ops[3]] == [P.KeyEmphasis, P.KeyMask]
    assert plan.layer_ops[3][0][1].op.alpha == pytest.approx(0.5)
    assert [type(scoped.op) for _, scoped in plan.layer_ops[4]] == [P.HeadOutputScale]


def test_a_preset_named_twice_applies_twice():
    plan = compile_interventions(presets=["emphasis", "emphasis"])
    assert plan.applied_operations == ("key_emphasis", "head_output_scale") * 2
    assert len(plan.layer_ops[3]) == 2


# --- Identity operations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "operation",
    [
        {"sink_calibration": ipb.SinkCalibration(beta=1.0)},
        {"key_emphasis": ipb.KeyEmphasis(alpha=1.0)},
        {"head_output_scale": ipb.HeadOutputScale(scale=1.0)},
        {"identity_blend": ipb.IdentityBlend(weight=0.0)},
        {"temperature": ipb.Temperature(temperature=1.0)},
        {"logit_rescale": ipb.LogitRescale(alpha=0.0)},
    ],
    ids=lambda op: next(iter(op)),
)
def test_identity_operations_are_dropped_and_not_counted(operation):
    plan = compile_interventions(on_layer(6, key_mask=ipb.KeyMask()), on_layer(6, **operation))
    assert plan.applied_operations == ("key_mask",)
    assert [type(scoped.op) for _, scoped in plan.layer_ops[6]] == [P.KeyMask]


def test_only_identity_operations_leave_an_empty_plan():
    plan = compile_interventions(ipb.Intervention(key_emphasis=ipb.KeyEmphasis(alpha=1.0)))
    assert not plan.edits_attention
    assert not plan.touches_attention
    assert plan.for_call(0, 0) is None


def test_identity_operation_is_still_validated():
    iv = ipb.Intervention(selector=ipb.Selector(layers=[NUM_LAYERS]), key_emphasis=ipb.KeyEmphasis(alpha=1.0))
    assert violation_fields([iv]) == ["interventions.interventions[0].selector.layers[0]"]


# --- Steps, query scope, keys -----------------------------------------------------------------


def test_step_range_with_and_without_end():
    bounded = ipb.Intervention(
        selector=ipb.Selector(layers=[1], steps=ipb.StepRange(start=2, end=5)), key_mask=ipb.KeyMask()
    )
    open_ended = ipb.Intervention(
        selector=ipb.Selector(layers=[2], steps=ipb.StepRange(start=3)), key_mask=ipb.KeyMask()
    )
    plan = compile_interventions(bounded, open_ended)
    assert plan.layer_ops[1][0][0] == P.StepRange(2, 5)
    assert plan.layer_ops[2][0][0] == P.StepRange(3, None)
    assert [step for step in range(8) if step in plan.layer_ops[1][0][0]] == [2, 3, 4]
    assert 1000 in plan.layer_ops[2][0][0] and 2 not in plan.layer_ops[2][0][0]


@pytest.mark.parametrize(
    ("scope", "last_only"),
    [(ipb.QUERY_SCOPE_UNSPECIFIED, False), (ipb.QUERY_SCOPE_ALL, False), (ipb.QUERY_SCOPE_LAST, True)],
)
def test_query_scope(scope, last_only):
    iv = ipb.Intervention(selector=ipb.Selector(layers=[0], queries=scope), logit_rescale=ipb.LogitRescale())
    assert single_op(compile_interventions(iv)).last_query_only is last_only


def test_key_ranges_are_carried_into_the_key_set():
    keys = ipb.KeySelector(
        ranges=[ipb.TokenRange(start=0, end=3), ipb.TokenRange(start=5, end=PROMPT_TOKENS)],
        invert=True,
        include_generated=True,
    )
    iv = ipb.Intervention(
        selector=ipb.Selector(layers=[0], keys=keys), key_emphasis=ipb.KeyEmphasis(alpha=3.0)
    )
    assert single_op(compile_interventions(iv)).keys == P.KeySet(
        ranges=((0, 3), (5, PROMPT_TOKENS)), invert=True, include_generated=True
    )


def _positions_in(words: dict[str, tuple[int, ...]]):
    """A prompt's word resolver: the positions listed for each word, () for the others."""
    return lambda word: words.get(word, ())


def test_key_words_join_the_ranges_as_runs_of_positions():
    context = make_context(word_positions=_positions_in({"a": (1, 4), "red cat": (5, 6)}))
    keys = ipb.KeySelector(ranges=[ipb.TokenRange(start=8, end=9)], words=["a", "red cat"], invert=True)
    iv = ipb.Intervention(
        selector=ipb.Selector(layers=[0], keys=keys), key_emphasis=ipb.KeyEmphasis(alpha=3.0)
    )
    assert single_op(compile_interventions(iv, context=context)).keys == P.KeySet(
        ranges=((8, 9), (1, 2), (4, 5), (5, 7)), invert=True
    )


def test_key_words_are_refused_where_the_engine_resolves_none():
    iv = ipb.Intervention(
        selector=ipb.Selector(layers=[0], keys=ipb.KeySelector(words=["cat"])),
        key_emphasis=ipb.KeyEmphasis(alpha=3.0),
    )
    assert violation_fields([iv]) == ["interventions.interventions[0].selector.keys.words"]


@pytest.mark.parametrize(
    ("words", "fields"),
    [
        (["a", "dog", "a" * 257], ["words[1]", "words[2]"]),
        (["a"] * 17, ["words"]),
        ([" "], ["words[0]"]),
    ],
)
def test_key_words_violations_name_the_word(words, fields):
    iv = ipb.Intervention(
        selector=ipb.Selector(layers=[0], keys=ipb.KeySelector(words=words)),
        key_emphasis=ipb.KeyEmphasis(alpha=3.0),
    )
    context = make_context(word_positions=_positions_in({"a": (1,), "a" * 257: (2,)}))
    prefix = "interventions.interventions[0].selector.keys."
    assert violation_fields([iv], context=context) == [prefix + field for field in fields]


def test_unset_keys_select_all_prompt_keys():
    assert single_op(compile_interventions(on_layer(0, key_mask=ipb.KeyMask()))).keys == P.ALL_PROMPT_KEYS


# --- Violations -------------------------------------------------------------------------------

IV0 = "interventions.interventions[0]"


@pytest.mark.parametrize(
    ("selector", "field"),
    [
        (ipb.Selector(layers=[0, NUM_LAYERS]), f"{IV0}.selector.layers[1]"),
        (ipb.Selector(layers=[-1]), f"{IV0}.selector.layers[0]"),
        (ipb.Selector(heads=[NUM_HEADS]), f"{IV0}.selector.heads[0]"),
        (ipb.Selector(layers=[2], heads=[1, -3]), f"{IV0}.selector.heads[1]"),
        (
            ipb.Selector(layer_heads=[ipb.LayerHeads(layer=1), ipb.LayerHeads(layer=NUM_LAYERS)]),
            f"{IV0}.selector.layer_heads[1].layer",
        ),
        (
            ipb.Selector(layer_heads=[ipb.LayerHeads(layer=1, heads=[0, NUM_HEADS])]),
            f"{IV0}.selector.layer_heads[0].heads[1]",
        ),
        (ipb.Selector(layers=[1], layer_heads=[ipb.LayerHeads(layer=1)]), f"{IV0}.selector.layer_heads"),
        (ipb.Selector(heads=[1], layer_heads=[ipb.LayerHeads(layer=1)]), f"{IV0}.selector.layer_heads"),
        (ipb.Selector(attention=7), f"{IV0}.selector.attention"),
        (ipb.Selector(attention=ipb.ATTENTION_KIND_CROSS), f"{IV0}.selector.attention"),
        (ipb.Selector(layer_names=["model.layers.1.*", "vision.*"]), f"{IV0}.selector.layer_names[1]"),
        (
            ipb.Selector(layer_names=["*" * (MAX_LAYER_NAME_PATTERN_LENGTH + 1)]),
            f"{IV0}.selector.layer_names[0]",
        ),
        (ipb.Selector(layer_names=["*"] * (MAX_LAYER_NAME_PATTERNS + 1)), f"{IV0}.selector.layer_names"),
        (
            ipb.Selector(layer_names=["*"], layer_heads=[ipb.LayerHeads(layer=1)]),
            f"{IV0}.selector.layer_heads",
        ),
        (
            ipb.Selector(keys=ipb.KeySelector(ranges=[ipb.TokenRange(start=4, end=PROMPT_TOKENS + 1)])),
            f"{IV0}.selector.keys.ranges[0]",
        ),
        (
            ipb.Selector(
                keys=ipb.KeySelector(ranges=[ipb.TokenRange(start=1, end=2), ipb.TokenRange(start=3, end=3)])
            ),
            f"{IV0}.selector.keys.ranges[1]",
        ),
        (
            ipb.Selector(keys=ipb.KeySelector(ranges=[ipb.TokenRange(start=-1, end=2)])),
            f"{IV0}.selector.keys.ranges[0]",
        ),
        (ipb.Selector(steps=ipb.StepRange(start=-1)), f"{IV0}.selector.steps.start"),
        (ipb.Selector(steps=ipb.StepRange(start=4, end=4)), f"{IV0}.selector.steps.end"),
        (ipb.Selector(steps=ipb.StepRange(start=4, end=2)), f"{IV0}.selector.steps.end"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_selector_violation_names_its_field(selector, field):
    assert violation_fields([ipb.Intervention(selector=selector, key_mask=ipb.KeyMask())]) == [field]


def test_violation_describes_the_range():
    iv = ipb.Intervention(selector=ipb.Selector(layers=[31]), key_mask=ipb.KeyMask())
    with pytest.raises(InvalidRequest) as caught:
        compile_interventions(iv)
    (violation,) = caught.value.violations
    assert "31" in violation.description and "0..29" in violation.description


NAN = math.nan


@pytest.mark.parametrize(
    ("operation", "field"),
    [
        ({"sink_calibration": ipb.SinkCalibration(tau=0.0)}, "sink_calibration.tau"),
        ({"sink_calibration": ipb.SinkCalibration(tau=1.0)}, "sink_calibration.tau"),
        ({"sink_calibration": ipb.SinkCalibration(tau=NAN)}, "sink_calibration.tau"),
        ({"sink_calibration": ipb.SinkCalibration(beta=-0.1)}, "sink_calibration.beta"),
        ({"sink_calibration": ipb.SinkCalibration(beta=1.5)}, "sink_calibration.beta"),
        ({"sink_calibration": ipb.SinkCalibration(min_queries=-2)}, "sink_calibration.min_queries"),
        ({"key_emphasis": ipb.KeyEmphasis(alpha=0.0)}, "key_emphasis.alpha"),
        ({"key_emphasis": ipb.KeyEmphasis(alpha=-1.0)}, "key_emphasis.alpha"),
        ({"key_emphasis": ipb.KeyEmphasis(alpha=math.inf)}, "key_emphasis.alpha"),
        ({"logit_rescale": ipb.LogitRescale(alpha=-1.0)}, "logit_rescale.alpha"),
        ({"logit_rescale": ipb.LogitRescale(alpha=NAN)}, "logit_rescale.alpha"),
        ({"head_output_scale": ipb.HeadOutputScale(scale=NAN)}, "head_output_scale.scale"),
        ({"head_output_scale": ipb.HeadOutputScale(scale=-math.inf)}, "head_output_scale.scale"),
        ({"identity_blend": ipb.IdentityBlend(weight=-0.01)}, "identity_blend.weight"),
        ({"identity_blend": ipb.IdentityBlend(weight=1.01)}, "identity_blend.weight"),
        ({"temperature": ipb.Temperature(temperature=0.0)}, "temperature.temperature"),
        ({"temperature": ipb.Temperature(temperature=-2.0)}, "temperature.temperature"),
        ({"temperature": ipb.Temperature(temperature=NAN)}, "temperature.temperature"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_parameter_violation_names_its_field(operation, field):
    assert violation_fields([on_layer(0, **operation)]) == [f"{IV0}.{field}"]


@pytest.mark.parametrize(
    "operation",
    [
        {"head_output_scale": ipb.HeadOutputScale(scale=-3.0)},
        {"logit_rescale": ipb.LogitRescale(alpha=-0.99)},
        {"key_emphasis": ipb.KeyEmphasis(alpha=50.0)},
        {"identity_blend": ipb.IdentityBlend(weight=1.0)},
        {"sink_calibration": ipb.SinkCalibration(beta=0.0, tau=0.99)},
    ],
    ids=lambda op: next(iter(op)),
)
def test_boundary_parameters_are_accepted(operation):
    (name,) = operation
    assert compile_interventions(on_layer(0, **operation)).applied_operations == (name,)


def test_unset_operation():
    iv = ipb.Intervention(selector=ipb.Selector(layers=[1]))
    assert violation_fields([on_layer(0, key_mask=ipb.KeyMask()), iv]) == [
        "interventions.interventions[1].operation"
    ]


def test_keys_on_sink_calibration():
    iv = ipb.Intervention(
        selector=ipb.Selector(keys=ipb.KeySelector()), sink_calibration=ipb.SinkCalibration()
    )
    assert violation_fields([iv]) == [f"{IV0}.selector.keys"]


def test_unknown_preset():
    assert violation_fields(presets=["emphasis", "no-such-preset"]) == ["interventions.presets[1]"]


def test_too_many_interventions_counts_expanded_presets():
    context = make_context(limits=SpecLimits(max_interventions=3, max_readout_values=100_000))
    # The preset brings 2, so 2 explicit ones make 4 > 3.
    explicit = [on_layer(0, key_mask=ipb.KeyMask())] * 2
    assert violation_fields(explicit, presets=["emphasis"], context=context) == ["interventions"]
    # Exactly at the limit is fine.
    plan = compile_interventions(explicit[0], presets=["emphasis"], context=context)
    assert len(plan.applied_operations) == 3


def test_preset_intervention_violations_name_the_preset():
    context = make_context(presets={"bad": [on_layer(NUM_LAYERS, key_mask=ipb.KeyMask())]})
    assert violation_fields(presets=["bad"], context=context) == [
        "interventions.presets[0].selector.layers[0]"
    ]


def test_several_violations_come_back_together():
    interventions = [
        ipb.Intervention(
            selector=ipb.Selector(layers=[40], heads=[9]), key_emphasis=ipb.KeyEmphasis(alpha=-1.0)
        ),
        ipb.Intervention(selector=ipb.Selector(layers=[1])),
        ipb.Intervention(
            selector=ipb.Selector(steps=ipb.StepRange(start=3, end=1)),
            temperature=ipb.Temperature(temperature=0.0),
        ),
    ]
    readouts = rpb.ReadoutSpec(
        mass_ranges=[ipb.TokenRange(start=0, end=PROMPT_TOKENS + 5)],
        attention_rows=rpb.AttentionRowsSpec(layers=[30], steps=[MAX_TOKENS]),
    )
    fields = violation_fields(interventions, readouts=readouts, presets=["missing"])
    assert sorted(fields) == sorted(
        [
            "interventions.presets[0]",
            f"{IV0}.key_emphasis.alpha",
            f"{IV0}.selector.layers[0]",
            f"{IV0}.selector.heads[0]",
            "interventions.interventions[1].operation",
            "interventions.interventions[2].temperature.temperature",
            "interventions.interventions[2].selector.steps.end",
            "readouts.mass_ranges[0]",
            "readouts.mass_ranges",
            "readouts.attention_rows.layers[0]",
            "readouts.attention_rows.steps[0]",
        ]
    )


def test_unsupported_operation_raises_unsupported():
    context = make_context(supported_operations=ALL_OPERATIONS - {"identity_blend"})
    iv = ipb.Intervention(identity_blend=ipb.IdentityBlend(weight=0.5))
    with pytest.raises(Unsupported, match="identity_blend"):
        compile_interventions(on_layer(0, key_mask=ipb.KeyMask()), iv, context=context)
    # The other operations still compile on that engine.
    assert compile_interventions(on_layer(0, key_mask=ipb.KeyMask()), context=context).applied_operations == (
        "key_mask",
    )


def test_unsupported_operation_inside_a_preset():
    context = make_context(supported_operations=frozenset({"key_mask"}))
    with pytest.raises(Unsupported):
        compile_interventions(presets=["emphasis"], context=context)


def test_engine_without_attention_support_refuses_with_its_reason():
    reason = "tensor or pipeline parallelism splits heads and layers over workers"
    context = make_context(
        supported_operations=frozenset(), supported_readouts=frozenset(), unsupported_reason=reason
    )
    with pytest.raises(
        Unsupported, match="interventions.interventions\\[0\\]: operation key_mask .*parallelism"
    ):
        compile_interventions(on_layer(0, key_mask=ipb.KeyMask()), context=context)
    for readouts in (
        rpb.ReadoutSpec(layer_statistics=True),
        rpb.ReadoutSpec(summary=True),
        rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layers=[0])),
    ):
        with pytest.raises(Unsupported, match=f"readouts.{readouts.ListFields()[0][0].name} .*parallelism"):
            compile_plan(ipb.InterventionSpec(), readouts, context)
    # Plain requests still compile.
    assert not compile_plan(ipb.InterventionSpec(), rpb.ReadoutSpec(), context).touches_attention


# --- Layers of different shapes and kinds -----------------------------------------------------

#: Layer 0 has 4 heads, layer 1 has 8, layer 2 is cross-attention with 2.
MIXED = ModelGeometry(
    (
        AttentionLayer(
            "model.layers.0.self_attn", 0, AttentionKind.SELF, True, Component.LANGUAGE_MODEL, 4, 4, 8
        ),
        AttentionLayer(
            "model.layers.1.self_attn", 1, AttentionKind.SELF, True, Component.LANGUAGE_MODEL, 8, 2, 8
        ),
        AttentionLayer(
            "model.layers.1.cross_attn", 2, AttentionKind.CROSS, False, Component.LANGUAGE_MODEL, 2, 2, 8
        ),
    )
)


def mixed(**selector) -> ipb.Intervention:
    return ipb.Intervention(selector=ipb.Selector(**selector), key_mask=ipb.KeyMask())


def mixed_layers(**selector) -> dict[int, tuple[int, ...] | None]:
    plan = compile_interventions(mixed(**selector), context=make_context(geometry=MIXED))
    return {layer: entries[0][1].heads for layer, entries in plan.layer_ops.items()}


def mixed_violations(*interventions, readouts=None) -> list[tuple[str, str]]:
    spec = ipb.InterventionSpec(interventions=list(interventions))
    with pytest.raises(InvalidRequest) as caught:
        compile_plan(spec, readouts or rpb.ReadoutSpec(), make_context(geometry=MIXED))
    return [(v.field, v.description) for v in caught.value.violations]


def test_causal_lm_layers_are_named_like_transformers_modules():
    config = SimpleNamespace(num_attention_heads=4, num_hidden_layers=2, hidden_size=32)
    geometry = ModelGeometry.of_config(config)
    assert [layer.name for layer in geometry.layers] == [
        "model.layers.0.self_attn",
        "model.layers.1.self_attn",
    ]
    assert (geometry.num_layers, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim) == (2, 4, 4, 8)


def test_layer_indices_must_be_positions():
    layer = MIXED.layers[1]
    with pytest.raises(ValueError, match="index 1 at position 0"):
        ModelGeometry((layer,))


def test_layer_names_select_by_glob_pattern():
    assert mixed_layers(layer_names=["model.layers.*.self_attn"]) == {0: None, 1: None}
    assert mixed_layers(layer_names=["model.layers.1.*"], heads=[1]) == {1: (1,), 2: (1,)}


def test_layer_names_and_indices_select_their_union():
    assert mixed_layers(layers=[2], layer_names=["model.layers.0.*", "*.0.self_attn"]) == {0: None, 2: None}


def test_a_pattern_matching_no_layer_is_quoted():
    ((field, description),) = mixed_violations(mixed(layer_names=["model.layers.9.*"]))
    assert field == f"{IV0}.selector.layer_names[0]"
    assert "'model.layers.9.*' matches no layer" in description


def test_a_long_pattern_is_quoted_short():
    ((field, description),) = mixed_violations(mixed(layer_names=["x" * 100_000]))
    assert field == f"{IV0}.selector.layer_names[0]" and len(description) < 200


def test_attention_kind_selects_every_layer_of_that_kind():
    assert mixed_layers(attention=ipb.ATTENTION_KIND_CROSS) == {2: None}
    assert mixed_layers(attention=ipb.ATTENTION_KIND_SELF) == {0: None, 1: None}
    assert mixed_layers() == {0: None, 1: None, 2: None}


def test_a_kind_the_model_has_no_layer_of():
    ((field, description),) = mixed_violations(mixed(attention=ipb.ATTENTION_KIND_JOINT))
    assert field == f"{IV0}.selector.attention"
    assert "no joint-attention layer" in description and "cross-attention, self-attention" in description


@pytest.mark.parametrize(
    "selector",
    [
        {"layers": [0, 2]},
        {"layer_names": ["model.layers.1.*"]},
        {"layer_heads": [ipb.LayerHeads(layer=2)]},
    ],
)
def test_selected_layers_must_be_of_the_kind_asked_for(selector):
    ((field, description),) = mixed_violations(mixed(attention=ipb.ATTENTION_KIND_SELF, **selector))
    assert field == f"{IV0}.selector.attention"
    assert "'model.layers.1.cross_attn', cross-attention" in description


def test_heads_are_checked_on_each_selected_layer():
    assert mixed_layers(layers=[1], heads=[7]) == {1: (7,)}
    ((field, description),) = mixed_violations(mixed(layers=[0, 1], heads=[1, 7]))
    assert field == f"{IV0}.selector.heads[1]"
    assert "layer 0 ('model.layers.0.self_attn'), which has 4 heads (0..3)" in description
    # Every layer by default: head 3 exists on layers 0 and 1 but not on the cross-attention layer.
    assert [f for f, _ in mixed_violations(mixed(heads=[3]))] == [f"{IV0}.selector.heads[0]"]


def test_layer_heads_are_checked_on_their_own_layer():
    assert mixed_layers(layer_heads=[ipb.LayerHeads(layer=1, heads=[7])]) == {1: (7,)}
    fields = [f for f, _ in mixed_violations(mixed(layer_heads=[ipb.LayerHeads(layer=0, heads=[7])]))]
    assert fields == [f"{IV0}.selector.layer_heads[0].heads[0]"]


def test_attention_rows_by_layer_name_with_heads_checked_per_layer():
    readouts = rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layer_names=["*.self_attn"], heads=[5]))
    fields = [f for f, _ in mixed_violations(readouts=readouts)]
    assert fields == ["readouts.attention_rows.heads[0]"]
    readouts = rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layers=[1], layer_names=["*.0.*"]))
    assert attention_rows_of(readouts, context=make_context(geometry=MIXED)).layers == {0, 1}
    readouts = rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layer_names=["vision.*"]))
    assert [f for f, _ in mixed_violations(readouts=readouts)] == ["readouts.attention_rows.layer_names[0]"]


def test_readout_size_counts_each_layers_own_heads():
    readouts = rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layers=[0, 1]))
    # (4 + 8 heads) x 1 step x (prompt + max_tokens) keys
    values = 12 * (PROMPT_TOKENS + MAX_TOKENS)
    at_limit = make_context(geometry=MIXED, limits=SpecLimits(max_interventions=1, max_readout_values=values))
    compile_readouts(readouts, context=at_limit)
    over = dataclasses.replace(
        at_limit, limits=SpecLimits(max_interventions=1, max_readout_values=values - 1)
    )
    with pytest.raises(InvalidRequest):
        compile_readouts(readouts, context=over)


# --- Readouts ---------------------------------------------------------------------------------


def test_readouts_compile():
    readouts = rpb.ReadoutSpec(
        layer_statistics=True,
        mass_ranges=[ipb.TokenRange(start=1, end=4)],
        attention_rows=rpb.AttentionRowsSpec(layers=[3, 1, 3], heads=[5, 2, 5], steps=[0, 4]),
        summary=True,
    )
    assert compile_readouts(readouts).readouts == (
        LayerStatisticsSettings(mass_ranges=((1, 4),)),
        AttentionRowsSettings(layers=frozenset({1, 3}), heads=(2, 5), steps=frozenset({0, 4})),
        SummarySettings(),
    )


def test_attention_rows_steps_default_to_the_prefill():
    rows = attention_rows_of(rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layers=[0])))
    assert rows.steps == frozenset({0})
    assert rows.heads == ()


def test_no_readouts_compile_to_nothing():
    plan = compile_readouts(rpb.ReadoutSpec())
    assert plan.readouts == ()
    assert not plan.touches_attention


def test_attention_rows_without_layers():
    readouts = rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(heads=[1]))
    assert violation_fields(readouts=readouts) == ["readouts.attention_rows.layers"]


def test_attention_rows_head_out_of_range():
    readouts = rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layers=[0], heads=[0, NUM_HEADS]))
    assert violation_fields(readouts=readouts) == ["readouts.attention_rows.heads[1]"]


def test_attention_rows_step_must_be_below_max_tokens():
    last = rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layers=[0], steps=[MAX_TOKENS - 1]))
    assert attention_rows_of(last).steps == frozenset({MAX_TOKENS - 1})
    beyond = rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layers=[0], steps=[0, MAX_TOKENS]))
    assert violation_fields(readouts=beyond) == ["readouts.attention_rows.steps[1]"]
    negative = rpb.ReadoutSpec(attention_rows=rpb.AttentionRowsSpec(layers=[0], steps=[-1]))
    assert violation_fields(readouts=negative) == ["readouts.attention_rows.steps[0]"]


def test_readout_size_limit():
    # 2 layers x 9 heads (all) x 3 steps x (12 + 16) keys = 1512 values.
    rows = rpb.AttentionRowsSpec(layers=[0, 1], steps=[0, 1, 2])
    at_limit = make_context(limits=SpecLimits(max_interventions=6, max_readout_values=1512))
    assert attention_rows_of(rpb.ReadoutSpec(attention_rows=rows), at_limit).layers == {0, 1}
    over = make_context(limits=SpecLimits(max_interventions=6, max_readout_values=1511))
    assert violation_fields(readouts=rpb.ReadoutSpec(attention_rows=rows), context=over) == [
        "readouts.attention_rows"
    ]
    # Naming 3 heads cuts it to 504.
    few_heads = rpb.AttentionRowsSpec(layers=[0, 1], heads=[0, 1, 2], steps=[0, 1, 2])
    small = make_context(limits=SpecLimits(max_interventions=6, max_readout_values=504))
    assert attention_rows_of(rpb.ReadoutSpec(attention_rows=few_heads), small).heads == (0, 1, 2)


def test_mass_ranges_need_layer_statistics():
    readouts = rpb.ReadoutSpec(mass_ranges=[ipb.TokenRange(start=0, end=2)])
    assert violation_fields(readouts=readouts) == ["readouts.mass_ranges"]


def test_mass_range_past_the_prompt():
    readouts = rpb.ReadoutSpec(
        layer_statistics=True,
        mass_ranges=[
            ipb.TokenRange(start=0, end=PROMPT_TOKENS),
            ipb.TokenRange(start=2, end=PROMPT_TOKENS + 1),
        ],
    )
    assert violation_fields(readouts=readouts) == ["readouts.mass_ranges[1]"]


# --- Per-call plans ---------------------------------------------------------------------------


def test_request_plan_for_call_filters_ops_by_layer_and_step():
    early = ipb.Intervention(
        selector=ipb.Selector(layers=[2], steps=ipb.StepRange(start=0, end=2)), key_mask=ipb.KeyMask()
    )
    late = ipb.Intervention(
        selector=ipb.Selector(layers=[2, 5], steps=ipb.StepRange(start=1)),
        temperature=ipb.Temperature(temperature=3.0),
    )
    plan = compile_interventions(early, late)

    def op_types(layer, step):
        row = plan.for_call(layer, step)
        return None if row is None else [type(scoped.op) for scoped in row.ops]

    assert op_types(2, 0) == [P.KeyMask]
    assert op_types(2, 1) == [P.KeyMask, P.Temperature]
    assert op_types(2, 2) == [P.Temperature]
    assert op_types(5, 0) is None
    assert op_types(5, 9) == [P.Temperature]
    assert op_types(3, 1) is None
    assert plan.for_call(2, 0).needs == P.NO_NEEDS


ROWS = P.ReadoutNeeds(last_query_rows=True)


def test_attention_rows_need_rows_only_on_asked_layers_and_steps():
    rows = AttentionRowsSettings(layers=frozenset({1, 4}), heads=(0, 3), steps=frozenset({0, 2}))
    assert rows.needs(1, 0) == ROWS
    assert rows.needs(4, 2) == ROWS
    assert rows.needs(1, 1) == P.NO_NEEDS
    assert rows.needs(2, 0) == P.NO_NEEDS
    # () means every head, which is not "no rows".
    every_head = AttentionRowsSettings(layers=frozenset({1}), steps=frozenset({0}))
    assert every_head.needs(1, 0) == ROWS


def test_layer_statistics_need_statistics_and_mass_ranges_on_every_call():
    needs = LayerStatisticsSettings(mass_ranges=((0, 3),)).needs(7, 5)
    assert needs.statistics and needs.mass_ranges == ((0, 3),) and not needs.last_query_rows


def test_sampled_statistics_without_requested_statistics():
    rows_only = P.RequestPlan(readouts=(AttentionRowsSettings(layers=frozenset({0})),))
    needs = rows_only.for_call(0, 0, sample_statistics=True).needs
    assert needs == P.ReadoutNeeds(statistics=True, last_query_rows=True)
    assert rows_only.for_call(0, 3, sample_statistics=False) is None
    # A plan with no work still gets a RowPlan when the step is sampled.
    assert P.EMPTY_PLAN.for_call(0, 3, sample_statistics=True).needs == P.ReadoutNeeds(statistics=True)
    assert P.EMPTY_PLAN.for_call(0, 3) is None


def test_sampled_statistics_keep_the_requests_mass_ranges():
    plan = P.RequestPlan(readouts=(LayerStatisticsSettings(mass_ranges=((1, 2),)),))
    assert plan.for_call(0, 3, sample_statistics=True).needs.mass_ranges == ((1, 2),)


def test_summary_needs_rows_on_decode_steps_only():
    plan = P.RequestPlan(readouts=(SummarySettings(),))
    assert plan.for_call(3, 0) is None
    assert plan.for_call(3, 2).needs == ROWS


# --- Image tokens -----------------------------------------------------------------------------

IMAGE_SPANS = ((2, 6), (7, 11))


def image_keys(*images: int, tokens=ipb.VISUAL_TOKENS_UNSPECIFIED, **keys) -> ipb.Intervention:
    selector = ipb.Selector(
        layers=[1], keys=ipb.KeySelector(image_tokens=ipb.ImageTokens(images=images, tokens=tokens), **keys)
    )
    return ipb.Intervention(selector=selector, key_mask=ipb.KeyMask())


def test_image_tokens_become_the_images_prompt_ranges():
    context = make_context(image_spans=IMAGE_SPANS)
    assert single_op(compile_interventions(image_keys(), context=context)).keys == P.KeySet(
        ranges=IMAGE_SPANS
    )
    assert single_op(compile_interventions(image_keys(1), context=context)).keys == P.KeySet(
        ranges=((7, 11),)
    )
    # Joined with explicit ranges, then inverted as a whole.
    joined = image_keys(0, ranges=[ipb.TokenRange(start=0, end=1)], invert=True)
    assert single_op(compile_interventions(joined, context=context)).keys == P.KeySet(
        ranges=((0, 1), (2, 6)), invert=True
    )


def test_paint_tokens_are_left_for_the_engine_to_choose():
    context = make_context(image_spans=IMAGE_SPANS)
    keys = single_op(
        compile_interventions(image_keys(tokens=ipb.VISUAL_TOKENS_PAINT_SUMMARY), context=context)
    ).keys
    assert keys == P.KeySet(visual=P.VisualKeys(images=(0, 1), part="paint_summary"))


def test_paint_tokens_are_refused_where_the_engine_cannot_choose_them():
    """vLLM builds its tower up to the feature layer; one that stops before PAINT's
    penultimate layer cannot choose the tokens (engines/vllm/engine.py)."""
    context = make_context(image_spans=IMAGE_SPANS, chooses_visual_tokens=False)
    with pytest.raises(Unsupported, match=r"image_tokens\.tokens: PAINT's tokens"):
        compile_interventions(image_keys(tokens=ipb.VISUAL_TOKENS_PAINT_LOCAL), context=context)
    all_tokens = single_op(compile_interventions(image_keys(), context=context)).keys
    assert all_tokens == P.KeySet(ranges=IMAGE_SPANS)  # every image token needs no choice


def test_image_token_violations_name_the_field():
    field = "interventions.interventions[0].selector.keys.image_tokens"
    assert violation_fields([image_keys()]) == [field]  # the request has no images
    context = make_context(image_spans=IMAGE_SPANS)
    assert violation_fields([image_keys(0, 2, -1)], context=context) == [
        f"{field}.images[1]",
        f"{field}.images[2]",
    ]
    assert violation_fields([image_keys(tokens=9)], context=context) == [f"{field}.tokens"]
