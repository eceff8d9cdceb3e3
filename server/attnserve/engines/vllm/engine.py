"""The vLLM engine: causal LMs (and LLaVA-family vision-language models) on vLLM's AsyncLLM,
with per-request attention plans.

A request's compiled plan travels with it in SamplingParams.extra_args; in vLLM's worker the
attnserve attention backend (plugin.py, worker.py) applies it to that request's rows of the
fused batch. Readouts come back over a side channel (channel.py) keyed by the request, and each
token is released once its step's readouts have arrived.

Score (score_answers) computes what engines/hf/scoring.py defines: each distinct row
prompt + answer[:-1] is one vLLM request of one token, whose prompt log-probabilities give the
answer's tokens but the last, and whose sampled position gives the last one's
(SamplingParams.logprob_token_ids); all of a call's rows go to vLLM together.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import pickle
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from ...attention.paint import paint_layers
from ...attention.plan import OPERATIONS
from ...attention.readout import LayerStatistics
from ...models.config import VllmSettings
from ...readouts import READOUTS, TEXT_READOUTS
from ...spec.geometry import ModelGeometry
from ..base import (
    CandidateScoring,
    Engine,
    EngineDead,
    EngineInfo,
    EngineRequest,
    NonFiniteOutput,
    ScoreRequest,
    TextGeneration,
    TokenOutput,
)
from ..detokenizer import IncrementalDetokenizer
from ..hf.scoring import AnswerQuery
from ..readouts import RequestReadoutTotals, StepReadouts
from .channel import ReadoutChannel
from .worker import ANSWER_START_KEY, CHANNEL_KEY, CONFIG_KEY, PLAN_KEY

log = logging.getLogger("attnserve.engines.vllm")

#: How long a token waits for its step's readouts before going out without them.
READOUT_TIMEOUT_SECONDS = 30.0


class VllmEngine(Engine, TextGeneration, CandidateScoring):
    def __init__(
        self,
        model_path: Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 16,
        statistics_sample_rate: float = 0.0,
        on_statistics: Callable[[int, LayerStatistics], None] | None = None,
        on_kv_cache_usage: Callable[[float], None] | None = None,
        settings: VllmSettings | None = None,
        cache_dir: Path | None = None,
        max_images: int = 4,
    ):
        settings = settings or VllmSettings()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        vision = None
        chooses_visual_tokens = False
        if hasattr(config, "vision_config"):
            from ..hf.vision import language_model_geometry, vision_info

            vision = vision_info(config)
            # Under tensor parallelism each worker's tower holds only its share of the heads,
            # whose mean CLS row would differ from worker to worker.
            chooses_visual_tokens = _tower_has_paint_layers(config) and settings.tensor_parallel_size == 1
            geometry = language_model_geometry(config)
            config = config.text_config
        else:
            geometry = ModelGeometry.of_config(config)
        refusal = _why_no_interventions(config, settings) or (
            _why_no_cpu_kv_reader(dtype, geometry.head_dim) if device == "cpu" else None
        )
        if refusal:
            log.warning("model %s: attention interventions and readouts are off: %s", model_path, refusal)
        self.info = EngineInfo(
            geometry=geometry,
            max_context_length=settings.max_model_len or config.max_position_embeddings,
            supported_operations=frozenset() if refusal else frozenset(OPERATIONS),
            supported_readouts=frozenset() if refusal else (frozenset(READOUTS) if vision else TEXT_READOUTS),
            unsupported_reason=refusal,
            input_modalities=frozenset({"text", "image"} if vision else {"text"}),
            vision=vision,
            chooses_visual_tokens=chooses_visual_tokens,
        )
        self._max_images = max_images
        self._model_path = model_path
        self._dtype = dtype
        self._device = device
        self._max_batch_size = max_batch_size
        self._sample_rate = statistics_sample_rate
        self._on_statistics = on_statistics
        self._on_kv_cache_usage = on_kv_cache_usage
        self._settings = settings
        self._cache_dir = cache_dir
        self._llm = None
        self._channel: ReadoutChannel | None = None
        self._socket_dir: tempfile.TemporaryDirectory | None = None
        self._waiting = 0
        self._running = 0

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # A private directory: only this user's processes can reach the channel's socket.
        self._socket_dir = tempfile.TemporaryDirectory(prefix="attnserve-")
        self._channel = ReadoutChannel(f"ipc://{self._socket_dir.name}/readouts", self._on_statistics)
        self._channel.start()
        if self._device == "cpu":
            set_cpu_environment(
                self._settings.kv_cache_gib, self._cache_dir, self._settings.tensor_parallel_size
            )
        settings = self._settings
        args = AsyncEngineArgs(
            model=str(self._model_path),
            dtype=self._dtype,
            max_num_seqs=self._max_batch_size,
            max_model_len=settings.max_model_len,
            tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=settings.enforce_eager,
            seed=0,
            additional_config={
                CONFIG_KEY: {
                    "readout_channel": self._channel.address,
                    "statistics_sample_rate": self._sample_rate,
                }
            },
            **self._cuda_graph_args(),
            **self._whole_prompt_args(),
            **({"limit_mm_per_prompt": {"image": self._max_images}} if self.info.vision else {}),
        )
        loggers = [_kv_cache_usage_logger(self._on_kv_cache_usage)] if self._on_kv_cache_usage else None
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=loggers)

    def _whole_prompt_args(self) -> dict:
        # An attention call over part of a prompt would change what the plans compute: sink
        # calibration's column means are over the call's query rows, which the transformers
        # engine (and the papers) take to be the whole prompt. With interventions on, vLLM
        # never splits a prompt across steps (no chunked prefill); its step budget then holds
        # the longest prompt.
        from vllm.config import SchedulerConfig

        if self.info.unsupported_reason:
            return {}
        budget = max(self.info.max_context_length, SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS)
        return {"enable_chunked_prefill": False, "max_num_batched_tokens": budget}

    def _cuda_graph_args(self) -> dict:
        # The backend runs per-request Python inside the attention op: keep attention out of
        # CUDA graphs (piecewise graphs capture the rest of the model).
        if self._device == "cpu" or self._settings.enforce_eager:
            return {}
        return {"compilation_config": {"cudagraph_mode": "PIECEWISE"}}

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._socket_dir is not None:
            self._socket_dir.cleanup()

    @property
    def num_unfinished_in_vllm(self) -> int:
        """Requests vLLM itself still tracks (an aborted one leaves at once)."""
        return self._llm.output_processor.get_num_unfinished_requests() if self._llm is not None else 0

    @property
    def num_readout_inboxes(self) -> int:
        return self._channel.num_registered if self._channel is not None else 0

    @property
    def failure(self) -> str | None:
        if self._llm is not None and self._llm.errored:
            return "vLLM's engine core process stopped"
        return None

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return self._waiting

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenOutput]:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._llm is None or self.failure:
            raise EngineDead(self.failure or "the vLLM engine is not running")
        # vLLM needs ids unique among live requests; clients may reuse theirs.
        key = f"{request.request_id}-{uuid.uuid4().hex[:12]}"
        plan = request.plan
        reports = bool(plan.readouts)
        inbox = self._channel.register(key) if reports else None
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.sampling.stop)
        totals = RequestReadoutTotals()
        stream = self._llm.generate(self._prompt(request, key), self._sampling_params(request, key), key)
        index = 0
        self._waiting += 1
        started = False
        try:
            async for output in stream:
                if not started:
                    started = True
                    self._waiting -= 1
                    self._running += 1
                completion = output.outputs[0]
                for position, token in enumerate(completion.token_ids):
                    logprobs = completion.logprobs[position] if completion.logprobs else {}
                    logprob = logprobs[token].logprob if token in logprobs else float("nan")
                    if token in logprobs and not math.isfinite(logprob):
                        raise NonFiniteOutput(f"the logits of step {index}")  # closing aborts it
                    step_readouts = await self._step_readouts(inbox, index) if inbox else StepReadouts()
                    out = TokenOutput(
                        index=index,
                        token_id=token,
                        logprob=logprob,
                        top_logprobs=_top_logprobs(logprobs, token, request.sampling.top_logprobs),
                        text=detokenizer.push(token),
                        step_readouts=totals.add_step(step_readouts),
                        queue_seconds=_queue_seconds(output) if index == 0 else None,
                    )
                    index += 1
                    last = position == len(completion.token_ids) - 1
                    reason = _finish_reason(completion, detokenizer, last)
                    if reason is not None:
                        out.text += detokenizer.flush()
                        out.finish_reason = reason
                        out.readouts = totals.finish()
                        yield out
                        return  # on a stop string, closing the stream (below) aborts it in vLLM
                    yield out
        except EngineDeadError as exc:
            raise EngineDead("vLLM's engine core process stopped") from exc
        finally:
            if started:
                self._running -= 1
            else:
                self._waiting -= 1
            if inbox is not None:
                self._channel.unregister(key)
            await stream.aclose()

    async def score(self, request: ScoreRequest) -> list[float]:
        queries = [
            AnswerQuery(
                request.prompt_token_ids, candidate, request.plan, request.images, request.image_spans
            )
            for candidate in request.candidate_token_ids
        ]
        scores = await self.score_answers(queries)
        if not all(math.isfinite(score) for score in scores):
            raise NonFiniteOutput("the candidates' log-probabilities")
        return scores

    async def score_answers(
        self, queries: Sequence[AnswerQuery], on_row: Callable[[int], None] | None = None
    ) -> list[float]:
        """The summed log-probability of each query's answer tokens, as engines/hf/scoring.py's
        score_answers computes it (float64 sums of float32 log-softmax values; non-finite scores
        are returned as they are). Queries whose rows coincide share one vLLM request, and every
        row is submitted at once so that vLLM batches them. on_row(n) is called as each row
        finishes with the number of queries it scored."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._llm is None or self.failure:
            raise EngineDead(self.failure or "the vLLM engine is not running")
        rows: dict[tuple[int, int, tuple[int, ...]], list[int]] = {}  # as in hf/scoring.py
        for q, query in enumerate(queries):
            if not query.answer_ids:
                raise ValueError("an answer needs at least one token")
            input_ids = query.prompt_ids + query.answer_ids[:-1]
            rows.setdefault((id(query.plan), id(query.images), input_ids), []).append(q)
        plans: dict[int, bytes] = {}  # id(plan) -> the plan pickled once for all its rows
        scores = [0.0] * len(queries)

        async def score_row(row_queries: list[int]) -> None:
            first = queries[row_queries[0]]
            answers = [queries[q].answer_ids for q in row_queries]
            request = EngineRequest(
                f"score-{uuid.uuid4().hex[:12]}",
                first.prompt_ids + first.answer_ids[:-1],
                plan=first.plan,
                images=first.images,
                image_spans=first.image_spans,
            )
            if first.plan.touches_attention and id(first.plan) not in plans:
                plans[id(first.plan)] = pickle.dumps(first.plan, protocol=pickle.HIGHEST_PROTOCOL)
            params = _score_params(len(first.prompt_ids), answers, plans.get(id(first.plan)))
            final = None
            prompt = self._prompt(request, request.request_id)
            async for output in self._llm.generate(prompt, params, request.request_id):
                final = output
            for q, answer in zip(row_queries, answers):
                scores[q] = _answer_logprob(final, len(first.prompt_ids), answer)
            if on_row is not None:
                on_row(len(row_queries))

        tasks = [asyncio.ensure_future(score_row(row_queries)) for row_queries in rows.values()]
        self._running += 1
        try:
            await asyncio.gather(*tasks)
        except EngineDeadError as exc:
            raise EngineDead("vLLM's engine core process stopped") from exc
        finally:
            self._running -= 1
            for task in tasks:  # after a failure (or a cancel), the other rows leave vLLM
                task.cancel()
        return scores

    def _prompt(self, request: EngineRequest, key: str):
        prompt = vllm_prompt(request)
        if request.plan.touches_attention:
            # vLLM's prefix cache shares prompt blocks by their tokens. A planned request's KV is
            # its plan's, and its readouts need every prompt position computed: a salt of its
            # own keeps it from reading other requests' blocks and them from reading its own.
            prompt["cache_salt"] = key
        return prompt

    async def _step_readouts(self, inbox, step: int) -> StepReadouts:
        readouts = await inbox.take(step, READOUT_TIMEOUT_SECONDS)
        if readouts is None:
            log.warning("readouts of step %d did not arrive within %.0f s", step, READOUT_TIMEOUT_SECONDS)
            return StepReadouts()
        return readouts

    def _sampling_params(self, request: EngineRequest, key: str):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = request.sampling
        extra = {CHANNEL_KEY: key}
        if request.plan.touches_attention:
            extra[PLAN_KEY] = pickle.dumps(request.plan, protocol=pickle.HIGHEST_PROTOCOL)
        return SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            # The sampled token's logprob always, plus the top ones asked for.
            logprobs=sampling.top_logprobs,
            ignore_eos=sampling.ignore_eos,
            # Text and stop strings come from attnserve's detokenizer, as on every engine.
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
        )


