"""The vLLM worker side: which batch row is which request, with what plan, and its readouts.

vLLM's attention backends see a flat token batch and its metadata, never request ids. The
runner hook (install_runner_hook) wraps the model runner's forward: before each forward it
builds a StepContext from the runner's persistent batch (batch row i is input_batch.req_ids[i],
the row order the attention metadata uses), the attention backends apply it layer by layer
(planned_rows.apply_row_plans), and after the forward the step's readouts go out on the side
channel. Under tensor parallelism every worker applies the plans to its own heads and the first
one publishes the readouts of all (tensor_parallel.py). A second hook wraps the runner's encoder
pass to record the vision tower's attention that PAINT's token choice reads (tower_captures.py);
a request's PAINT keys are resolved when its plan is first decoded, at its prefill.

Everything here runs in vLLM's worker process; a forward without planned requests and without
a statistics sample sets no context, so the backends run the engine's kernel alone.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from functools import cached_property

from ...attention.paint import needs_visual_keys
from ...attention.plan import EMPTY_PLAN, RequestPlan
from ...attention.readout import RowReadout
from ...attention.step_memo import StepMemo
from ...readouts import CallSite
from ..readouts import StatisticsSampler, StepReadouts
from .channel import ReadoutPublisher, StepMessage
from .paged_kv import KVSlots
from .tensor_parallel import HeadShard, RowCalls, gather_row_calls, head_shard
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
    #: The request's plan for this worker's heads (all of them without tensor parallelism).
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
    #: The step's attention calls that read something out, in call order.
    calls: list[tuple[CallSite, RowReadout]] = field(default_factory=list)

    @property
    def reads_out(self) -> bool:
        return self.reports or self.sampled

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
    #: id(attention metadata) -> (query_start_loc, seq_lens) as lists; one metadata per KV group.
    bounds: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)
    #: (id(attention metadata), batch rows) -> where those rows' keys sit in the paged cache.
    kv_slots: dict[tuple[int, tuple[int, ...]], KVSlots] = field(default_factory=dict)
    #: What the planned rows' attention calls share across the step's layers (attention/step_memo.py).
    step_memo: StepMemo = field(default_factory=StepMemo)

    @cached_property
    def layers_with_work(self) -> frozenset[int] | None:
        """The layers some row's plan has operations on; None (every layer) when a row reads
        out. The other layers' calls skip the rows at once."""
        if any(planned.reads_out for planned in self.rows):
            return None
        return frozenset(layer for planned in self.rows for layer in planned.plan.layer_ops)

    def message(self, calls: RowCalls) -> StepMessage:
        """The step's message from each row's calls (this worker's, or all workers' merged)."""
        message = StepMessage()
        for planned, row_calls in zip(self.rows, calls):
            readouts = StepReadouts()
            for call, readout in row_calls:
                if planned.sampled and readout.statistics is not None:
                    message.sampled_statistics.append((call.layer, readout.statistics))
                if planned.reports:
                    readouts.add(planned.plan, call, readout)
            if planned.reports and planned.seq_len >= 0:
                complete = planned.seq_len >= planned.num_prompt_tokens
                message.requests.append((planned.key, planned.step, complete, readouts))
        return message


_current: StepContext | None = None


class StepPlanner:
    """Builds each step's context from the runner's batch; owns the worker's side-channel end."""

    def __init__(self, settings: dict, shard: HeadShard | None):
        self._shard = shard
        self._sampler = StatisticsSampler(float(settings.get("statistics_sample_rate", 0.0)))
        self._publisher = (
            ReadoutPublisher(settings["readout_channel"]) if "readout_channel" in settings else None
        )
        #: vLLM request id -> (server key, plan for this worker's heads, answer start, whether
        #: the whole plan touches attention), decoded once per request.
        self._plans: dict[str, tuple[str, RequestPlan, int | None, bool]] = {}

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
            key, plan, answer_start, touches_attention = self._plan_of(runner, runner.requests[req_id])
            # Every worker plans the same rows (the collectives in publish, and the finite KV
            # writes of planned_rows.py, follow them), though a plan may act on none of its heads.
            if touches_attention or row == sampled_row:
                state = runner.requests[req_id]
                reports = bool(plan.readouts)
                rows.append(
                    PlannedRow(
                        row, key, plan, state.num_prompt_tokens, answer_start, row == sampled_row, reports
                    )
                )
        return StepContext(rows) if rows else None

    def publish(self, step: StepContext) -> None:
        if not any(planned.reads_out for planned in step.rows):
            return
        calls = [planned.calls for planned in step.rows]
        if self._shard is not None and any(calls):  # the same rows and calls on every worker
            calls = gather_row_calls(calls)
        if self._shard is not None and self._shard.rank > 0:
            return  # the first worker publishes every worker's readouts
        if self._publisher is not None:
            message = step.message(calls)
            if message.requests or message.sampled_statistics:
                self._publisher.send(message)

    def _plan_of(self, runner, state) -> tuple[str, RequestPlan, int | None, bool]:
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
            touches_attention = plan.touches_attention
            if self._shard is not None:
                plan = plan.for_head_shard(self._shard.first_head, self._shard.num_local_heads)
            key = extra.get(CHANNEL_KEY, state.req_id)
            cached = self._plans[state.req_id] = (key, plan, extra.get(ANSWER_START_KEY), touches_attention)
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
            planner = self._attnserve_planner = StepPlanner(settings, head_shard(self))
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
