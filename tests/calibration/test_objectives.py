"""Objectives and the no-new-errors constraint: what the search maximises, and what it may not
choose."""

from __future__ import annotations

import math

import pytest
from attnserve.calibration.calibrate import SearchSettings, calibrate
from attnserve.calibration.method import Method
from attnserve.calibration.objective import SplitMetrics, TransformersScorer

METRICS = SplitMetrics(margins=(1.0, -0.5, 2.0, -0.1), correct_logprobs=(-0.2, -3.0, -0.1, -1.5))


def test_objectives_rank_by_their_measure_then_a_tie_breaker():
    assert METRICS.objective == pytest.approx((0.6, 0.5))
    accuracy = SplitMetrics(METRICS.margins, METRICS.correct_logprobs, objective_name="accuracy")
    assert accuracy.objective == pytest.approx((0.5, 0.6))
    likelihood = SplitMetrics(METRICS.margins, METRICS.correct_logprobs, objective_name="log-likelihood")
    assert likelihood.objective == pytest.approx((-1.2, 0.5))
    inadmissible = SplitMetrics(METRICS.margins, admissible=False)
    assert inadmissible.objective == (-math.inf, -math.inf)


def test_turned_wrong_counts_right_to_wrong_only():
    baseline = SplitMetrics(margins=(0.5, -0.5, 0.2, 0.0))
    assert SplitMetrics(margins=(-0.1, 0.3, 0.0, -1.0)).turned_wrong(baseline) == 2


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="objective 'loss' is not one of margin, accuracy, log-likelihood"):
        SearchSettings(strategy="layer-sweep", layers=(0,), budget=1, objective="loss")


@pytest.mark.parametrize(
    ("objective", "measure"),
    [
        ("margin", lambda m: m.mean_margin),
        ("accuracy", lambda m: m.accuracy),
        ("log-likelihood", lambda m: sum(m.correct_logprobs) / len(m.correct_logprobs)),
    ],
)
@pytest.mark.parametrize("no_new_errors", [False, True])
def test_search_maximises_the_objective_within_the_constraint(
    objective, measure, no_new_errors, tiny_model, tiny_geometry, tiny_examples
):
    result = calibrate(
        TransformersScorer(tiny_model, pad_id=0, batch_size=16),
        tiny_geometry,
        [Method("sink_calibration", {"tau": 0.1, "beta": 0.4, "min_queries": 0})],
        tiny_examples[:6],
        tiny_examples[6:],
        SearchSettings(
            strategy="layer-sweep",
            layers=(1, 2, 3),
            budget=2,
            objective=objective,
            no_new_errors=no_new_errors,
        ),
        bootstrap_resamples=100,
        seed=0,
    )
    baseline = result.calibration_before
    chosen = result.calibration_after
    allowed = [
        c.metrics
        for c in result.chosen.search.trace
        if not no_new_errors or c.metrics.turned_wrong(baseline) == 0
    ]
    assert measure(chosen) == pytest.approx(max(measure(m) for m in allowed))
    if no_new_errors:
        assert chosen.turned_wrong(baseline) == 0
