"""compile_layout: each binding becomes, on every cross-attention layer, key emphases of its span
on the box's query rows of that layer's grid (alpha) and on the others (1/alpha); every bad field
gets its violation."""

from __future__ import annotations

import pytest
from attnserve.attention.plan import ALL_STEPS, KeyEmphasis, KeySet, QueryRows, RequestPlan, ScopedOp
from attnserve.spec.errors import Violations
from attnserve.spec.layout import compile_layout, with_layout
from attnserve_client.v1 import image_generation_pb2 as gpb
from attnserve_client.v1 import intervention_pb2 as ipb

#: Two cross-attention layers at different resolutions.
GRIDS = {1: (4, 4), 5: (2, 2)}
PROMPT_TOKENS = 8
WORDS = {"cat": (5,), "a": (1, 4)}


def compile_bindings(*bindings, grids=GRIDS):
    violations = Violations()
    ops = compile_layout(bindings, grids, PROMPT_TOKENS, lambda word: WORDS.get(word, ()), violations)
    return ops, [v.field for v in violations.items]


def test_a_binding_emphasises_its_span_in_the_box_and_suppresses_it_outside_on_each_layer():
    box = {"x0": 0.5, "y0": 0.0, "x1": 1.0, "y1": 0.5}
    ops, fields = compile_bindings(gpb.LayoutBinding(**box, words=["a"], strength=4.0))
    assert fields == []
    keys = KeySet(ranges=((1, 2), (4, 5)))
    assert ops == {
        1: (
            ScopedOp(KeyEmphasis(4.0), keys=keys, query_rows=QueryRows(((2, 4), (6, 8)))),
            ScopedOp(KeyEmphasis(0.25), keys=keys, query_rows=QueryRows(((2, 4), (6, 8)), invert=True)),
        ),
        5: (
            ScopedOp(KeyEmphasis(4.0), keys=keys, query_rows=QueryRows(((1, 2),))),
            ScopedOp(KeyEmphasis(0.25), keys=keys, query_rows=QueryRows(((1, 2),), invert=True)),
        ),
    }


def test_span_from_words_and_ranges_and_the_default_strength():
    binding = gpb.LayoutBinding(x1=1.0, y1=1.0, words=["cat"], ranges=[ipb.TokenRange(start=2, end=4)])
    ops, fields = compile_bindings(binding)
    assert fields == []
    # The whole image: emphasis everywhere, nothing left to suppress.
    assert ops[5] == (
        ScopedOp(
            KeyEmphasis(5.0), keys=KeySet(ranges=((2, 4), (5, 6))), query_rows=QueryRows(((0, 2), (2, 4)))
        ),
    )


def test_bindings_compose_in_order_after_the_interventions():
    first = gpb.LayoutBinding(x1=0.5, y1=1.0, words=["cat"])
    second = gpb.LayoutBinding(x0=0.5, x1=1.0, y1=1.0, words=["a"])
    ops, _ = compile_bindings(first, second)
    assert [op.keys.ranges for op in ops[1]] == [((5, 6),)] * 2 + [((1, 2), (4, 5))] * 2
    existing = ScopedOp(KeyEmphasis(2.0))
    plan = with_layout(RequestPlan(layer_ops={1: ((ALL_STEPS, existing),)}), ops)
    assert [op for _, op in plan.layer_ops[1]] == [existing, *ops[1]]
    assert [op for _, op in plan.layer_ops[5]] == list(ops[5])
    assert with_layout(plan, {}) is plan


@pytest.mark.parametrize(
    ("binding", "fields"),
    [
        ({"x0": 0.5, "x1": 0.5, "y1": 1.0, "words": ["cat"]}, ["layout[0].x1"]),
        ({"x1": 1.5, "y0": -0.1, "y1": 1.0, "words": ["cat"]}, ["layout[0].y0", "layout[0].x1"]),
        ({"x1": float("nan"), "y1": 1.0, "words": ["cat"]}, ["layout[0].x1", "layout[0].x1"]),
        ({"x1": 1.0, "y1": 1.0}, ["layout[0].words"]),
        ({"x1": 1.0, "y1": 1.0, "words": ["cat", "dog"]}, ["layout[0].words[1]"]),
        ({"x1": 1.0, "y1": 1.0, "ranges": [ipb.TokenRange(start=3, end=9)]}, ["layout[0].ranges[0]"]),
        ({"x1": 1.0, "y1": 1.0, "words": ["cat"], "strength": 1.0}, ["layout[0].strength"]),
        ({"x1": 1.0, "y1": 1.0, "words": ["cat"], "strength": 2e6}, ["layout[0].strength"]),
    ],
)
def test_each_bad_field_gets_its_violation(binding, fields):
    assert compile_bindings(gpb.LayoutBinding(**binding))[1] == fields


def test_too_many_bindings_and_models_without_cross_attention():
    binding = gpb.LayoutBinding(x1=1.0, y1=1.0, words=["cat"])
    assert compile_bindings(*[binding] * 17)[1] == ["layout"]
    assert compile_bindings(binding, grids={})[1] == ["layout"]
    assert compile_bindings() == ({}, [])
