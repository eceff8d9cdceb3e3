"""The engine's state of each request: a Generate request's row, a Score request's job."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..base import EngineRequest, ScoreRequest
from ..detokenizer import IncrementalDetokenizer
from ..readouts import RequestReadoutTotals, StepReadouts

#: A thread-safe push to the request's consumer (a TokenOutput, a result or an exception).
Emit = Callable[[object], None]


@dataclass
class RequestRow:
    """A Generate request in the engine: waiting, then one row of the running batch."""

    request: EngineRequest
    emit: Emit
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    #: Tokens of this row in the KV cache.
    length: int = 0
    last_token: int = -1
    num_generated: int = 0
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    queue_seconds: float | None = None
    #: Readouts of the step now running, then of the steps before it.
    step_readouts: StepReadouts = field(default_factory=StepReadouts)
    readout_totals: RequestReadoutTotals = field(default_factory=RequestReadoutTotals)

    @property
    def step(self) -> int:
        """The step now running for this row: it produces token num_generated."""
        return self.num_generated


@dataclass
class ScoreJob:
    """A Score request waiting for the scheduler thread."""

    request: ScoreRequest
    emit: Emit
