"""A calibration run: search, measure held out, say what changed.

Method variants (e.g. sink calibration with and without the min_queries guard) are each searched;
the variant whose chosen head set scores best on the searched examples wins. The held-out effect
comes from a validation split never seen by the search (calibrate), or from k-fold
cross-validation of the whole search (cross_validate).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..attention.plan import EMPTY_PLAN
from ..spec.geometry import ModelGeometry
from .data import tasks_of
from .method import HeadSet, Method, PlanCompiler, describe_head_set
from .objective import OBJECTIVES, Scorer, SplitMetrics, TokenizedExample
from .report import Change, margin_change, metrics_provenance
from .search import EMPTY, STRATEGIES, SearchResult, greedy, head_units, layer_units, sweep

#: on_progress(round description, answers scored, answers in the round)
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SearchSettings:
    #: One of search.STRATEGIES.
    strategy: str
    #: Layers whose heads may be chosen.
    layers: tuple[int, ...]
    #: Most units in the chosen set (sweep: the largest union tried).
    budget: int
    #: greedy only: "layer" (whole layers) or "head".
    greedy_unit: str = "layer"
    #: What the search maximises: a key of objective.OBJECTIVES.
    objective: str = "margin"
    #: Constraint: no searched example may turn from right to wrong.
    no_new_errors: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"search {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.greedy_unit not in ("layer", "head"):
            raise ValueError(f"greedy unit {self.greedy_unit!r} is not layer or head")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")

    @property
    def unit(self) -> str:
        return {"layer-sweep": "layer", "head-sweep": "head"}.get(self.strategy, self.greedy_unit)

    def describe(self) -> str:
        layers = ",".join(map(str, self.layers))
        constraint = ", no new errors" if self.no_new_errors else ""
        return (
            f"{self.strategy}, unit {self.unit}, budget {self.budget}, layers {layers}, "
            f"objective {self.objective}{constraint}"
        )


@dataclass(frozen=True)
class VariantResult:
    method: Method
    search: SearchResult


@dataclass(frozen=True)
class TaskResult:
    """One task's share of the held-out examples."""

    name: str
    before: SplitMetrics
    after: SplitMetrics
    change: Change


@dataclass(frozen=True)
class CalibrationResult:
    #: Every method variant searched (on the calibration split, or on all data with folds).
    variants: tuple[VariantResult, ...]
    #: The winning variant.
    chosen: VariantResult
    #: Held-out margins before and after: the validation split's, or with folds each example's
    #: from the fold that held it out (every example once, in data order).
    validation_before: SplitMetrics
    validation_after: SplitMetrics
    change: Change
    #: With k-fold cross-validation: the head set each fold's search chose, in fold order.
    fold_head_sets: tuple[HeadSet, ...] = ()
    #: With several tasks: each task's held-out metrics before and after, and its change.
    tasks: tuple[TaskResult, ...] = ()

    @property
    def passes_gate(self) -> bool:
        """The held-out gate (report.Change.passes_gate) passed on all examples and on every task."""
        return self.change.passes_gate and all(task.change.passes_gate for task in self.tasks)

    @property
    def gate(self) -> str:
        """Whether the result passes the gate, and where and why not when it does not."""
        if not self.tasks:
            return self.change.gate
        if self.passes_gate:
            return f"{self.change.gate}, on all examples and on every task"
        failed = [] if self.change.passes_gate else [("all examples", self.change)]
        failed += [(f"task {task.name}", task.change) for task in self.tasks if not task.change.passes_gate]
        return "not passed: " + "; ".join(
            f"{where}: {change.gate.removeprefix('not passed: ')}" for where, change in failed
        )

    @property
    def head_set(self) -> HeadSet:
        return self.chosen.search.chosen.head_set

    @property
    def calibration_before(self) -> SplitMetrics:
        return self.chosen.search.baseline

    @property
    def calibration_after(self) -> SplitMetrics:
        return self.chosen.search.chosen.metrics

    @property
    def found(self) -> bool:
        """Whether some head set beat the unmodified model on the calibration split."""
        return bool(self.head_set)


