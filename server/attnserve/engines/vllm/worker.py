"""The vLLM worker side: which batch row is which request, with what plan, and its readouts.

vLLM's attention backends see a flat token batch and its metadata, never request ids. The
runner hook (install_runner_hook) wraps the model runner's forward: before each forward it
builds a StepContext from the runner's persistent batch (batch row i is input_batch.req_ids[i],
the row order the attention metadata uses), the attention backends apply it layer by layer
(planned_rows.apply_row_plans), and after the forward the step's readouts go out on the side
channel. A second hook wraps the runner's encoder pass to record the vision tower's attention
that PAINT's token choice reads (tower_captures.py); a request's PAINT keys are resolved when its
plan is first decoded, at its prefill.

Everything here runs in vLLM's worker process; a forward without planned requests and without
a statistics sample sets no context, so the backends run the engine's kernel alone.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field

from ...attention.paint import needs_visual_keys
from ...attention.plan import EMPTY_PLAN, RequestPlan
from ...attention.readout import LayerStatistics
from ..readouts import StatisticsSampler, StepReadouts
from .channel import ReadoutPublisher, StepMessage
from .tower_captures import TowerCaptures

log = logging.getLogger("attnserve.engines.vllm.worker")

#: SamplingParams.extra_args keys set by the engine adapter.
PLAN_KEY = "attnserve_plan"
CHANNEL_KEY = "attnserve_key"
#: Score rows (prompt + answer[:-1]): the prompt's length, where the answer's positions begin.
ANSWER_START_KEY = "attnserve_answer_start"
#: vllm_config.additional_config key of the engine-wide worker settings.
CONFIG_KEY = "attnserve"


@dataclass
class PlannedRow:
    """A batch row with work in this step's attention calls."""

    row: int
    #: The server's key for the request (not vLLM's internal request id).
    key: str
    plan: RequestPlan
    num_prompt_tokens: int
    #: Score rows: the prompt's length; the answer's positions after it count as generated
    #: tokens in the attention layout, as in engines/hf/scoring.py.
    answer_start: int | None
    #: This row's statistics feed the metrics in this step.
    sampled: bool
    #: Whether the server waits for this request's readouts step by step.
    reports: bool
    #: Set by the first attention call of the step.
    seq_len: int = -1
    readouts: StepReadouts = field(default_factory=StepReadouts)

    @property
    def step(self) -> int:
        """Step 0 is the prefill (every chunk of it); step n produces generated token n."""
        return max(0, self.seq_len - self.num_prompt_tokens)

    @property
    def layout_prompt_tokens(self) -> int:
        """The attention layout's prompt length: positions from it on are generated tokens."""
        return self.num_prompt_tokens if self.answer_start is None else self.answer_start


@dataclass
class StepContext:
    rows: list[PlannedRow]
    sampled_statistics: list[tuple[int, LayerStatistics]] = field(default_factory=list)
    #: id(attention metadata) -> (query_start_loc, seq_lens) as lists; one metadata per KV group.
    bounds: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)

    def message(self) -> StepMessage:
        finished_steps = []
        for planned in self.rows:
            if planned.reports and planned.seq_len >= 0:
                complete = planned.seq_len >= planned.num_prompt_tokens
                finished_steps.append((planned.key, planned.step, complete, planned.readouts))
        return StepMessage(requests=finished_steps, sampled_statistics=self.sampled_statistics)


_current: StepContext | None = None


class StepPlanner:
    """Builds each step's context from the runner's batch; owns the worker's side-channel end."""

    def __init__(self, settings: dict):
        self._sampler = StatisticsSampler(float(settings.get("statistics_sample_rate", 0.0)))
        self._publisher = (
            ReadoutPublisher(settings["readout_channel"]) if "readout_channel" in settings else None
        )
        #: vLLM request id -> (server key, plan, answer start), decoded once per request.
        self._plans: dict[str, tuple[str, RequestPlan, int | None]] = {}

    def context(self, runner) -> StepContext | None:
        batch = runner.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        if not req_ids:
            return None
        sampled_row = self._sampler.sampled_row(len(req_ids))
        if len(self._plans) > 2 * len(req_ids):
            self._plans = {r: self._plans[r] for r in req_ids if r in self._plans}
        rows = []
        for row, req_id in enumerate(req_ids):
            key, plan, answer_start = self._plan_of(runner, runner.requests[req_id])
            if plan.touches_attention or row == sampled_row:
                state = runner.requests[req_id]
                reports = bool(plan.readouts)
                rows.append(
                    PlannedRow(
                        row, key, plan, state.num_prompt_tokens, answer_start, row == sampled_row, reports
                    )
                )
        return StepContext(rows) if rows else None

    def publish(self, step: StepContext) -> None:
        if self._publisher is not None:
            message = step.message()
            if message.requests or message.sampled_statistics:
                self._publisher.send(message)

    def _plan_of(self, runner, state) -> tuple[str, RequestPlan, int | None]:
        cached = self._plans.get(state.req_id)
        if cached is None:
            extra = (state.sampling_params.extra_args if state.sampling_params is not None else None) or {}
            plan = pickle.loads(extra[PLAN_KEY]) if PLAN_KEY in extra else EMPTY_PLAN
            if needs_visual_keys(plan):  # first seen at its prefill: its images were just encoded
                captures = getattr(runner, "_attnserve_captures", None)
                if captures is None:
                    raise RuntimeError(
                        "PAINT's tokens need the vision tower's attention, which was not hooked"
                    )
                plan = captures.resolve(plan, state.mm_features)
            key = extra.get(CHANNEL_KEY, state.req_id)
            cached = self._plans[state.req_id] = (key, plan, extra.get(ANSWER_START_KEY))
        return cached


def install_runner_hook() -> None:
    """Wrap GPUModelRunner._model_forward (the CPU runner inherits it) so that every forward of
    a real batch runs inside its StepContext, and its encoder pass so that the vision tower's
    attention is recorded. Idempotent."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    forward = GPUModelRunner._model_forward
    if getattr(forward, "_attnserve", False):
        return
    encode = GPUModelRunner._execute_mm_encoder

    def execute_mm_encoder_with_captures(self, scheduler_output):
        if not hasattr(self, "_attnserve_captures"):
            self._attnserve_captures = TowerCaptures.of_model(self.get_model())
        if self._attnserve_captures is None:
            return encode(self, scheduler_output)
        return self._attnserve_captures.record(self, scheduler_output, lambda: encode(self, scheduler_output))

    def model_forward_with_plans(self, *args, **kwargs):
        global _current
        planner = getattr(self, "_attnserve_planner", None)
        if planner is None:
            settings = (self.vllm_config.additional_config or {}).get(CONFIG_KEY, {})
            planner = self._attnserve_planner = StepPlanner(settings)
        step = planner.context(self)
        if step is None:
            return forward(self, *args, **kwargs)
        _current = step
        try:
            return forward(self, *args, **kwargs)
        finally:
            _current = None
            planner.publish(step)

    model_forward_with_plans._attnserve = True
    GPUModelRunner._model_forward = model_forward_with_plans
    GPUModelRunner._execute_mm_encoder = execute_mm_encoder_with_captures


def current_step() -> StepContext | None:
    """The running forward's context; None when no row of the batch has attention work."""
    return _current
