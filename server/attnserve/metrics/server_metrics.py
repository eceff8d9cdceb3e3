"""Prometheus collectors of one attnserve server: serving metrics and attention statistics."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import threading
from collections.abc import Iterable
from http.server import HTTPServer

import grpc
import prometheus_client
from attnserve_client.v1 import intervention_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import buckets

FINISH_REASONS = ("eos", "length", "stop_string", "cancelled", "deadline", "error")
#: The API's operations, in OperationKind order.
INTERVENTION_OPERATIONS = tuple(
    name.removeprefix("OPERATION_KIND_").lower() for name in intervention_pb2.OperationKind.keys()[1:]
)

_MODEL = ("model", "engine")


@dataclasses.dataclass(frozen=True)
class _ModelSeries:
    """The labelled children of one (model, engine) pair, resolved once."""

    running: Gauge
    waiting: Gauge
    kv_cache_usage: Gauge
    queue_time: Histogram
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram
    prompt_length: Histogram
    generation_length: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    finished: dict[str, Counter]
    interventions: dict[str, Counter]
    attention_samples: Counter


@dataclasses.dataclass(frozen=True)
class _LayerSeries:
    sink_mass: Histogram
    normalized_entropy: Histogram
    hidden_sinks: Histogram


@dataclasses.dataclass(frozen=True)
class _VisualLayerSeries:
    """A vision-language model's layer: attention on the image tokens."""

    share: Histogram
    entropy: Histogram