def calibrate(
    scorer: Scorer,
    geometry: ModelGeometry,
    methods: Sequence[Method],
    calibration: Sequence[TokenizedExample],
    validation: Sequence[TokenizedExample],
    settings: SearchSettings,
    *,
    bootstrap_resamples: int,
    seed: int,
    on_progress: ProgressCallback | None = None,
) -> CalibrationResult:
    """Search on the calibration split; the validation split, never seen by the search, gives
    the held-out effect."""
    shortest_prompt = min(len(e.prompt_ids) for e in (*calibration, *validation))
    search = _Search(scorer, geometry, methods, settings, shortest_prompt, on_progress)
    variants, chosen = search.run(calibration)
    before, after = search.held_out(chosen, validation, "validation: unmodified and chosen")
    change = margin_change(before, after, resamples=bootstrap_resamples, seed=seed)
    tasks = task_results(validation, before, after, resamples=bootstrap_resamples, seed=seed)
    return CalibrationResult(variants, chosen, before, after, change, tasks=tasks)


def cross_validate(
    scorer: Scorer,
    geometry: ModelGeometry,
    methods: Sequence[Method],
    examples: Sequence[TokenizedExample],
    folds: Sequence[Sequence[int]],
    settings: SearchSettings,
    *,
    bootstrap_resamples: int,
    seed: int,
    on_progress: ProgressCallback | None = None,
) -> CalibrationResult:
    """k-fold cross-validation of the whole search: for each fold the search runs on the other
    folds and the head set it chooses is measured on the held-out fold; the held-out margins are
    pooled (each example once). The final head set is chosen by a search on all the data, and its
    estimate is the pooled one: that of the procedure that chose it."""
    shortest_prompt = min(len(e.prompt_ids) for e in examples)
    search = _Search(scorer, geometry, methods, settings, shortest_prompt, on_progress)
    before: list[float] = [0.0] * len(examples)
    after: list[float] = [0.0] * len(examples)
    fold_head_sets = []
    for f, held in enumerate(folds):
        label = f"fold {f + 1}/{len(folds)}: "
        held_set = set(held)
        _, chosen = search.run([e for i, e in enumerate(examples) if i not in held_set], label)
        fold_head_sets.append(chosen.search.chosen.head_set)
        fold_before, fold_after = search.held_out(
            chosen, [examples[i] for i in held], f"{label}held out, unmodified and chosen"
        )
        for i, margin_before, margin_after in zip(held, fold_before.margins, fold_after.margins, strict=True):
            before[i], after[i] = margin_before, margin_after
    variants, chosen = search.run(examples, "all data: ")
    pooled_before, pooled_after = SplitMetrics(tuple(before)), SplitMetrics(tuple(after))
    change = margin_change(pooled_before, pooled_after, resamples=bootstrap_resamples, seed=seed)
    tasks = task_results(examples, pooled_before, pooled_after, resamples=bootstrap_resamples, seed=seed)
    return CalibrationResult(
        variants, chosen, pooled_before, pooled_after, change, tuple(fold_head_sets), tasks
    )


def task_results(
    examples: Sequence[TokenizedExample],
    before: SplitMetrics,
    after: SplitMetrics,
    *,
    resamples: int,
    seed: int,
) -> tuple[TaskResult, ...]:
    """Each task's held-out metrics and change, when the examples span several tasks."""
    names = tasks_of(examples)
    if len(names) < 2:
        return ()
    results = []
    for name in names:
        rows = [i for i, e in enumerate(examples) if e.task == name]
        task_before, task_after = before.subset(rows), after.subset(rows)
        change = margin_change(task_before, task_after, resamples=resamples, seed=seed)
        results.append(TaskResult(name, task_before, task_after, change))
    return tuple(results)


