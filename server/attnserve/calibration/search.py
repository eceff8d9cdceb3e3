"""Search strategies: which head set to place the method on, judged on the calibration split.

Each round hands every head set it wants scored to `evaluate` at once (one batched pass). The
unmodified model (the empty set) is scored in the first round; a head set is chosen only when it
beats it.
- sweep: every unit alone; then the unions of the best 2..budget units that each beat the
  baseline. Per-layer sweep with layer units, per-head sweep with head units.
- greedy: forward selection; each round adds the unit that improves the current set most, until
  budget units or no unit improves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .method import HeadSet, Unit
from .objective import SplitMetrics

#: evaluate(round description, head sets) -> their calibration metrics, in order.
Evaluate = Callable[[str, Sequence[HeadSet]], list[SplitMetrics]]

STRATEGIES = ("layer-sweep", "head-sweep", "greedy")

EMPTY: HeadSet = frozenset()


@dataclass(frozen=True)
class Candidate:
    head_set: HeadSet
    metrics: SplitMetrics


@dataclass(frozen=True)
class SearchResult:
    baseline: SplitMetrics
    #: The best head set found, or the empty set when none beat the baseline.
    chosen: Candidate
    #: Every head set scored, in order.
    trace: tuple[Candidate, ...]


def layer_units(layers: Sequence[int]) -> list[Unit]:
    return [(layer, None) for layer in layers]


def head_units(layers: Sequence[int], num_heads: int) -> list[Unit]:
    return [(layer, head) for layer in layers for head in range(num_heads)]


def _score(evaluate: Evaluate, description: str, head_sets: Sequence[HeadSet]) -> list[Candidate]:
    return [Candidate(h, m) for h, m in zip(head_sets, evaluate(description, head_sets))]


def _best(candidates: Sequence[Candidate]) -> Candidate:
    """Highest objective; the earliest (smaller sets come first) among equals."""
    return max(candidates, key=lambda c: c.metrics.objective)


def sweep(units: Sequence[Unit], budget: int, evaluate: Evaluate) -> SearchResult:
    _check(units, budget)
    first = _score(evaluate, f"sweep: {len(units)} units alone", [EMPTY, *(frozenset({u}) for u in units)])
    baseline = first[0]
    improving = sorted(
        (c for c in first[1:] if c.metrics.objective > baseline.metrics.objective),
        key=lambda c: c.metrics.objective,
        reverse=True,
    )
    unions = [
        frozenset().union(*(c.head_set for c in improving[:k]))
        for k in range(2, min(budget, len(improving)) + 1)
    ]
    trace = first + (
        _score(evaluate, f"sweep: unions of the best 2..{len(unions) + 1}", unions) if unions else []
    )
    return SearchResult(baseline.metrics, _best(trace), tuple(trace))


def greedy(units: Sequence[Unit], budget: int, evaluate: Evaluate) -> SearchResult:
    _check(units, budget)
    first = _score(evaluate, f"greedy round 1: {len(units)} units", [EMPTY, *(frozenset({u}) for u in units)])
    baseline, trace = first[0], list(first)
    current, scored = baseline, first[1:]
    for round_number in range(1, budget + 1):
        if round_number > 1:
            remaining = [u for u in units if u not in current.head_set]
            if not remaining:
                break
            description = (
                f"greedy round {round_number}: {len(remaining)} units added to {len(current.head_set)}"
            )
            scored = _score(evaluate, description, [current.head_set | {u} for u in remaining])
            trace.extend(scored)
        best = _best(scored)
        if best.metrics.objective <= current.metrics.objective:
            break
        current = best
    return SearchResult(baseline.metrics, current, tuple(trace))


def _check(units: Sequence[Unit], budget: int) -> None:
    if not units:
        raise ValueError("no units to search over")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