def vllm_prompt(request: EngineRequest):
    """The request's prompt as vLLM takes it. vLLM's multimodal processor expands each image
    token itself: it is handed one per image (and lands the image's tokens on the same positions,
    image_spans)."""
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
    if request.images:
        ids = prompt["prompt_token_ids"]
        for start, end in reversed(request.image_spans):
            del ids[start + 1 : end]
        prompt["multi_modal_data"] = {"image": list(request.images)}
    return prompt


def _score_params(answer_start: int, answers: list[tuple[int, ...]], plan: bytes | None):
    """One token after a score row (prompt + answer[:-1]): the prompt tokens' log-probabilities
    and, at the sampled position, those of the answers' last tokens. vLLM's default
    logprobs_mode ("raw_logprobs") takes both from the model's logits before any sampling
    setting touches them."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra = {ANSWER_START_KEY: answer_start}
    if plan is not None:
        extra[PLAN_KEY] = plan
    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        # The logprob of each prompt token itself (no alternatives) when an answer has several.
        prompt_logprobs=0 if any(len(answer) > 1 for answer in answers) else None,
        logprob_token_ids=list(dict.fromkeys(answer[-1] for answer in answers)),
        # Every position computed under this request's plan, none read from another's cache.
        skip_reading_prefix_cache=True,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
        extra_args=extra,
    )


def _answer_logprob(output, answer_start: int, answer: tuple[int, ...]) -> float:
    """The answer's summed token log-probability from its row's output: answer[i] is prompt
    token answer_start + i (for all but the last) or the sampled position's target."""
    completion = output.outputs[0]
    total = sum(
        output.prompt_logprobs[answer_start + i][token].logprob for i, token in enumerate(answer[:-1])
    )
    return total + completion.logprobs[0][answer[-1]].logprob


