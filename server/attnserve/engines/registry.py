"""The engines of this build: which model kinds each serves, and how each is built.

The config parser reads the kinds (so a model no engine can serve fails when the config is
parsed, naming the key); the server builds engines through the factories. Importing this
module loads no engine: each factory imports its engine (torch, transformers, vLLM) when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..metrics import ServerMetrics
    from ..models.config import ModelConfig, ServerConfig
    from .base import Engine


@dataclass(frozen=True)
class EngineEntry:
    #: Model kinds ("llm", "vlm", "diffusion") the engine serves.
    model_kinds: tuple[str, ...]
    #: (model path, model config, server config, metrics) -> a loaded, not yet started engine.
    build: Callable[[Path, ModelConfig, ServerConfig, ServerMetrics], Engine]


def _statistics_sink(metrics: ServerMetrics, model: ModelConfig):
    """Feeds an engine's sampled attention statistics (sums over query rows) to the metrics."""

    def on_statistics(layer, stats) -> None:
        n = max(stats.query_count, 1)

        def mean(total: float | None, count: int = n) -> float | None:
            return None if total is None or count == 0 else total / count

        metrics.attention_statistics(
            model.name,
            model.engine,
            layer,
            mean(stats.sink_mass),
            stats.normalized_entropy / n,
            mean(stats.hidden_sinks),
            visual_share=mean(stats.image_mass, stats.image_query_count),
            visual_entropy=mean(stats.image_entropy, stats.image_query_count),
        )

    return on_statistics


def _transformers_engine(path, model: ModelConfig, config: ServerConfig, metrics: ServerMetrics) -> Engine:
    from .hf.engine import TransformersEngine  # torch and transformers load here

    return TransformersEngine(
        path,
        dtype=model.dtype,
        device=model.device,
        max_batch_size=model.limits.max_batch_size,
        statistics_sample_rate=config.statistics.sample_rate,
        on_statistics=_statistics_sink(metrics, model),
    )


def _vllm_engine(path, model: ModelConfig, config: ServerConfig, metrics: ServerMetrics) -> Engine:
    from .vllm.engine import VllmEngine  # vLLM's own modules load when the engine starts

    return VllmEngine(
        path,
        dtype=model.dtype,
        device=model.device,
        max_batch_size=model.limits.max_batch_size,
        statistics_sample_rate=config.statistics.sample_rate,
        on_statistics=_statistics_sink(metrics, model),
        on_kv_cache_usage=lambda ratio: metrics.kv_cache_usage(model.name, model.engine, ratio),
        settings=model.vllm,
        cache_dir=config.cache_dir,
        max_images=model.limits.max_images,
    )


def _diffusers_engine(path, model: ModelConfig, config: ServerConfig, metrics: ServerMetrics) -> Engine:
    from .diffusers.engine import DiffusersEngine  # torch and diffusers load here

    return DiffusersEngine(
        path,
        dtype=model.dtype,
        device=model.device,
        max_batch_size=model.limits.max_batch_size,
        on_step_seconds=lambda seconds: metrics.denoising_step(model.name, model.engine, seconds),
        on_images=lambda count: metrics.images_generated(model.name, model.engine, count),
        on_guidance_norm=lambda norm: metrics.perturbed_guidance_norm(model.name, model.engine, norm),
        statistics_sample_rate=config.statistics.sample_rate,
        on_cross_attention_shares=lambda shares: metrics.cross_attention_shares(
            model.name, model.engine, shares
        ),
    )


#: Engine name in config -> what it serves and how it is built.
ENGINES: dict[str, EngineEntry] = {
    "transformers": EngineEntry(model_kinds=("llm", "vlm"), build=_transformers_engine),
    "vllm": EngineEntry(model_kinds=("llm", "vlm"), build=_vllm_engine),
    "diffusers": EngineEntry(model_kinds=("diffusion",), build=_diffusers_engine),
}


def engines_serving(kind: str) -> tuple[str, ...]:
    return tuple(name for name, entry in ENGINES.items() if kind in entry.model_kinds)
