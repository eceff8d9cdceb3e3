"""Collecting a request's readouts from its attention calls, shared by the engines.

A StepReadouts gathers what one step (one forward) produced for one request, call by call, into
each asked readout's state (attnserve/readouts/); a RequestReadoutTotals adds steps up into what
the request's last token carries. The vLLM engine
builds StepReadouts in its worker process and ships them to the server, so both pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..attention.plan import RequestPlan
from ..attention.readout import RowReadout
from ..readouts import READOUTS, CallSite


@dataclass
class StepReadouts:
    """One request's readouts from the attention calls of one step: readout name -> its state."""

    states: dict[str, Any] = field(default_factory=dict)

    def add(self, plan: RequestPlan, call: CallSite, readout: RowReadout) -> None:
        """Add one attention call's RowReadout to each readout the request asked for."""
        for settings in plan.readouts:
            kind = READOUTS[settings.name]
            state = self.states.get(settings.name)
            if state is None:
                state = self.states[settings.name] = kind.new_state()
            kind.record(state, settings, call, readout)

    def merge(self, other: StepReadouts) -> None:
        """Add another part of the same step (e.g. an earlier chunk of a chunked prefill), or a step."""
        for name, state in other.states.items():
            if name in self.states:
                READOUTS[name].merge(self.states[name], state)
            else:
                self.states[name] = state


class RequestReadoutTotals:
    """A request's readouts summed over its steps."""

    def __init__(self) -> None:
        self._totals = StepReadouts()

    def add_step(self, step: StepReadouts) -> dict[str, Any]:
        """Add a finished step; returns the states of its per-token readouts (they go out with
        the step's token)."""
        per_token = {name: state for name, state in step.states.items() if READOUTS[name].per_token}
        rest = {name: state for name, state in step.states.items() if name not in per_token}
        self._totals.merge(StepReadouts(rest))
        return per_token

    def finish(self) -> dict[str, Any]:
        """Readout name -> its result, for the readouts that are not per token."""
        return {name: READOUTS[name].finish(state) for name, state in self._totals.states.items()}


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
