"""The transformers engine: continuous batching of causal-LM requests over one KV cache.

One scheduler thread owns the model. Each iteration it drops cancelled rows, runs the oldest
waiting Score request (its own forwards, no KV cache), then either prefills newly admitted requests
(left-padded, as one batch) and merges them into the running batch, or runs one decode step for
every running row. Every row carries its own attention plan; the attention hook (attention.py)
applies it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from ...attention.layout import RowLayout
from ...attention.plan import OPERATIONS, RowPlan
from ...attention.readout import LayerStatistics, RowReadout
from ...spec.geometry import ModelGeometry
from ..base import (
    CandidateScoring,
    Engine,
    EngineError,
    EngineInfo,
    EngineRequest,
    NonFiniteOutput,
    ScoreRequest,
    TextGeneration,
    TokenOutput,
)
from ..detokenizer import IncrementalDetokenizer
from ..prompts import pad_token_id
from ..readouts import RequestReadoutTotals, StatisticsSampler, StepReadouts
from . import attention
from .kv_batch import KVBatch
from .sampling import choose_token, make_generator
from .scoring import AnswerQuery, score_answers

log = logging.getLogger("attnserve.engines.hf")

READOUTS = frozenset({"layer_statistics", "attention_rows", "summary"})

#: (layer, statistics of one row in one call): feeds the attention-statistics metrics.
StatisticsSink = Callable[[int, LayerStatistics], None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(model_path: Path, *, dtype: str = "float32", device: str = "cpu"):
    """(tokenizer, model) of a local causal LM, in eval mode, with the "attnserve" attention."""
    attention.register()
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = (
        AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=_DTYPES[dtype],
            attn_implementation=attention.ATTN_IMPLEMENTATION,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
        )
        .eval()
        .to(device)
    )
    return tokenizer, model


def model_geometry(model) -> ModelGeometry:
    return ModelGeometry.of_config(model.config)


@dataclass
class _Row:
    """A request in the engine: waiting, then one row of the running batch."""

    request: EngineRequest
    emit: Callable[[object], None]  # thread-safe push to the request's consumer
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
class _ScoreJob:
    """A Score request waiting for the scheduler thread."""

    request: ScoreRequest
    emit: Callable[[object], None]


class TransformersEngine(Engine, TextGeneration, CandidateScoring):
    def __init__(
        self,
        model_path: Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 16,
        statistics_sample_rate: float = 0.0,
        on_statistics: StatisticsSink | None = None,
    ):
        self.tokenizer, self.model = load_causal_lm(model_path, dtype=dtype, device=device)
        self.device = torch.device(device)
        self.info = EngineInfo(
            geometry=model_geometry(self.model),
            max_context_length=self.model.config.max_position_embeddings,
            supported_operations=frozenset(OPERATIONS),
            supported_readouts=READOUTS,
        )
        self._eos_ids = self._find_eos_ids()
        self._max_batch_size = max_batch_size
        self._sampler = StatisticsSampler(statistics_sample_rate)
        self._on_statistics = on_statistics
        self._waiting: collections.deque[_Row] = collections.deque()
        self._running: list[_Row] = []
        self._scoring: collections.deque[_ScoreJob] = collections.deque()
        self._kv: KVBatch | None = None
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="attnserve-hf-engine", daemon=True)

    def _find_eos_ids(self) -> frozenset[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = self.model.generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured])
        return frozenset(i for i in ids if i is not None)

    # --- API side (event loop thread) ---------------------------------------------------------

    async def start(self) -> None:
        self._thread.start()

    async def shutdown(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        await asyncio.to_thread(self._thread.join)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Generate requests not yet prefilled, and Score requests not yet run."""
        return len(self._waiting) + len(self._scoring)

    async def score(self, request: ScoreRequest) -> list[float]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        with self._wakeup:
            self._scoring.append(_ScoreJob(request, _emitter(loop, queue)))
            self._wakeup.notify()
        result = await queue.get()
        if isinstance(result, BaseException):
            raise result
        return result

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        row = _Row(
            request=request,
            emit=_emitter(loop, queue),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.sampling.stop),
            generator=make_generator(request.sampling),
        )
        with self._wakeup:
            self._waiting.append(row)
            self._wakeup.notify()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Cancelled, deadline passed, or consumer gone: leave the batch at the next step.
            row.cancelled = True
            with self._wakeup:
                self._wakeup.notify()

    # --- Scheduler thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._waiting and not self._running and not self._scoring:
                    self._wakeup.wait()
                if self._stopping:
                    return
                self._drop_cancelled_waiting()
                free = self._max_batch_size - len(self._running)
                admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                # One Score request per iteration, so a stream of them cannot starve decoding.
                scoring = self._scoring.popleft() if self._scoring else None
            if scoring is not None:
                self._score(scoring)
            try:
                self._drop_rows([r for r in self._running if r.cancelled])
                if admitted:
                    self._prefill(admitted)
                elif self._running:
                    self._decode()
            except Exception as exc:  # one bad step must not kill the server
                log.exception("engine step failed; failing the requests in it")
                for row in admitted + self._running:
                    row.emit(EngineError(f"engine step failed: {exc}"))
                self._running, self._kv = [], None

    def _score(self, job: _ScoreJob) -> None:
        request = job.request
        queries = [
            AnswerQuery(request.prompt_token_ids, candidate, request.plan)
            for candidate in request.candidate_token_ids
        ]
        try:
            scores = score_answers(
                self.model, queries, pad_id=pad_token_id(self.tokenizer), batch_size=self._max_batch_size
            )
        except Exception as exc:  # a failed score fails its request only
            log.exception("scoring failed request_id=%s", request.request_id)
            job.emit(EngineError(f"scoring failed: {exc}"))
            return
        if not all(math.isfinite(score) for score in scores):
            job.emit(NonFiniteOutput("the candidates' log-probabilities"))
            return
        job.emit(scores)

    def _drop_cancelled_waiting(self) -> None:
        if any(r.cancelled for r in self._waiting):
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)

    def _drop_rows(self, rows: Sequence[_Row]) -> None:
        if not rows:
            return
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self._running) if id(r) not in gone]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._kv = None
        else:
            self._kv.keep_rows(keep)

    @torch.inference_mode()
    def _prefill(self, rows: list[_Row]) -> None:
        lengths = [len(r.request.prompt_token_ids) for r in rows]
        width = max(lengths)
        pad_id = pad_token_id(self.tokenizer)
        input_ids = torch.tensor(
            [[pad_id] * (width - n) + list(r.request.prompt_token_ids) for r, n in zip(rows, lengths)],
            device=self.device,
        )
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        now = time.monotonic()
        for row, n in zip(rows, lengths):
            row.length = n
            row.queue_seconds = now - row.submitted_at
        logits = self._forward(rows, input_ids, mask, positions, cache, width)
        new = KVBatch(cache, mask)
        if self._kv is None:
            self._kv = new
        else:
            self._kv.merge(new)
        self._running.extend(rows)
        self._finish_step(rows, logits)

    @torch.inference_mode()
    def _decode(self) -> None:
        rows = self._running
        input_ids = torch.tensor([[r.last_token] for r in rows], device=self.device)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        for row in rows:
            row.length += 1
        self._kv.extend_mask()
        logits = self._forward(rows, input_ids, self._kv.mask, positions, self._kv.cache, self._kv.length)
        self._finish_step(rows, logits)

    def _forward(self, rows, input_ids, mask, positions, cache, key_length) -> torch.Tensor:
        batch = self._batch_attention(rows, key_length)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            attnserve_batch=batch,
        )
        return out.logits[:, -1].float().cpu()  # sampling runs on the CPU with per-request generators

    def _batch_attention(self, rows: list[_Row], key_length: int) -> attention.BatchAttention | None:
        sampled_row = self._sampler.sampled_row(len(rows))
        if sampled_row < 0 and not any(r.request.plan.touches_attention for r in rows):
            return None  # nothing to do in attention: plain SDPA, no overhead

        def plan_for(row: int, layer: int) -> RowPlan | None:
            r = rows[row]
            return r.request.plan.for_call(layer, r.step, row == sampled_row)

        def on_readouts(layer: int, batch_rows: Sequence[int], readouts: Sequence[RowReadout | None]) -> None:
            for row, readout in zip(batch_rows, readouts):
                if readout is not None:
                    self._record(rows[row], layer, readout, row == sampled_row)

        layouts = [
            RowLayout(key_start=key_length - r.length, num_prompt_tokens=len(r.request.prompt_token_ids))
            for r in rows
        ]
        return attention.BatchAttention(layouts, plan_for, on_readouts)

    def _record(self, row: _Row, layer: int, readout: RowReadout, sampled: bool) -> None:
        if sampled and readout.statistics is not None and self._on_statistics is not None:
            self._on_statistics(layer, readout.statistics)
        row.step_readouts.add(row.request.plan.readout, layer, row.step, row.length - 1, readout)

    def _finish_step(self, rows: list[_Row], logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        finished = []
        for i, row in enumerate(rows):
            if row.cancelled:
                continue
            try:
                if not finite[i]:
                    raise NonFiniteOutput(f"the logits of step {row.step}")
                out = self._next_token(row, logits[i], logprobs[i])
            except Exception as exc:  # this row's failure is its own: the batch goes on
                if not isinstance(exc, NonFiniteOutput):
                    log.exception("choosing a token failed request_id=%s", row.request.request_id)
                row.emit(exc if isinstance(exc, EngineError) else EngineError(f"sampling failed: {exc}"))
                finished.append(row)
                continue
            if out.finish_reason is not None:
                finished.append(row)
            row.emit(out)
        self._drop_rows(finished)

    def _next_token(self, row: _Row, logits: torch.Tensor, logprobs: torch.Tensor) -> TokenOutput:
        """Choose the row's next token from its (V,) logits and advance the row."""
        sampling = row.request.sampling
        token = choose_token(logits, sampling, row.generator)
        top = []
        if sampling.top_logprobs:
            values, ids = torch.topk(logprobs, sampling.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        row.num_generated += 1
        row.last_token = token
        reason = None
        if token in self._eos_ids and not sampling.ignore_eos:
            reason = "eos"
        text = row.detokenizer.push(token)
        if row.detokenizer.stopped:
            reason = "stop_string"
        elif reason is None and row.num_generated >= sampling.max_tokens:
            reason = "length"
        out = TokenOutput(
            index=row.num_generated - 1,
            token_id=token,
            logprob=float(logprobs[token]),
            top_logprobs=top,
            text=text,
            attention_rows=row.readout_totals.add_step(row.step_readouts),
            queue_seconds=row.queue_seconds if row.num_generated == 1 else None,
        )
        row.step_readouts = StepReadouts()
        if reason is not None:
            out.text += row.detokenizer.flush()
            out.finish_reason = reason
            out.readouts = row.readout_totals.finish()
        return out


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[object], None]:
    """A thread-safe push into an event loop's queue that ignores a loop already gone."""

    def emit(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed: nobody is listening any more
            pass

    return emit