def _kv_cache_usage_logger(report: Callable[[float], None]):
    """A vLLM stat logger (a factory of them) that reports the scheduler's KV cache usage."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class KVCacheUsageLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                report(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self):
            pass

    return KVCacheUsageLogger


#: The VLLM_CPU_OMP_THREADS_BIND value this process set itself (None: it set none).
_thread_binding_set_here: str | None = None


def set_cpu_environment(kv_cache_gib: float, cache_dir: Path | None, num_workers: int = 1) -> None:
    """vLLM's CPU settings are environment variables read by its (spawned) processes; values
    already set win, except a thread binding this function set for an engine loaded before
    (another model may have another number of workers)."""
    global _thread_binding_set_here
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
    # By default vLLM binds each worker to one core; share every core this process may use.
    current = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if current is None or current == _thread_binding_set_here:
        binding = cpu_thread_binding(sorted(os.sched_getaffinity(0)), num_workers)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _thread_binding_set_here = binding
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if cache_dir is not None:
        os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir / "vllm"))


def _tower_has_paint_layers(config) -> bool:
    """Whether PAINT's tokens can be chosen in vLLM's worker (tower_captures.py): a LLaVA with a
    CLIP tower, one image token per patch (the "default" feature strategy), and a tower that
    runs the encoder layers PAINT reads (vLLM builds it up to the deepest feature layer only)."""
    from vllm.model_executor.models.utils import get_layer_index

    num_layers = config.vision_config.num_hidden_layers
    feature_layers = config.vision_feature_layer
    if isinstance(feature_layers, int):
        feature_layers = [feature_layers]
    built = max(get_layer_index(layer, num_layers) for layer in feature_layers)
    _, penultimate = paint_layers(num_layers)
    llava_with_clip = config.model_type == "llava" and config.vision_config.model_type == "clip_vision_model"
    return llava_with_clip and config.vision_feature_select_strategy == "default" and penultimate < built


def cpu_thread_binding(cores: list[int], num_workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for num_workers (tensor-parallel) workers: each worker's cores,
    separated by '|' as vLLM's OMPProcessManager parses them; contiguous, the first workers take
    one more where the cores do not divide evenly, and all share them when there are fewer
    cores than workers."""
    if len(cores) < num_workers:
        return "|".join([",".join(map(str, cores))] * num_workers)
    share, extra = divmod(len(cores), num_workers)
    groups, start = [], 0
    for worker in range(num_workers):
        end = start + share + (worker < extra)
        groups.append(",".join(map(str, cores[start:end])))
        start = end
    return "|".join(groups)


