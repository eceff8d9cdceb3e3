"""Collecting a request's readouts from its attention calls, shared by the engines.

A StepReadouts gathers what one step (one forward) produced for one request, call by call; a
RequestReadoutTotals adds steps up into what the request's last token carries. The vLLM engine
builds StepReadouts in its worker process and ships them to the server, so both pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention.plan import ReadoutPlan
from ..attention.readout import LayerStatistics, RowReadout
from .base import AttentionRowOut, RequestReadouts


@dataclass
class StepReadouts:
    """One request's readouts from the attention calls of one step."""

    layer_statistics: dict[int, LayerStatistics] = field(default_factory=dict)
    attention_rows: list[AttentionRowOut] = field(default_factory=list)
    #: Sum over calls of the last query's prompt attention, and the number of calls.
    prompt_attention: torch.Tensor | None = None
    prompt_attention_calls: int = 0

    def add(self, plan: ReadoutPlan, layer: int, step: int, query_position: int, readout: RowReadout) -> None:
        """Add one attention call's readout (statistics kept only when the request asked)."""
        if readout.statistics is not None and plan.statistics:
            _add_statistics(self.layer_statistics, layer, readout.statistics)
        if readout.attention_rows is not None:
            for head, weights in zip(readout.row_heads, readout.attention_rows):
                self.attention_rows.append(
                    AttentionRowOut(layer, head, step, query_position, weights.tolist())
                )
        if readout.prompt_attention is not None:
            self._add_prompt_attention(readout.prompt_attention, 1)

    def merge(self, other: StepReadouts) -> None:
        """Add another part of the same step (e.g. an earlier chunk of a chunked prefill)."""
        for layer, stats in other.layer_statistics.items():
            _add_statistics(self.layer_statistics, layer, stats)
        self.attention_rows.extend(other.attention_rows)
        if other.prompt_attention is not None:
            self._add_prompt_attention(other.prompt_attention, other.prompt_attention_calls)

    def _add_prompt_attention(self, attention: torch.Tensor, calls: int) -> None:
        self.prompt_attention = (
            attention if self.prompt_attention is None else self.prompt_attention + attention
        )
        self.prompt_attention_calls += calls


class RequestReadoutTotals:
    """A request's readouts summed over its steps."""

    def __init__(self) -> None:
        self._totals = StepReadouts()

    def add_step(self, step: StepReadouts) -> list[AttentionRowOut]:
        """Add a finished step; returns its attention rows (they go out with the step's token)."""
        rows, step.attention_rows = step.attention_rows, []
        self._totals.merge(step)
        return rows

    def finish(self) -> RequestReadouts:
        totals = self._totals
        prompt_attention = None
        if totals.prompt_attention is not None:
            prompt_attention = totals.prompt_attention / totals.prompt_attention_calls
        return RequestReadouts(layer_statistics=totals.layer_statistics, prompt_attention=prompt_attention)


def _add_statistics(into: dict[int, LayerStatistics], layer: int, stats: LayerStatistics) -> None:
    total = into.get(layer)
    if total is None:
        into[layer] = LayerStatistics(**{**vars(stats), "range_mass": list(stats.range_mass)})
    else:
        total.add(stats)


class StatisticsSampler:
    """Which steps feed the attention-statistics metrics: every 1/rate-th step (so the share is
    exact and the cost predictable), from one row of the batch taken in turn (so the cost of a
    sample does not grow with the batch)."""

    def __init__(self, rate: float):
        self._rate = rate
        self._credit = 0.0
        self._sampled_steps = 0

    def sampled_row(self, num_rows: int) -> int:
        """The row of this step whose statistics are sampled, or -1 for none."""
        if self._rate <= 0 or num_rows == 0:
            return -1
        self._credit += self._rate
        if self._credit < 1.0:
            return -1
        self._credit -= 1.0
        self._sampled_steps += 1
        return self._sampled_steps % num_rows
