"""The search strategies on a synthetic objective, and a whole calibration on the tiny model."""

from __future__ import annotations

import pytest
from attnserve.calibration.calibrate import SearchSettings, calibrate
from attnserve.calibration.method import Method, PlanCompiler
from attnserve.calibration.objective import SplitMetrics, TransformersScorer
from attnserve.calibration.search import EMPTY, greedy, head_units, layer_units, sweep

#: Synthetic gain of each layer; layers 1 and 2 clash (together they lose 0.5).
GAINS = {0: -0.2, 1: 0.3, 2: 0.25, 3: 0.1, 4: 0.0}


def synthetic_margin(head_set) -> float:
    layers = {layer for layer, _ in head_set}
    clash = 0.5 if {1, 2} <= layers else 0.0
    return 1.0 + sum(GAINS[layer] for layer in layers) - clash


class Recorder:
    """An evaluate() that records its calls; metrics: two examples with the synthetic margin."""

    def __init__(self, margin=synthetic_margin):
        self.calls: list[list] = []
        self._margin = margin

    def __call__(self, description, head_sets):
        self.calls.append(list(head_sets))
        return [SplitMetrics((self._margin(h), self._margin(h))) for h in head_sets]


def layers_of(candidate) -> set[int]:
    return {layer for layer, _ in candidate.head_set}


def test_sweep_scores_units_then_unions_of_the_best():
    evaluate = Recorder()
    result = sweep(layer_units(range(5)), budget=3, evaluate=evaluate)
    # Round 1: the baseline and every layer alone, in one call; round 2: unions of the best 2 and 3.
    assert [len(c) for c in evaluate.calls] == [6, 2]
    assert evaluate.calls[0][0] == EMPTY
    assert [sorted(layer for layer, _ in h) for h in evaluate.calls[1]] == [[1, 2], [1, 2, 3]]
    assert result.baseline.mean_margin == pytest.approx(1.0)
    assert layers_of(result.chosen) == {1}  # the unions lose to layer 1 alone through the clash
    assert len(result.trace) == 8


def test_greedy_adds_the_best_unit_until_nothing_improves():
    evaluate = Recorder()
    result = greedy(layer_units(range(5)), budget=3, evaluate=evaluate)
    # {1}, then {1, 3} (adding 2 clashes), then nothing improves {1, 3}: stops.
    assert layers_of(result.chosen) == {1, 3}
    assert result.chosen.metrics.mean_margin == pytest.approx(1.4)
    assert [len(c) for c in evaluate.calls] == [6, 4, 3]


def test_greedy_respects_the_budget():
    evaluate = Recorder(lambda h: 1.0 + len(h))  # every unit helps
    result = greedy(head_units([0, 1], num_heads=3), budget=2, evaluate=evaluate)
    assert len(result.chosen.head_set) == 2 and len(evaluate.calls) == 2


@pytest.mark.parametrize("strategy", [sweep, greedy])
def test_nothing_beats_the_baseline(strategy):
    result = strategy(layer_units(range(3)), budget=2, evaluate=Recorder(lambda h: 1.0 - len(h)))
    assert result.chosen.head_set == EMPTY
    assert result.chosen.metrics == result.baseline


def test_bad_search_settings():
    with pytest.raises(ValueError, match="no units"):
        sweep([], budget=1, evaluate=Recorder())
    with pytest.raises(ValueError, match="budget"):
        greedy(layer_units([0]), budget=0, evaluate=Recorder())
    with pytest.raises(ValueError, match="search 'random'"):
        SearchSettings(strategy="random", layers=(0,), budget=1)


@pytest.mark.parametrize("strategy", ["layer-sweep", "head-sweep", "greedy"])
def test_calibrate_on_the_tiny_model(strategy, tiny_model, tiny_geometry, tiny_examples):
    """The chosen set beats every single unit it was compared with, and its recorded metrics are
    what a fresh evaluation of its plan gives."""
    scorer = TransformersScorer(tiny_model, pad_id=0, batch_size=16)
    # The authors' sink rule and the guard, compared as --min-queries 0 --min-queries 3 would.
    methods = [Method("sink_calibration", {"tau": 0.1, "beta": 0.4, "min_queries": m}) for m in (0, 3)]
    calibration, validation = tiny_examples[:6], tiny_examples[6:]
    progress = []
    result = calibrate(
        scorer,
        tiny_geometry,
        methods,
        calibration,
        validation,
        SearchSettings(strategy=strategy, layers=(1, 2, 3), budget=2),
        bootstrap_resamples=200,
        seed=0,
        on_progress=lambda description, done, total: progress.append((description, done, total)),
    )
    assert len(result.variants) == 2
    best = result.chosen.search.chosen
    for variant in result.variants:
        for candidate in variant.search.trace:
            assert candidate.metrics.objective <= best.metrics.objective
    assert result.found and best.metrics.mean_margin > result.calibration_before.mean_margin

    compiler = PlanCompiler(result.chosen.method, tiny_geometry, shortest_prompt=6)
    fresh_calibration, fresh_validation = (
        scorer.evaluate([compiler.plan(result.head_set)], split)[0] for split in (calibration, validation)
    )
    assert fresh_calibration.margins == pytest.approx(best.metrics.margins, abs=1e-5)
    assert fresh_validation.margins == pytest.approx(result.validation_after.margins, abs=1e-5)
    assert result.change.mean == pytest.approx(
        result.validation_after.mean_margin - result.validation_before.mean_margin
    )
    # Progress reached the end of every round.
    finals = {}
    for description, done, total in progress:
        finals[description] = (done, total)
    assert all(done == total for done, total in finals.values())
    assert any(d.startswith("[tau 0.1, beta 0.4, min_queries 3]") for d in finals)
