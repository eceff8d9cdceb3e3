"""A calibration run: search on the calibration split, measure on both, say what changed.

Method variants (e.g. sink calibration with and without the min_queries guard) are each searched;
the variant whose chosen head set scores best on the calibration split wins, and the validation
split, never seen by the search, gives the reported effect.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..attention.plan import EMPTY_PLAN
from ..spec.geometry import ModelGeometry
from .method import HeadSet, Method, PlanCompiler, describe_head_set
from .objective import Scorer, SplitMetrics, TokenizedExample
from .report import Change, margin_change, metrics_provenance
from .search import STRATEGIES, SearchResult, greedy, head_units, layer_units, sweep

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

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"search {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.greedy_unit not in ("layer", "head"):
            raise ValueError(f"greedy unit {self.greedy_unit!r} is not layer or head")

    @property
    def unit(self) -> str:
        return {"layer-sweep": "layer", "head-sweep": "head"}.get(self.strategy, self.greedy_unit)

    def describe(self) -> str:
        layers = ",".join(map(str, self.layers))
        return f"{self.strategy}, unit {self.unit}, budget {self.budget}, layers {layers}"


@dataclass(frozen=True)
class VariantResult:
    method: Method
    search: SearchResult


@dataclass(frozen=True)
class CalibrationResult:
    #: Every method variant searched, in the order given.
    variants: tuple[VariantResult, ...]
    #: The winning variant.
    chosen: VariantResult
    validation_before: SplitMetrics
    validation_after: SplitMetrics
    change: Change

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
    shortest_prompt = min(len(e.prompt_ids) for e in (*calibration, *validation))
    units = (
        layer_units(settings.layers)
        if settings.unit == "layer"
        else head_units(settings.layers, geometry.num_heads)
    )
    strategy = greedy if settings.strategy == "greedy" else sweep

    variants = []
    for method in methods:
        compiler = PlanCompiler(method, geometry, shortest_prompt)
        label = _method_label(method) if len(methods) > 1 else ""

        def evaluate(description: str, head_sets: Sequence[HeadSet], compiler=compiler, label=label):
            description = f"{label}{description}"
            return scorer.evaluate(compiler.plans(head_sets), calibration, _round(on_progress, description))

        variants.append(VariantResult(method, strategy(units, settings.budget, evaluate)))
    chosen = max(variants, key=lambda v: v.search.chosen.metrics.objective)

    plan = PlanCompiler(chosen.method, geometry, shortest_prompt).plan(chosen.search.chosen.head_set)
    before, after = scorer.evaluate(
        [EMPTY_PLAN, plan], validation, _round(on_progress, "validation: unmodified and chosen")
    )
    change = margin_change(before, after, resamples=bootstrap_resamples, seed=seed)
    return CalibrationResult(tuple(variants), chosen, before, after, change)


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
    return (
        f"{method.operation} {json.dumps(dict(method.parameters))} on "
        f"{describe_head_set(result.head_set)}: held-out margin {result.validation_before.mean_margin:+.4f} -> "
        f"{result.validation_after.mean_margin:+.4f} (change {change.mean:+.4f}, 95% CI "
        f"[{change.low:+.4f}, {change.high:+.4f}]), accuracy {result.validation_before.accuracy:.3f} -> "
        f"{result.validation_after.accuracy:.3f}, {change.turned_wrong} turned wrong, "
        f"{change.turned_right} turned right; {change.verdict}."
    )


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
    out["objective"] = "mean margin of the correct answer's summed log-probability over the best wrong one"
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
    return out
