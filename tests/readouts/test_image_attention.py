"""The image_attention readout: each image's patch columns of the chosen rows, as grids, per head
or averaged, on hand-made RowReadouts; compile checks."""

from __future__ import annotations

import pickle

import pytest
import torch
from attnserve.attention.plan import RequestPlan
from attnserve.attention.readout import RowReadout
from attnserve.engines.readouts import RequestReadoutTotals, StepReadouts
from attnserve.readouts import READOUTS, CallSite
from attnserve.readouts.image_attention import ImageAttentionSettings
from attnserve.spec.compile import SpecContext, SpecLimits, compile_plan
from attnserve.spec.errors import InvalidRequest
from attnserve.spec.geometry import ModelGeometry
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import readout_pb2 as rpb

# Two 2x2 images at prompt positions 1..4 and 6..9 of an 11-token prompt.
SPANS = ((1, 5), (6, 10))
PROMPT = 11


def rows(num_keys: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(3, num_keys, generator=torch.Generator().manual_seed(seed)), dim=-1)


def token_maps(settings: ImageAttentionSettings, calls) -> list:
    """Record (layer, step, rows) calls through the registry and write the step's token."""
    plan = RequestPlan(readouts=(settings,))
    totals = RequestReadoutTotals()
    tokens = []
    for step in sorted({s for _, s, _ in calls}):
        state = StepReadouts()
        for layer, s, r in calls:
            if s == step:
                readout = RowReadout(last_query_rows=r, num_prompt_tokens=PROMPT)
                state.add(plan, CallSite(layer, step, PROMPT - 1 + step), readout)
        state = pickle.loads(pickle.dumps(state))  # the vLLM worker ships states pickled
        token = pb.GeneratedToken(index=step)
        for name, value in totals.add_step(state).items():
            READOUTS[name].write_token(token, value)
        tokens.append(token)
    return tokens


def test_per_head_maps_are_the_image_columns():
    settings = ImageAttentionSettings(
        layers=frozenset({1, 2}), heads=(0, 2), per_head=True, image_spans=SPANS
    )
    r1, r2, r0 = rows(PROMPT, 1), rows(PROMPT, 2), rows(PROMPT, 0)
    (token,) = token_maps(settings, [(1, 0, r1), (2, 0, r2), (0, 0, r0)])  # layer 0 not asked
    got = {(m.image, m.layer, m.head): (m.grid_size, list(m.weights)) for m in token.image_attention}
    assert set(got) == {(i, layer, h) for i in (0, 1) for layer in (1, 2) for h in (0, 2)}
    for (image, layer, head), (grid, weights) in got.items():
        start, end = SPANS[image]
        assert grid == 2 and weights == pytest.approx({1: r1, 2: r2}[layer][head, start:end].tolist())


def test_per_layer_maps_are_each_layers_mean_over_heads():
    settings = ImageAttentionSettings(
        layers=frozenset({1, 2}), heads=(0, 2), per_layer=True, image_spans=SPANS
    )
    r1, r2 = rows(PROMPT, 1), rows(PROMPT, 2)
    (token,) = token_maps(settings, [(2, 0, r2), (1, 0, r1)])
    got = [(m.image, m.layer, m.HasField("head")) for m in token.image_attention]
    assert got == [(0, 1, False), (0, 2, False), (1, 1, False), (1, 2, False)]
    for m in token.image_attention:
        start, end = SPANS[m.image]
        expected = {1: r1, 2: r2}[m.layer][[0, 2], start:end].mean(0)
        assert list(m.weights) == pytest.approx(expected.tolist(), abs=1e-7)


def test_the_default_is_the_mean_over_layers_and_heads_per_step():
    settings = ImageAttentionSettings(layers=frozenset({1, 2}), steps=frozenset({1}), image_spans=SPANS)
    calls = [(layer, step, rows(PROMPT + step, 10 * step + layer)) for step in (0, 1) for layer in (1, 2)]
    prefill, decode = token_maps(settings, calls)
    assert list(prefill.image_attention) == []  # step 0 not asked
    assert [(m.image, m.step, m.HasField("layer"), m.HasField("head")) for m in decode.image_attention] == [
        (0, 1, False, False),
        (1, 1, False, False),
    ]
    for m in decode.image_attention:
        start, end = SPANS[m.image]
        expected = torch.stack([rows(PROMPT + 1, 11), rows(PROMPT + 1, 12)])[:, :, start:end].mean((0, 1))
        assert list(m.weights) == pytest.approx(expected.tolist(), abs=1e-7)


def context(image_spans=SPANS, max_readout_values=10_000) -> SpecContext:
    return SpecContext(
        geometry=ModelGeometry.causal_lm(4, 2, 1, 32),
        limits=SpecLimits(max_interventions=4, max_readout_values=max_readout_values),
        presets={},
        prompt_tokens=PROMPT,
        max_tokens=8,
        supported_operations=frozenset(),
        image_spans=image_spans,
    )


def violations(spec: rpb.ImageAttentionSpec, ctx: SpecContext) -> list[str]:
    with pytest.raises(InvalidRequest) as caught:
        compile_plan(ipb.InterventionSpec(), rpb.ReadoutSpec(image_attention=spec), ctx)
    return [v.field for v in caught.value.violations]


def test_compile():
    plan = compile_plan(
        ipb.InterventionSpec(),
        rpb.ReadoutSpec(image_attention=rpb.ImageAttentionSpec(layers=[3, 1])),
        context(),
    )
    assert plan.readouts == (ImageAttentionSettings(layers=frozenset({1, 3}), image_spans=SPANS),)
    field = "readouts.image_attention"
    assert violations(rpb.ImageAttentionSpec(layers=[1]), context(image_spans=())) == [field]
    assert violations(rpb.ImageAttentionSpec(), context()) == [f"{field}.layers"]
    assert violations(rpb.ImageAttentionSpec(layers=[1], heads=[2], steps=[8]), context()) == [
        f"{field}.heads[0]",
        f"{field}.steps[0]",
    ]
    # 8 values per step and head; 2 heads x 2 layers x 8 steps = 256 per head.
    assert violations(
        rpb.ImageAttentionSpec(layers=[0, 1], per_head=True), context(max_readout_values=255)
    ) == [field]
    # per_layer: 8 values per step and layer; 2 layers x 8 steps = 128.
    assert violations(
        rpb.ImageAttentionSpec(layers=[0, 1], per_layer=True), context(max_readout_values=127)
    ) == [field]
    assert violations(rpb.ImageAttentionSpec(layers=[1], per_head=True, per_layer=True), context()) == [
        f"{field}.per_layer"
    ]
