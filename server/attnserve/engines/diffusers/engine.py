"""The diffusers engine: text-to-image requests on one local Stable Diffusion pipeline, a UNet one
(SD 1.x / 2.x, SDXL), an SD3 one (a DiT with joint attention) or a PixArt-Sigma one (a DiT with
cross-attention over T5 tokens); families.py holds what differs.

One worker thread owns the pipeline. It takes the oldest waiting request and every waiting
request of the same size and step count (up to max_batch_size), denoises them together
(denoise.py: one call of the denoising network per step for all their rows, each row with its
own attention plan), then decodes each request's images into PNG. A request whose stream is closed (cancel,
deadline) leaves its batch before the next step.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from ...attention.layout_binding import downsampled_grid
from ...attention.plan import OPERATIONS
from ..base import (
    DenoisingProgress,
    Engine,
    EngineDead,
    EngineInfo,
    GeneratedImages,
    ImageGeneration,
    ImageRequest,
)
from .denoise import Denoiser, DenoisingJob
from .families import family_of

log = logging.getLogger("attnserve.engines.diffusers")


#: The pipeline classes (model_index.json's _class_name) served, and the class that loads each.
PIPELINES = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionPAGPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    "StableDiffusionXLPAGPipeline": StableDiffusionXLPipeline,
    "StableDiffusion3Pipeline": StableDiffusion3Pipeline,
    "StableDiffusion3PAGPipeline": StableDiffusion3Pipeline,
    "PixArtSigmaPipeline": PixArtSigmaPipeline,
    "PixArtSigmaPAGPipeline": PixArtSigmaPipeline,
}

#: What each pipeline class loads without.
WITHOUT = {
    StableDiffusionPipeline: {
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    },
    StableDiffusionXLPipeline: {"add_watermarker": False},
    StableDiffusion3Pipeline: {"text_encoder_3": None, "tokenizer_3": None},
    PixArtSigmaPipeline: {},
}


def load_pipeline(
    model_path: Path, *, dtype: str = "float32", device: str = "cpu"
) -> StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline | PixArtSigmaPipeline:
    """A local Stable Diffusion (UNet), SDXL, SD3 or PixArt-Sigma pipeline directory (safetensors),
    its family read from model_index.json; without SD's safety checker, SDXL's watermarker or SD3's
    T5 encoder."""
    class_name = json.loads((Path(model_path) / "model_index.json").read_text()).get("_class_name")
    pipeline = PIPELINES.get(class_name)
    if pipeline is None:
        raise ValueError(
            f"{model_path}: {class_name} pipelines are not served by the diffusers engine "
            f"(it serves {', '.join(sorted(PIPELINES))})"
        )
    pipe = pipeline.from_pretrained(
        model_path,
        dtype=getattr(torch, dtype),
        local_files_only=True,
        use_safetensors=True,
        **WITHOUT[pipeline],
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(eq=False)
class _Ticket:
    """A request from submission to its images."""

    request: ImageRequest
    #: Hands a DenoisingProgress, the GeneratedImages or an exception to the request's stream.
    emit: Callable[[object], None]
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def batch_key(self) -> tuple[int, int, int]:
        return (self.request.width, self.request.height, self.request.steps)


class DiffusersEngine(Engine, ImageGeneration):
    """Serve GenerateImage requests of one local UNet or SD3 pipeline from one worker thread."""

    def __init__(
        self,
        model_path: Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 16,
        on_step_seconds: Callable[[float], None] = lambda seconds: None,
        on_images: Callable[[int], None] = lambda count: None,
        on_guidance_norm: Callable[[float], None] = lambda norm: None,
        statistics_sample_rate: float = 0.0,
        on_cross_attention_shares: Callable[[tuple[float, ...]], None] = lambda shares: None,
    ):
        self.pipe = load_pipeline(model_path, dtype=dtype, device=device)
        family = family_of(self.pipe)
        geometry, call = family.install_processors()
        self._downsamplings = family.query_downsamplings(geometry)
        self._denoiser = Denoiser(self.pipe, call, geometry, statistics_sample_rate)
        self.tokenizer = family.tokenizer
        self.max_text_tokens = family.max_text_tokens
        self.default_size = family.default_size
        self.size_multiple = family.size_multiple
        self.info = EngineInfo(
            geometry=geometry,
            max_context_length=self.max_text_tokens,
            supported_operations=frozenset(OPERATIONS),
            supported_readouts=frozenset(),
            unsupported_reason="the diffusers engine offers no readouts yet",
        )
        self._max_batch_size = max_batch_size
        self._on_step_seconds = on_step_seconds
        self._on_images = on_images
        self._on_guidance_norm = on_guidance_norm
        self._on_cross_attention_shares = on_cross_attention_shares
        self._waiting: list[_Ticket] = []
        self._running = 0
        self._stopping = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._serve, name="attnserve-diffusers-engine", daemon=True)
        self._failure: str | None = None

    # --- API side (event loop thread) ---------------------------------------------------------

    def query_grids(self, height: int, width: int) -> dict[int, tuple[int, int]]:
        scale = self.pipe.vae_scale_factor
        latent = (height // scale, width // scale)
        return {layer: downsampled_grid(latent, level) for layer, level in self._downsamplings.items()}

    async def start(self) -> None:
        self._thread.start()

    async def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    async def generate_image(
        self, request: ImageRequest
    ) -> AsyncIterator[DenoisingProgress | GeneratedImages]:
        if self._failure:
            raise EngineDead(self._failure)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed (server stopping): nobody is listening
                pass

        ticket = _Ticket(request, emit)
        with self._wake:
            self._waiting.append(ticket)
            self._wake.notify()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GeneratedImages):
                    return
        finally:
            with self._wake:
                ticket.cancelled = True
                if ticket in self._waiting:
                    self._waiting.remove(ticket)

    # --- Worker thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        except BaseException as exc:  # the engine can serve no more: fail everyone
            log.exception("diffusers engine failed")
            self._failure = f"the diffusers engine failed: {exc!r}"
            with self._wake:
                waiting, self._waiting = self._waiting, []
            for ticket in waiting:
                ticket.emit(EngineDead(self._failure))

    def _next_batch(self) -> list[_Ticket] | None:
        """The oldest waiting request and the others of its size and step count; None to stop."""
        with self._wake:
            while not self._waiting and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return None
            key = self._waiting[0].batch_key
            batch = [ticket for ticket in self._waiting if ticket.batch_key == key][: self._max_batch_size]
            for ticket in batch:
                self._waiting.remove(ticket)
            self._running = len(batch)
            return batch

    def _run(self, batch: list[_Ticket]) -> None:
        started = time.monotonic()
        jobs: dict[int, _Ticket] = {}  # id(job) -> its request's ticket
        denoising: list[DenoisingJob] = []

        def on_step(job: DenoisingJob, step: int, timestep: int) -> None:
            ticket = jobs[id(job)]
            ticket.emit(DenoisingProgress(step=step, timestep=timestep, elapsed=time.monotonic() - started))

        def cancelled(job: DenoisingJob) -> bool:
            return self._stopping or jobs[id(job)].cancelled

        try:
            for ticket in batch:
                job = self._denoiser.start(ticket.request)
                jobs[id(job)] = ticket
                denoising.append(job)
            self._denoiser.run(
                denoising,
                batch[0].request.steps,
                on_step,
                cancelled=cancelled,
                on_step_seconds=self._on_step_seconds,
                on_guidance_norm=self._on_guidance_norm,
                on_cross_attention_shares=self._on_cross_attention_shares,
            )
            for job in denoising:
                if cancelled(job):
                    continue
                ticket = jobs[id(job)]
                images = self._denoiser.decode(job)
                self._on_images(len(images))
                request = ticket.request
                heatmaps = tuple(
                    tuple(heatmap.heatmaps(request.heatmap_words, (request.height, request.width)))
                    for heatmap in job.heatmaps
                )
                size = (request.height, request.width)
                overlaps = tuple(
                    heatmap.content_style_iou(request.content_style, size)
                    for heatmap in job.heatmaps
                    if request.content_style is not None
                )
                ticket.emit(
                    GeneratedImages(
                        png=tuple(_png(image) for image in images),
                        queue_seconds=started - ticket.submitted,
                        heatmaps=heatmaps,
                        content_style_iou=overlaps,
                    )
                )
        except Exception as exc:  # this batch fails; the engine goes on
            log.exception("denoising failed")
            for ticket in batch:
                ticket.emit(exc)
        finally:
            self._running = 0


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