class ServerMetrics:
    """All metrics one server exports, and the small calls that record them.

    Series of a (model, engine) pair, including every finish reason and intervention
    operation and every sampled layer's statistics at zero, appear when the model is loaded,
    so rate() and absent() work from the first scrape: a series that appeared at its first
    observation would hide that observation from rate(). Unknown finish reasons and
    operations raise KeyError rather than grow label sets.
    """

    def __init__(self, registry: CollectorRegistry | None = None, version: str | None = None):
        if registry is None:
            registry = CollectorRegistry()
            prometheus_client.ProcessCollector(registry=registry)
            prometheus_client.PlatformCollector(registry=registry)
            prometheus_client.GCCollector(registry=registry)
        self.registry = registry
        self._model_series: dict[tuple[str, str], _ModelSeries] = {}
        self._layer_series: dict[tuple[str, str, int], _LayerSeries] = {}
        self._visual_layer_series: dict[tuple[str, str, int], _VisualLayerSeries] = {}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _MODEL, registry=registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, _MODEL + extra, registry=registry)

        def histogram(
            name: str, doc: str, bounds: tuple[float, ...], extra: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(name, doc, _MODEL + extra, buckets=bounds, registry=registry)

        self._running = gauge("attnserve_scheduler_requests_running", "Requests being generated.")
        self._waiting = gauge("attnserve_scheduler_requests_waiting", "Requests admitted, waiting to start.")
        self._kv_cache_usage = gauge(
            "attnserve_scheduler_kv_cache_usage_ratio", "Fraction of the engine's KV cache in use (0 to 1)."
        )
        self._queue_time = histogram(
            "attnserve_request_queue_time_seconds",
            "Time from admission to the start of generation.",
            buckets.TIME_TO_FIRST_TOKEN_SECONDS,
        )
        self._time_to_first_token = histogram(
            "attnserve_request_time_to_first_token_seconds",
            "Time from admission to the first generated token (queue time included).",
            buckets.TIME_TO_FIRST_TOKEN_SECONDS,
        )
        self._inter_token_latency = histogram(
            "attnserve_request_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            buckets.INTER_TOKEN_LATENCY_SECONDS,
        )
        self._e2e_latency = histogram(
            "attnserve_request_e2e_latency_seconds",
            "Time from admission to the end of a finished request.",
            buckets.REQUEST_LATENCY_SECONDS,
        )
        self._prompt_length = histogram(
            "attnserve_request_prompt_length_tokens",
            "Prompt tokens per finished request.",
            buckets.REQUEST_TOKENS,
        )
        self._generation_length = histogram(
            "attnserve_request_generation_length_tokens",
            "Generated tokens per finished request.",
            buckets.REQUEST_TOKENS,
        )
        self._prompt_tokens = counter("attnserve_request_prompt_tokens_total", "Prompt tokens processed.")
        self._generation_tokens = counter("attnserve_request_generation_tokens_total", "Tokens generated.")
        self._finished = counter(
            "attnserve_request_finished_total", "Requests finished, by finish reason.", ("finish_reason",)
        )
        # A rejected request may name no served model (NOT_FOUND, an empty name, undecodable
        # bytes): its model and engine labels are then empty, never the name the client sent,
        # which would let clients grow the label set without bound.
        self._rejected = Counter(
            "attnserve_request_rejected_total",
            "Requests rejected before generation, by gRPC status code.",
            _MODEL + ("code",),
            registry=registry,
        )

        # Histograms, not gauges of the last sample: a gauge keeps only what was true at scrape
        # time, while _sum / _count give the exact mean over any window and the buckets show
        # how many samples crossed a threshold (e.g. sink mass > 0.5).
        self._sink_mass = histogram(
            "attnserve_attention_sink_mass_ratio",
            "Attention mass on token 0, mean over queries and heads of a layer.",
            buckets.RATIO,
            ("layer",),
        )
        self._normalized_entropy = histogram(
            "attnserve_attention_normalized_entropy_ratio",
            "Attention entropy divided by ln(number of keys), mean over queries and heads of a layer.",
            buckets.RATIO,
            ("layer",),
        )
        self._hidden_sinks = histogram(
            "attnserve_attention_hidden_sinks_per_head",
            "Keys after token 0 with column-mean attention above 0.1, mean over heads of a layer.",
            buckets.HIDDEN_SINKS_PER_HEAD,
            ("layer",),
        )
        self._visual_share = histogram(
            "attnserve_attention_visual_share_ratio",
            "Attention mass on the image tokens, mean over the query rows that see one and the heads of a layer.",
            buckets.RATIO,
            ("layer",),
        )
        self._visual_entropy = histogram(
            "attnserve_attention_visual_entropy_ratio",
            "Entropy of the attention over the image tokens (renormalised over them) divided by "
            "ln(number of image tokens), mean over the query rows that see one and the heads of a layer.",
            buckets.RATIO,
            ("layer",),
        )
        self._attention_samples = counter(
            "attnserve_attention_samples_total", "Per-layer attention statistics samples recorded."
        )
        self._interventions = counter(
            "attnserve_intervention_applied_total",
            "Attention interventions applied, by operation.",
            ("operation",),
        )
        self._recipe_passes = counter(
            "attnserve_visual_recipe_passes_total",
            "Passes run by visual recipes (reading passes and the final answer), by recipe.",
            ("recipe",),
        )

        self._denoising_step = histogram(
            "attnserve_diffusion_step_latency_seconds",
            "Time of one denoising step of a batch of image requests (one UNet call for all their rows).",
            buckets.DENOISING_STEP_SECONDS,
        )
        self._images_generated = counter("attnserve_diffusion_images_generated_total", "Images generated.")
        self._guidance_norm = histogram(
            "attnserve_diffusion_perturbed_guidance_norm",
            "Root mean square of eps_c - eps_ptb, per image and step of perturbed-attention guidance.",
            buckets.GUIDANCE_NORM,
        )

        Info("attnserve_server", "attnserve server build.", registry=registry).info(
            {"version": version or _installed_version()}
        )

    def model_loaded(
        self,
        model: str,
        engine: str,
        statistics_layers: Iterable[int],
        visual: bool = False,
        recipes: Iterable[str] = (),
    ) -> None:
        """Creates the model's series at zero, with the attention statistics of the layers
        whose statistics are sampled (and their image statistics for a vision-language model)
        and the visual recipes it runs."""
        self._series(model, engine)
        for layer in statistics_layers:
            self._layer(model, engine, layer)
            if visual:
                self._visual_layer(model, engine, layer)
        for recipe in recipes:
            self._recipe_passes.labels(model=model, engine=engine, recipe=recipe)

    # Scheduling -------------------------------------------------------------------------------

    def request_queued(self, model: str, engine: str) -> None:
        self._series(model, engine).waiting.inc()

    def request_started(self, model: str, engine: str, queue_seconds: float) -> None:
        series = self._series(model, engine)
        series.waiting.dec()
        series.running.inc()
        series.queue_time.observe(queue_seconds)

    def request_left_queue(self, model: str, engine: str, finish_reason: str) -> None:
        """A queued request ended before it started (cancelled, deadline passed, error)."""
        series = self._series(model, engine)
        series.finished[finish_reason].inc()
        series.waiting.dec()

    def kv_cache_usage(self, model: str, engine: str, ratio: float) -> None:
        self._series(model, engine).kv_cache_usage.set(ratio)

    # Generation ------------------------------------------------------------------------------

    def first_token(self, model: str, engine: str, seconds: float) -> None:
        self._series(model, engine).time_to_first_token.observe(seconds)

    def inter_token(self, model: str, engine: str, seconds: float) -> None:
        self._series(model, engine).inter_token_latency.observe(seconds)

    def request_finished(
        self,
        model: str,
        engine: str,
        finish_reason: str,
        prompt_tokens: int,
        generation_tokens: int,
        e2e_seconds: float,
    ) -> None:
        """A started request ended; drops it from the running gauge."""
        series = self._series(model, engine)
        series.finished[finish_reason].inc()
        series.running.dec()
        series.prompt_tokens.inc(prompt_tokens)
        series.generation_tokens.inc(generation_tokens)
        series.prompt_length.observe(prompt_tokens)
        series.generation_length.observe(generation_tokens)
        series.e2e_latency.observe(e2e_seconds)

    def recipe_passes(
        self, model: str, engine: str, recipe: str, passes: int, prompt_tokens: int, generation_tokens: int
    ) -> None:
        """A visual recipe ran `passes` passes. The tokens are its reading passes' (the final
        pass is counted as the request), so the token counters hold all the engine's work."""
        self._recipe_passes.labels(model=model, engine=engine, recipe=recipe).inc(passes)
        series = self._series(model, engine)
        series.prompt_tokens.inc(prompt_tokens)
        series.generation_tokens.inc(generation_tokens)

    def request_rejected(self, model: str, engine: str, code: grpc.StatusCode) -> None:
        """model and engine are a served model's, or empty when the request named none."""
        self._rejected.labels(model=model, engine=engine, code=code.name).inc()

    # Attention -------------------------------------------------------------------------------

    def attention_statistics(
        self,
        model: str,
        engine: str,
        layer: int,
        sink_mass: float | None,
        normalized_entropy: float,
        hidden_sinks: float | None,
        visual_share: float | None = None,
        visual_entropy: float | None = None,
    ) -> None:
        """One sample of a layer's statistics (each a mean over the layer's heads); the sink
        statistics are None on layers that have none (bidirectional, cross-attention), the
        visual ones when the sampled request has no image its query rows see."""
        layer_series = self._layer(model, engine, layer)
        if sink_mass is not None:
            layer_series.sink_mass.observe(sink_mass)
        layer_series.normalized_entropy.observe(normalized_entropy)
        if hidden_sinks is not None:
            layer_series.hidden_sinks.observe(hidden_sinks)
        if visual_share is not None and visual_entropy is not None:
            visual = self._visual_layer(model, engine, layer)
            visual.share.observe(visual_share)
            visual.entropy.observe(visual_entropy)
        self._series(model, engine).attention_samples.inc()

    def interventions_applied(self, model: str, engine: str, operation: str, count: int = 1) -> None:
        self._series(model, engine).interventions[operation].inc(count)

    # Exposition ------------------------------------------------------------------------------

    def start_http_server(self, port: int, host: str = "0.0.0.0") -> tuple[HTTPServer, threading.Thread]:
        """Serve /metrics on its own port from a daemon thread; shutdown() the server to stop."""
        return prometheus_client.start_http_server(port, addr=host, registry=self.registry)

    def exposition(self) -> bytes:
        """The text exposition format, as a scrape would return it."""
        return prometheus_client.generate_latest(self.registry)

    # Diffusion ---------------------------------------------------------------------------------

    def denoising_step(self, model: str, engine: str, seconds: float) -> None:
        self._denoising_step.labels(model=model, engine=engine).observe(seconds)

    def images_generated(self, model: str, engine: str, count: int) -> None:
        self._images_generated.labels(model=model, engine=engine).inc(count)

    def perturbed_guidance_norm(self, model: str, engine: str, norm: float) -> None:
        self._guidance_norm.labels(model=model, engine=engine).observe(norm)

    # Children cache ---------------------------------------------------------------------------

    def _series(self, model: str, engine: str) -> _ModelSeries:
        series = self._model_series.get((model, engine))
        if series is None:
            series = self._new_model_series(model, engine)
        return series

    def _layer(self, model: str, engine: str, layer: int) -> _LayerSeries:
        series = self._layer_series.get((model, engine, layer))
        if series is None:
            series = self._new_layer_series(model, engine, layer)
        return series

    def _visual_layer(self, model: str, engine: str, layer: int) -> _VisualLayerSeries:
        series = self._visual_layer_series.get((model, engine, layer))
        if series is None:
            labels = {"model": model, "engine": engine, "layer": str(layer)}
            series = _VisualLayerSeries(
                share=self._visual_share.labels(**labels), entropy=self._visual_entropy.labels(**labels)
            )
            self._visual_layer_series[model, engine, layer] = series
        return series

    def _new_model_series(self, model: str, engine: str) -> _ModelSeries:
        # Racing threads resolve the same children (labels() is idempotent), so no lock.
        labels = {"model": model, "engine": engine}
        series = _ModelSeries(
            running=self._running.labels(**labels),
            waiting=self._waiting.labels(**labels),
            kv_cache_usage=self._kv_cache_usage.labels(**labels),
            queue_time=self._queue_time.labels(**labels),
            time_to_first_token=self._time_to_first_token.labels(**labels),
            inter_token_latency=self._inter_token_latency.labels(**labels),
            e2e_latency=self._e2e_latency.labels(**labels),
            prompt_length=self._prompt_length.labels(**labels),
            generation_length=self._generation_length.labels(**labels),
            prompt_tokens=self._prompt_tokens.labels(**labels),
            generation_tokens=self._generation_tokens.labels(**labels),
            finished={r: self._finished.labels(finish_reason=r, **labels) for r in FINISH_REASONS},
            interventions={
                op: self._interventions.labels(operation=op, **labels) for op in INTERVENTION_OPERATIONS
            },
            attention_samples=self._attention_samples.labels(**labels),
        )
        self._model_series[model, engine] = series
        return series

    def _new_layer_series(self, model: str, engine: str, layer: int) -> _LayerSeries:
        labels = {"model": model, "engine": engine, "layer": str(layer)}
        series = _LayerSeries(
            sink_mass=self._sink_mass.labels(**labels),
            normalized_entropy=self._normalized_entropy.labels(**labels),
            hidden_sinks=self._hidden_sinks.labels(**labels),
        )
        self._layer_series[model, engine, layer] = series
        return series


def _installed_version() -> str:
    try:
        return importlib.metadata.version("attnserve")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"