class _Search:
    """Runs the settings' search for every method variant on given examples, and measures a
    chosen variant on held-out examples."""

    def __init__(self, scorer, geometry, methods, settings, shortest_prompt, on_progress):
        self._scorer = scorer
        self._methods = methods
        self._on_progress = on_progress
        self._compilers = [PlanCompiler(method, geometry, shortest_prompt) for method in methods]
        self._units = (
            layer_units(settings.layers)
            if settings.unit == "layer"
            else head_units(settings.layers, geometry.num_heads)
        )
        self._strategy = greedy if settings.strategy == "greedy" else sweep
        self._settings = settings

    def run(
        self, examples: Sequence[TokenizedExample], label: str = ""
    ) -> tuple[tuple[VariantResult, ...], VariantResult]:
        """Every variant's search on the examples, and the variant whose choice scores best."""
        variants = []
        for method, compiler in zip(self._methods, self._compilers):
            prefix = label + (_method_label(method) if len(self._methods) > 1 else "")
            evaluate = _Judge(self._scorer, compiler, examples, self._settings, self._on_progress, prefix)
            variants.append(
                VariantResult(method, self._strategy(self._units, self._settings.budget, evaluate))
            )
        return tuple(variants), max(variants, key=lambda v: v.search.chosen.metrics.objective)

    def held_out(
        self, chosen: VariantResult, examples: Sequence[TokenizedExample], description: str
    ) -> tuple[SplitMetrics, SplitMetrics]:
        """The unmodified model's and the chosen head set's metrics on the examples."""
        compiler = self._compilers[self._methods.index(chosen.method)]
        plan = compiler.plan(chosen.search.chosen.head_set)
        before, after = self._scorer.evaluate(
            [EMPTY_PLAN, plan], examples, _round(self._on_progress, description)
        )
        return before, after


class _Judge:
    """The evaluate() of one variant's search: scores head sets on the examples and returns their
    metrics as the search compares them, by the settings' objective, inadmissible when they break
    the constraint (judged against the unmodified model, which the first round scores)."""

    def __init__(self, scorer, compiler, examples, settings, on_progress, prefix):
        self._scorer = scorer
        self._compiler = compiler
        self._examples = examples
        self._settings = settings
        self._on_progress = on_progress
        self._prefix = prefix
        self._baseline: SplitMetrics | None = None

    def __call__(self, description: str, head_sets: Sequence[HeadSet]) -> list[SplitMetrics]:
        progress = _round(self._on_progress, f"{self._prefix}{description}")
        scored = self._scorer.evaluate(self._compiler.plans(head_sets), self._examples, progress)
        if self._baseline is None:
            self._baseline = scored[head_sets.index(EMPTY)]
        return [self._judged(metrics) for metrics in scored]

    def _judged(self, metrics: SplitMetrics) -> SplitMetrics:
        admissible = not (self._settings.no_new_errors and metrics.turned_wrong(self._baseline))
        return dataclasses.replace(metrics, objective_name=self._settings.objective, admissible=admissible)


def fold_agreement(result: CalibrationResult) -> str:
    """How often the folds chose what the search on all data chose: the exact set, and each of
    its layers (or heads)."""
    folds = result.fold_head_sets
    same = sum(head_set == result.head_set for head_set in folds)
    units = sorted(result.head_set, key=lambda unit: (unit[0], -1 if unit[1] is None else unit[1]))
    per_unit = ", ".join(
        f"{describe_head_set(frozenset([unit]))} in {sum(unit in head_set for head_set in folds)}/{len(folds)}"
        for unit in units
    )
    return f"{same}/{len(folds)} folds chose the same set" + (f"; {per_unit}" if per_unit else "")


def _round(on_progress: ProgressCallback | None, description: str):
    if on_progress is None:
        return None
    return lambda done, total: on_progress(description, done, total)


def _method_label(method: Method) -> str:
    return f"[{', '.join(f'{k} {v}' for k, v in method.parameters.items())}] "


