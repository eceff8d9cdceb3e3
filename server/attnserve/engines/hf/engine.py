"""The transformers engine: continuous batching of causal-LM requests over one KV cache (and of
LLaVA-family vision-language models: their images through the vision tower at prefill, vision.py).

One thread owns the model and wires three stages together each iteration: the scheduler
(scheduler.py) picks what runs, the model runner (model_runner.py) runs the forward with every
row's attention plan, and the output processor (output_processor.py) turns the logits into each
request's next token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ...attention.plan import OPERATIONS
from ...readouts import READOUTS, TEXT_READOUTS
from ...spec.geometry import ModelGeometry
from ..base import (
    CandidateScoring,
    Engine,
    EngineDead,
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
from . import attention, vision
from .model_runner import ModelRunner, StatisticsSink
from .output_processor import OutputProcessor, eos_token_ids
from .requests import Emit, RequestRow, ScoreJob
from .sampling import make_generator
from .scheduler import Scheduler

log = logging.getLogger("attnserve.engines.hf")


def load_causal_lm(model_path: Path, *, dtype: str = "float32", device: str = "cpu"):
    """(tokenizer, model) of a local causal LM, in eval mode, with the "attnserve" attention."""
    attention.register()
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = (
        AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=getattr(torch, dtype),
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


class TransformersEngine(Engine, TextGeneration, CandidateScoring):
    """Serve Generate and Score requests of one local causal LM from one scheduler thread."""

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
        tower = None
        if vision.is_vision_language(model_path):
            processor, model = vision.load_vision_language_model(
                model_path, dtype=getattr(torch, dtype), device=device
            )
            self.tokenizer = processor.tokenizer
            tower = vision.VisionTower(model, processor, torch.device(device))
            geometry = vision.language_model_geometry(model.config)
            text_config = model.config.text_config
        else:
            self.tokenizer, model = load_causal_lm(model_path, dtype=dtype, device=device)
            geometry = model_geometry(model)
            text_config = model.config
        self.info = EngineInfo(
            geometry=geometry,
            max_context_length=text_config.max_position_embeddings,
            supported_operations=frozenset(OPERATIONS),
            supported_readouts=frozenset(READOUTS) if tower else TEXT_READOUTS,
            input_modalities=frozenset({"text", "image"} if tower else {"text"}),
            vision=tower.info if tower else None,
        )
        self._scheduler = Scheduler(max_batch_size)
        self._runner = ModelRunner(
            model,
            device=torch.device(device),
            pad_id=pad_token_id(self.tokenizer),
            max_batch_size=max_batch_size,
            statistics_sample_rate=statistics_sample_rate,
            on_statistics=on_statistics,
            vision_tower=tower,
        )
        self._outputs = OutputProcessor(eos_token_ids(self.tokenizer, model))
        self._thread = threading.Thread(target=self._serve, name="attnserve-hf-engine", daemon=True)
        self._failure: str | None = None

    # --- API side (event loop thread) ---------------------------------------------------------

    async def start(self) -> None:
        self._thread.start()

    async def shutdown(self) -> None:
        self._scheduler.stop()
        await asyncio.to_thread(self._thread.join)

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def num_running(self) -> int:
        return self._scheduler.num_running

    @property
    def num_waiting(self) -> int:
        """Generate requests not yet prefilled, and Score requests not yet run."""
        return self._scheduler.num_waiting

    async def score(self, request: ScoreRequest) -> list[float]:
        if self._failure:
            raise EngineDead(self._failure)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._scheduler.add_score(ScoreJob(request, _emitter(loop, queue)))
        result = await queue.get()
        if isinstance(result, BaseException):
            raise result
        return result

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenOutput]:
        if self._failure:
            raise EngineDead(self._failure)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        row = RequestRow(
            request=request,
            emit=_emitter(loop, queue),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.sampling.stop),
            generator=make_generator(request.sampling),
        )
        self._scheduler.add_row(row)
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
            self._scheduler.wake()

    # --- Scheduler thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        """The thread's body: the loop, and if anything escapes it, a dead engine that fails
        every request it holds (none may wait on a thread that is gone)."""
        try:
            self._loop()
        except BaseException as exc:
            self._failure = f"the transformers engine's scheduler thread stopped ({exc!r})"
            log.exception("%s", self._failure)
            for request in self._scheduler.take_everything():
                request.emit(EngineDead(self._failure))

    def _loop(self) -> None:
        while True:
            # 1. Wait for work; admit waiting rows into the batch's free slots, take a Score job.
            schedule = self._scheduler.schedule()
            if schedule is None:
                return
            # 2. The Score job runs alone, in forwards of its own.
            if schedule.score is not None:
                self._score(schedule.score)
            # 3. Prefill the admitted rows or decode the running batch, then emit each row's token.
            try:
                self._step(schedule.admitted)
            except Exception as exc:  # one bad step must not kill the server
                log.exception("engine step failed; failing the requests in it")
                for row in schedule.admitted + self._scheduler.clear_running():
                    row.emit(EngineError(f"engine step failed: {exc}"))
                self._runner.clear()

    @torch.inference_mode()
    def _step(self, admitted: list[RequestRow]) -> None:
        """Cancelled rows leave; the admitted rows' prefill, or else one decode step, runs; every
        row in it gets its output, and the rows that finished leave."""
        self._leave_batch(self._scheduler.cancelled_running())
        if admitted:
            self._scheduler.start_prefill(admitted)
            logits = self._runner.prefill(admitted)
            self._scheduler.join_running(admitted)
            rows = admitted
        elif self._scheduler.running:
            rows = self._scheduler.running
            logits = self._runner.decode(rows)
        else:
            return
        self._leave_batch(self._outputs.process_step(rows, logits))

    def _leave_batch(self, rows: Sequence[RequestRow]) -> None:
        """These rows leave the running batch and its KV cache."""
        kept = self._scheduler.leave_running(rows)
        if kept is not None:
            self._runner.keep_rows(kept)

    def _score(self, job: ScoreJob) -> None:
        try:
            scores = self._runner.score(job.request)
        except Exception as exc:  # a failed score fails its request only
            log.exception("scoring failed request_id=%s", job.request.request_id)
            job.emit(EngineError(f"scoring failed: {exc}"))
            return
        if not all(math.isfinite(score) for score in scores):
            job.emit(NonFiniteOutput("the candidates' log-probabilities"))
            return
        job.emit(scores)


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Emit:
    """A thread-safe push into an event loop's queue that ignores a loop already gone."""

    def emit(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed: nobody is listening any more
            pass

    return emit