def _why_no_interventions(config, settings: VllmSettings) -> str | None:
    """Why the attention core cannot reproduce this deployment's attention, if it cannot.
    Tensor parallelism keeps whole heads on each worker (worker.py applies plans per shard)."""
    if settings.pipeline_parallel_size > 1:
        return "pipeline parallelism splits the layers over workers"
    for name in ("sliding_window", "attn_logit_softcapping", "alibi"):
        if getattr(config, name, None):
            return f"the model's attention uses {name}"
    return None


def _why_no_cpu_kv_reader(dtype: str, head_dim: int) -> str | None:
    """The CPU backend reads the KV cache layout of vLLM's "vec" kernel only; vLLM picks the
    kernel from the CPU, the dtype and the head size (block sizes are multiples of 32)."""
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(getattr(torch, dtype), 32, head_dim)
    if isa != "vec":
        return f"vLLM's CPU attention uses its {isa!r} kernel here, whose KV cache attnserve cannot read yet"
    return None


def _top_logprobs(logprobs: dict, token: int, count: int) -> list[tuple[int, float]]:
    if not count:
        return []
    ranked = sorted(logprobs.items(), key=lambda item: item[1].rank)
    return [(t, lp.logprob) for t, lp in ranked if lp.rank <= count][:count]


def _finish_reason(completion, detokenizer: IncrementalDetokenizer, last: bool) -> str | None:
    if detokenizer.stopped:
        return "stop_string"
    if not last or completion.finish_reason is None:
        return None
    return "length" if completion.finish_reason == "length" else "eos"


def _queue_seconds(output) -> float | None:
    metrics = getattr(output, "metrics", None)
    queued = getattr(metrics, "scheduled_ts", None), getattr(metrics, "queued_ts", None)
    if None in queued:
        return None
    return max(0.0, queued[0] - queued[1])
