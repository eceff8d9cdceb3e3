"""The scanpath readout: per step, the most attended image patch of the mean over the chosen
layers and heads, on hand-made RowReadouts (states pickled as the vLLM worker
ships them) against a reference written from the definition."""

from __future__ import annotations

import pickle

import pytest
import torch
from attnserve.attention.plan import RequestPlan
from attnserve.attention.readout import RowReadout
from attnserve.engines.readouts import RequestReadoutTotals, StepReadouts
from attnserve.readouts import READOUTS, CallSite, ResponseContext
from attnserve.readouts.scanpath import ScanpathSettings
from attnserve_client.v1 import inference_service_pb2 as pb

SPANS = ((1, 5), (6, 15))  # a 2x2 image and a 3x3 image
PROMPT = 16


def rows(num_keys: int, seed: int) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(3, num_keys, generator=torch.Generator().manual_seed(seed)), dim=-1)


def reference(calls, layers, heads, step):
    """argmax over (image, patch) of the mean over the asked (layer, head) rows of the step."""
    picked = [r[h] for layer, s, r in calls if s == step and layer in layers for h in heads]
    mean = torch.stack(picked).mean(0)
    best = max(
        ((i, p, float(mean[start + p])) for i, (start, end) in enumerate(SPANS) for p in range(end - start)),
        key=lambda x: x[2],
    )
    grid = 2 if best[0] == 0 else 3
    return best[0], best[1] // grid, best[1] % grid, best[2]


@pytest.mark.parametrize("seed", range(5))
def test_fixations_match_the_reference(seed):
    settings = ScanpathSettings(layers=frozenset({0, 2}), heads=(0, 2), image_spans=SPANS)
    plan = RequestPlan(readouts=(settings,))
    calls = [
        (layer, step, rows(PROMPT + step, 100 * seed + 10 * step + layer))
        for step in range(3)
        for layer in range(3)
    ]
    totals = RequestReadoutTotals()
    for step in range(3):
        state = StepReadouts()
        for layer, s, r in calls:
            if s == step:
                state.add(
                    plan,
                    CallSite(layer, step, PROMPT - 1 + step),
                    RowReadout(last_query_rows=r, num_prompt_tokens=PROMPT),
                )
        totals.add_step(pickle.loads(pickle.dumps(state)))
    complete = pb.GenerateComplete()
    READOUTS["scanpath"].write_complete(
        complete, settings, totals.finish()["scanpath"], ResponseContext((), None)
    )
    assert [p.step for p in complete.scanpath] == [0, 1, 2]
    for point in complete.scanpath:
        image, row, column, weight = reference(calls, {0, 2}, (0, 2), point.step)
        assert (point.image, point.row, point.column) == (image, row, column)
        assert point.weight == pytest.approx(weight, abs=1e-6)
