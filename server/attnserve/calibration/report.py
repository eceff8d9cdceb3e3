"""The held-out change with a paired bootstrap confidence interval, and the preset file."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .objective import SplitMetrics


@dataclass(frozen=True)
class Change:
    """Mean per-example change of the margin (after - before) with a 95% bootstrap interval."""

    mean: float
    low: float
    high: float
    resamples: int
    #: Examples right before and wrong after, and the reverse.
    turned_wrong: int
    turned_right: int

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high

    @property
    def passes_gate(self) -> bool:
        """The held-out evidence supports the preset: the margin change's 95% interval lies above
        0 and no more held-out items turned wrong than turned right."""
        return self.low > 0.0 and self.turned_wrong <= self.turned_right

    @property
    def gate(self) -> str:
        """Whether the change passes the gate, and why not when it does not."""
        if self.passes_gate:
            return (
                "passed: the 95% interval of the held-out margin change lies above 0 and no more "
                "items turned wrong than right"
            )
        reasons = []
        if self.low <= 0.0:
            reasons.append(f"the 95% interval of the held-out margin change reaches {self.low:+.4f}")
        if self.turned_wrong > self.turned_right:
            reasons.append(
                f"{self.turned_wrong} held-out items turned wrong and only {self.turned_right} right"
            )
        return "not passed: " + "; ".join(reasons)

    @property
    def verdict(self) -> str:
        if self.within_noise:
            return "within noise: the 95% interval of the held-out margin change contains 0"
        direction = "improves" if self.mean > 0 else "worsens"
        return f"{direction} the held-out margin: the 95% interval excludes 0"


def margin_change(before: SplitMetrics, after: SplitMetrics, *, resamples: int, seed: int) -> Change:
    """Paired bootstrap over examples of the mean margin change (percentile interval)."""
    deltas = [a - b for a, b in zip(after.margins, before.margins, strict=True)]
    n = len(deltas)
    rng = random.Random(seed)
    means = sorted(sum(deltas[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return Change(
        mean=sum(deltas) / n,
        low=means[round(0.025 * (resamples - 1))],
        high=means[round(0.975 * (resamples - 1))],
        resamples=resamples,
        turned_wrong=sum(b > 0 >= a for a, b in zip(after.margins, before.margins)),
        turned_right=sum(a > 0 >= b for a, b in zip(after.margins, before.margins)),
    )


def metrics_provenance(prefix: str, before: SplitMetrics, after: SplitMetrics) -> dict[str, str]:
    """Full-precision figures (repr), so a client can compare its own within 1e-4."""
    return {
        f"{prefix}.examples": str(len(before.margins)),
        f"{prefix}.accuracy_before": repr(before.accuracy),
        f"{prefix}.accuracy_after": repr(after.accuracy),
        f"{prefix}.margin_before": repr(before.mean_margin),
        f"{prefix}.margin_after": repr(after.mean_margin),
    }


def write_preset(
    path: Path, description: str, interventions: Sequence[Mapping[str, Any]], provenance: Mapping[str, str]
) -> None:
    """A preset file (models/config.py reads it): description, interventions, provenance."""
    content = {
        "description": description,
        "interventions": [dict(iv) for iv in interventions],
        "provenance": dict(provenance),
    }
    Path(path).write_text(yaml.safe_dump(content, sort_keys=False, width=100))
