"""The readout registry (attnserve/readouts/): settings, recording, accumulation over chunks and
steps, and writing into the response, each readout on hand-made RowReadouts and on attend_rows."""

from __future__ import annotations

import pickle

import pytest
import torch
from attnserve.attention.core import attend_rows
from attnserve.attention.layout import RowLayout
from attnserve.attention.plan import RequestPlan
from attnserve.attention.readout import LayerStatistics, RowReadout
from attnserve.engines.readouts import RequestReadoutTotals, StepReadouts
from attnserve.readouts import READOUTS, CallSite, ResponseContext
from attnserve.readouts.attention_rows import AttentionRowsSettings
from attnserve.readouts.image_attention import ImageAttentionSettings
from attnserve.readouts.layer_statistics import LayerStatisticsSettings
from attnserve.readouts.scanpath import ScanpathSettings
from attnserve.readouts.summary import SummarySettings
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import readout_pb2

PROMPT = 5
PLAN = RequestPlan(
    readouts=(
        LayerStatisticsSettings(mass_ranges=((1, 3),)),
        AttentionRowsSettings(layers=frozenset({1}), heads=(0, 2), steps=frozenset({0, 1})),
        SummarySettings(),
    )
)


def statistics(queries: int, value: float, sinks: bool = True) -> LayerStatistics:
    sink = value if sinks else None
    return LayerStatistics(queries, value, value / 2, sink, sink, sink, [value])


def rows(num_keys: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(3, num_keys, generator=torch.Generator().manual_seed(seed)), dim=-1)


def call(layer: int, step: int, num_keys: int, seed: int) -> RowReadout:
    needs = PLAN.for_call(layer, step).needs
    return RowReadout(
        statistics=statistics(num_keys, float(seed)) if needs.statistics else None,
        last_query_rows=rows(num_keys, seed) if needs.last_query_rows else None,
        num_prompt_tokens=PROMPT,
    )


def test_every_readout_is_a_readout_spec_field_with_its_settings_name():
    fields = set(readout_pb2.ReadoutSpec.DESCRIPTOR.fields_by_name)
    assert set(READOUTS) <= fields
    names = [settings.name for settings in (*PLAN.readouts, ImageAttentionSettings(), ScanpathSettings())]
    assert names == list(READOUTS)


def test_a_generation_accumulates_per_readout():
    totals = RequestReadoutTotals()
    # Step 0, a prefill in two chunks (3 then 2 keys); step 1 a decode step.
    first, second = StepReadouts(), StepReadouts()
    for layer in (0, 1):
        first.add(PLAN, CallSite(layer, 0, 2), call(layer, 0, 3, seed=layer))
        second.add(PLAN, CallSite(layer, 0, 4), call(layer, 0, 5, seed=10 + layer))
    first.merge(pickle.loads(pickle.dumps(second)))  # the vLLM worker ships states pickled
    prefill_token = totals.add_step(first)
    assert list(prefill_token) == ["attention_rows"]
    assert [(r.layer, r.head, r.query_position) for r in prefill_token["attention_rows"]] == [
        (1, 0, 2),
        (1, 2, 2),
        (1, 0, 4),
        (1, 2, 4),
    ]
    assert prefill_token["attention_rows"][1].weights == pytest.approx(rows(3, 1)[2].tolist())

    decode = StepReadouts()
    for layer in (0, 1):
        decode.add(PLAN, CallSite(layer, 1, 5), call(layer, 1, 6, seed=20 + layer))
    decode_token = totals.add_step(decode)
    assert {r.step for r in decode_token["attention_rows"]} == {1}

    results = totals.finish()
    assert set(results) == {"layer_statistics", "summary"}
    layer_1 = results["layer_statistics"][1]
    assert layer_1.query_count == 3 + 5 + 6 and layer_1.entropy == 1 + 11 + 21
    # The summary: the mean over decode calls of the head-mean prompt attention.
    expected = torch.stack([rows(6, 20)[:, :PROMPT].mean(0), rows(6, 21)[:, :PROMPT].mean(0)]).mean(0)
    torch.testing.assert_close(results["summary"], expected)


def test_summary_reads_zero_for_prompt_keys_not_reached():
    state = READOUTS["summary"].new_state()
    readout = RowReadout(last_query_rows=rows(2, 0), num_prompt_tokens=PROMPT)
    READOUTS["summary"].record(state, SummarySettings(), CallSite(0, 1, 1), readout)
    result = READOUTS["summary"].finish(state)
    assert result[2:].tolist() == [0, 0, 0] and float(result.sum()) == pytest.approx(1.0)


def test_rows_asked_by_the_summary_alone_are_not_attention_rows():
    state = READOUTS["attention_rows"].new_state()
    settings = AttentionRowsSettings(layers=frozenset({1}), steps=frozenset({0}))
    readout = RowReadout(last_query_rows=rows(4, 0), num_prompt_tokens=PROMPT)
    READOUTS["attention_rows"].record(state, settings, CallSite(1, 3, 3), readout)  # a step not asked
    assert state == []
    READOUTS["attention_rows"].record(state, settings, CallSite(1, 0, 3), readout)
    assert [r.head for r in state] == [0, 1, 2]  # () is every head


def test_layer_statistics_are_written_as_means_and_leave_out_sinks_that_do_not_apply():
    complete = pb.GenerateComplete()
    result = {3: statistics(4, 2.0, sinks=False), 0: statistics(2, 1.0)}
    response = ResponseContext(prompt_token_ids=(1, 2), tokenizer=None)
    READOUTS["layer_statistics"].write_complete(complete, PLAN.readouts[0], result, response)
    first, second = complete.layer_statistics
    assert (first.layer, first.query_count, first.entropy, first.range_mass) == (0, 2, 0.5, [0.5])
    assert first.HasField("sink_mass") and first.sink_mass == 0.5
    assert second.layer == 3 and not second.HasField("sink_mass") and second.entropy == 0.5


def test_summary_without_a_decode_step_says_so():
    complete = pb.GenerateComplete()
    READOUTS["summary"].write_complete(complete, SummarySettings(), None, ResponseContext((1,), None))
    assert "No token was generated" in complete.summary.text and not complete.summary.spans


def test_readouts_from_attend_rows():
    """The needs the plan asks of attend_rows give what each readout records."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, n, 8, generator=gen) for n in (1, 6, 6))
    layout = RowLayout(key_start=0, num_prompt_tokens=PROMPT)
    plan = PLAN.for_call(1, 1)
    _, (readout,) = attend_rows(q, k, v, scale=8**-0.5, layouts=[layout], plans=[plan])
    expected = torch.softmax(torch.einsum("hd,hkd->hk", q[0, :, -1], k[0]) * 8**-0.5, dim=-1)
    step = StepReadouts()
    step.add(PLAN, CallSite(1, 1, 5), readout)
    written = step.states["attention_rows"]
    assert [r.head for r in written] == [0, 2]
    assert written[1].weights == pytest.approx(expected[2].tolist(), abs=1e-6)
    summary = step.states["summary"]
    torch.testing.assert_close(summary.total, expected[:, :PROMPT].mean(0), atol=1e-6, rtol=1e-6)
    assert step.states["layer_statistics"][1].query_count == 1