def summary(result: CalibrationResult) -> str:
    """One paragraph: what was chosen and the held-out effect, plainly."""
    change = result.change
    method = result.chosen.method
    text = (
        f"{method.operation} {json.dumps(dict(method.parameters))} on "
        f"{describe_head_set(result.head_set)}: held-out margin {result.validation_before.mean_margin:+.4f} -> "
        f"{result.validation_after.mean_margin:+.4f} (change {change.mean:+.4f}, 95% CI "
        f"[{change.low:+.4f}, {change.high:+.4f}]), accuracy {result.validation_before.accuracy:.3f} -> "
        f"{result.validation_after.accuracy:.3f}, {change.turned_wrong} turned wrong, "
        f"{change.turned_right} turned right; {change.verdict}; held-out gate {change.gate}."
    )
    if result.fold_head_sets:
        text += f" {len(result.fold_head_sets)}-fold cross-validation: {fold_agreement(result)}."
    for task in result.tasks:
        text += (
            f"\n  task {task.name}: held-out margin {task.before.mean_margin:+.4f} -> "
            f"{task.after.mean_margin:+.4f} (change {task.change.mean:+.4f}, 95% CI "
            f"[{task.change.low:+.4f}, {task.change.high:+.4f}]), accuracy {task.before.accuracy:.3f} -> "
            f"{task.after.accuracy:.3f}, {task.change.turned_wrong} turned wrong, "
            f"{task.change.turned_right} turned right; gate {task.change.gate}."
        )
    if result.tasks:
        text += f"\n  held-out gate over all tasks: {result.gate}."
    return text


def provenance(result: CalibrationResult, context: dict[str, str]) -> dict[str, str]:
    """The preset's provenance: context (model, data, split, seed, settings) and the measured
    effect on both splits."""
    change = result.change
    method = result.chosen.method
    out = dict(context)
    out["method"] = method.operation
    out["parameters"] = json.dumps(dict(method.parameters))
    if method.keys is not None:
        out["keys"] = json.dumps(dict(method.keys))
    out["heads"] = describe_head_set(result.head_set)
    out["objective"] = OBJECTIVES[result.calibration_after.objective_name]
    if len(result.variants) > 1:
        for i, variant in enumerate(result.variants):
            out[f"variants[{i}]"] = (
                f"{json.dumps(dict(variant.method.parameters))}: calibration margin "
                f"{variant.search.chosen.metrics.mean_margin!r} on {describe_head_set(variant.search.chosen.head_set)}"
            )
    out |= metrics_provenance("calibration", result.calibration_before, result.calibration_after)
    out |= metrics_provenance("validation", result.validation_before, result.validation_after)
    out["validation.margin_change"] = repr(change.mean)
    out["validation.margin_change_ci95"] = (
        f"[{change.low!r}, {change.high!r}] ({change.resamples} paired bootstrap resamples)"
    )
    out["validation.turned_wrong"] = str(change.turned_wrong)
    out["validation.turned_right"] = str(change.turned_right)
    out["validation.verdict"] = change.verdict
    out["validation.gate"] = result.gate if result.tasks else change.gate
    for task in result.tasks:
        prefix = f"tasks[{task.name}]"
        out |= metrics_provenance(f"{prefix}.validation", task.before, task.after)
        out[f"{prefix}.validation.margin_change"] = repr(task.change.mean)
        out[f"{prefix}.validation.margin_change_ci95"] = f"[{task.change.low!r}, {task.change.high!r}]"
        out[f"{prefix}.validation.turned_wrong"] = str(task.change.turned_wrong)
        out[f"{prefix}.validation.turned_right"] = str(task.change.turned_right)
        out[f"{prefix}.validation.gate"] = task.change.gate
    if result.fold_head_sets:
        out["folds.head_sets"] = "; ".join(describe_head_set(head_set) for head_set in result.fold_head_sets)
        out["folds.agreement"] = fold_agreement(result)
    return out
