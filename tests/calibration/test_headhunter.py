"""HeadHunter's greedy search (calibration/headhunter.py) against brute force on synthetic
objectives over head sets: exhaustive search where greedy is optimal (an additive objective), a
naive round-by-round recomputation where heads interact."""

from __future__ import annotations

import itertools
import random

import pytest
from attnserve.calibration.headhunter import describe_heads, headhunter, heads_by_layer

CANDIDATES = [(layer, head) for layer in (0, 2, 4) for head in range(4)]
WEIGHTS = {head: random.Random(5).uniform(-1, 1) for head in CANDIDATES}


def additive(head_set) -> float:
    return sum(WEIGHTS[h] for h in head_set)


def interacting(head_set) -> float:
    """Heads of one layer help less together: greedy then differs from the best singles."""
    same_layer_pairs = sum(1 for a, b in itertools.combinations(sorted(head_set), 2) if a[0] == b[0])
    return additive(head_set) - 0.4 * same_layer_pairs


def recording(objective):
    calls = []

    def score(description, head_sets):
        calls.append((description, list(head_sets)))
        return [objective(head_set) for head_set in head_sets]

    return score, calls


@pytest.mark.parametrize(("rounds", "per_round"), [(1, 3), (3, 1), (2, 2), (4, 3)])
def test_additive_objective_finds_the_best_subset_of_its_size(rounds, per_round):
    score, _ = recording(additive)
    result = headhunter(CANDIDATES, rounds, per_round, score)
    size = rounds * per_round
    best = max(itertools.combinations(CANDIDATES, size), key=additive)
    assert sorted(result.heads) == sorted(best)
    assert result.final == pytest.approx(additive(best), abs=1e-12)
    assert result.baseline == 0.0


@pytest.mark.parametrize(("rounds", "per_round"), [(3, 2), (5, 3), (2, 12)])
def test_interacting_objective_matches_naive_greedy(greedy_reference, rounds, per_round):
    score, calls = recording(interacting)
    result = headhunter(CANDIDATES, rounds, per_round, score)
    chosen, history = greedy_reference(interacting, CANDIDATES, rounds, per_round)
    assert list(result.heads) == chosen
    assert [list(r.added) for r in result.rounds] == history
    # Every round records every remaining head with its score, in candidate order.
    before: list = []
    for r in result.rounds:
        remaining = [h for h in CANDIDATES if h not in before]
        assert [h for h, _ in r.scores] == remaining
        assert [s for _, s in r.scores] == [interacting(set(before) | {h}) for h in remaining]
        before += r.added
    # Baseline, each round's sets, the final set: nothing else is scored.
    assert [len(sets) for _, sets in calls] == [1] + [len(r.scores) for r in result.rounds] + [1]
    assert calls[0][1] == [frozenset()] and calls[-1][1] == [frozenset(chosen)]


def test_ties_keep_candidate_order_and_rounds_stop_when_no_head_is_left():
    score, _ = recording(lambda head_set: 0.0)
    result = headhunter(CANDIDATES[:5], rounds=4, per_round=2, score=score)
    assert list(result.heads) == CANDIDATES[:5]
    assert [len(r.added) for r in result.rounds] == [2, 2, 1]


@pytest.mark.parametrize(
    ("candidates", "rounds", "per_round", "message"),
    [
        ([], 1, 1, "no candidate heads"),
        ([(0, 1), (0, 1)], 1, 1, "given twice"),
        ([(0, 1)], 0, 1, "must be >= 1"),
        ([(0, 1)], 1, 0, "must be >= 1"),
    ],
)
def test_bad_settings(candidates, rounds, per_round, message):
    with pytest.raises(ValueError, match=message):
        headhunter(candidates, rounds, per_round, lambda description, sets: [0.0] * len(sets))


def test_heads_are_described_by_layer():
    heads = [(6, 3), (2, 5), (6, 0)]
    assert heads_by_layer(heads) == {2: [5], 6: [0, 3]}
    assert describe_heads(heads) == "2:5 6:0,3"
    assert describe_heads([]) == "none"
