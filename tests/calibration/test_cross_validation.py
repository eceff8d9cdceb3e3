"""k-fold cross-validation of the search, against a brute-force recomputation on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
from attnserve.calibration.calibrate import SearchSettings, cross_validate, fold_agreement
from attnserve.calibration.data import DataError, fold_indices
from attnserve.calibration.method import Method, PlanCompiler
from attnserve.calibration.objective import TransformersScorer

LAYERS = (1, 3)
METHOD = Method("sink_calibration", {"tau": 0.1, "beta": 0.4, "min_queries": 0})


def test_folds_partition_the_examples(tiny_examples):
    folds = fold_indices(tiny_examples, 3, seed=4)
    assert sorted(i for fold in folds for i in fold) == list(range(10))
    assert sorted(len(fold) for fold in folds) == [3, 3, 4]
    assert folds == fold_indices(tiny_examples, 3, seed=4) != fold_indices(tiny_examples, 3, seed=5)
    with pytest.raises(DataError, match="2 <= folds <= examples"):
        fold_indices(tiny_examples[:3], 4, seed=0)


def brute_force(model, geometry, examples, folds):
    """Each fold: every layer alone and the unmodified model scored one example at a time on the
    other folds, the best (first among equals) measured on the held-out fold."""
    scorer = TransformersScorer(model, pad_id=0, batch_size=1)
    compiler = PlanCompiler(METHOD, geometry, shortest_prompt=min(len(e.prompt_ids) for e in examples))

    def margins(head_set, subset):
        plan = compiler.plan(head_set)
        return [scorer.evaluate([plan], [example])[0].margins[0] for example in subset]

    candidates = [frozenset()] + [frozenset({(layer, None)}) for layer in LAYERS]
    before, after, chosen = {}, {}, []
    for held in folds:
        train = [e for i, e in enumerate(examples) if i not in held]

        def objective(head_set, train=train):
            values = margins(head_set, train)
            return (sum(values) / len(values), sum(v > 0 for v in values) / len(values))

        best = max(candidates, key=objective)
        chosen.append(best)
        held_examples = [examples[i] for i in held]
        before.update(zip(held, margins(frozenset(), held_examples)))
        after.update(zip(held, margins(best, held_examples)))
    return chosen, before, after


def sweep_cross_validated(model, geometry, examples, folds):
    """cross_validate of a one-layer sweep over LAYERS, as brute_force recomputes it."""
    return cross_validate(
        TransformersScorer(model, pad_id=0, batch_size=16),
        geometry,
        [METHOD],
        examples,
        folds,
        SearchSettings(strategy="layer-sweep", layers=LAYERS, budget=1),
        bootstrap_resamples=200,
        seed=0,
    )


def test_cross_validation_equals_brute_force(tiny_model, tiny_geometry, tiny_examples):
    examples = tiny_examples[:6]
    folds = fold_indices(examples, 2, seed=1)
    result = sweep_cross_validated(tiny_model, tiny_geometry, examples, folds)
    chosen, by_example_before, by_example_after = brute_force(tiny_model, tiny_geometry, examples, folds)
    before = [by_example_before[i] for i in range(len(examples))]
    after = [by_example_after[i] for i in range(len(examples))]
    assert list(result.fold_head_sets) == chosen
    assert result.validation_before.margins == pytest.approx(before, abs=1e-5)
    assert result.validation_after.margins == pytest.approx(after, abs=1e-5)
    assert result.change.mean == pytest.approx(sum(after) / len(after) - sum(before) / len(before), abs=1e-5)
    # The final set is the search's choice on all the data.
    [final], _, _ = brute_force(tiny_model, tiny_geometry, examples, [()])
    assert result.head_set == final
    same = sum(head_set == final for head_set in chosen)
    assert fold_agreement(result).startswith(f"{same}/2 folds chose the same set")


def test_each_task_has_its_held_out_change(tiny_model, tiny_geometry, tiny_examples):
    """Two tasks: folds hold both; each task's held-out margins are its examples' pooled ones,
    its change bootstrapped from them alone."""
    examples = [dataclasses.replace(e, task="ab"[i % 2]) for i, e in enumerate(tiny_examples[:8])]
    folds = fold_indices(examples, 2, seed=1)
    result = sweep_cross_validated(tiny_model, tiny_geometry, examples, folds)
    _, before, after = brute_force(tiny_model, tiny_geometry, examples, folds)
    assert [task.name for task in result.tasks] == ["a", "b"]
    for task in result.tasks:
        rows = [i for i, e in enumerate(examples) if e.task == task.name]
        assert task.before.margins == pytest.approx([before[i] for i in rows], abs=1e-5)
        assert task.after.margins == pytest.approx([after[i] for i in rows], abs=1e-5)
        deltas = [after[i] - before[i] for i in rows]
        assert task.change.mean == pytest.approx(sum(deltas) / len(deltas), abs=1e-5)
    assert result.passes_gate == (
        result.change.passes_gate and all(t.change.passes_gate for t in result.tasks)
    )
