"""Batched denoising of several requests that share a size and a step count.

Each request contributes one batch row per image and branch: the unconditional branch (with
classifier-free guidance), the conditional branch, and the perturbed branch (PAG, SoftPAG).
One call of the denoising network (a UNet, an SD3 transformer) per step runs every row; each
row's attention gets its own RowPlan (attention.py, joint_attention.py); diffusers' guiders
combine each request's branches. The pipeline family's adapter (families.py) encodes prompts and
calls the network as its diffusers pipeline does (StableDiffusionPipeline, StableDiffusion3Pipeline,
PixArtSigmaPipeline and their PAG pipelines), so a request alone gives what they give.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.guiders import ClassifierFreeGuidance, PerturbedAttentionGuidance
from diffusers.utils.torch_utils import randn_tensor

from ...attention.plan import RowPlan, ScopedOp
from ...attention.prompt_share import prompt_part_shares
from ...readouts.word_heatmaps import HeatmapAccumulator
from ...spec.geometry import AttentionKind, Component, ModelGeometry
from ..base import ImageRequest
from ..readouts import StatisticsSampler
from .attention import UNetCall
from .families import family_of

# Guiders warn on every construction that they are experimental: once per request here.
logging.getLogger("diffusers.guiders.guider_utils").setLevel(logging.ERROR)


class Branch(enum.Enum):
    UNCONDITIONAL = "unconditional"
    CONDITIONAL = "conditional"
    PERTURBED = "perturbed"


@dataclass
class DenoisingJob:
    """One request's state across the steps."""

    request: ImageRequest
    branches: tuple[Branch, ...]
    #: (branch, image) text embeddings: (len(branches) * num_images, T, D), branch-major.
    text_embeddings: torch.Tensor
    latents: torch.Tensor
    generator: torch.Generator | None
    guider: ClassifierFreeGuidance | PerturbedAttentionGuidance
    #: One per image when the request reads heatmaps out.
    heatmaps: list[HeatmapAccumulator] = field(default_factory=list)
    #: The text encoding's second part for networks that take one (len(branches) * num_images, P):
    #: pooled text embeddings (SD3), the text attention mask (PixArt).
    pooled_embeddings: torch.Tensor | None = None
    #: Layer -> the perturbed branch's perturbation there, as the network's layers realise it.
    perturbation: Mapping[int, tuple[ScopedOp, ...]] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.branches) * self.request.num_images


def branches_of(request: ImageRequest) -> tuple[Branch, ...]:
    """In the order of diffusers' PAG pipeline: unconditional, conditional, perturbed."""
    branches = (Branch.UNCONDITIONAL,) if request.guidance_scale > 1.0 else ()
    branches += (Branch.CONDITIONAL,)
    if request.perturbed is not None and request.perturbed.scale > 0:
        branches += (Branch.PERTURBED,)
    return branches


def guider_of(request: ImageRequest) -> ClassifierFreeGuidance | PerturbedAttentionGuidance:
    """The diffusers guider that combines the request's branches each step.

    Only its combination is used (forward): the perturbation itself is each row's plan, because
    the guider's own layer hooks would perturb every row of the shared batch, not one request's.
    """
    if request.perturbed is None or request.perturbed.scale <= 0:
        return ClassifierFreeGuidance(guidance_scale=request.guidance_scale)
    if Branch.UNCONDITIONAL not in branches_of(request):
        # eps_c + s (eps_c - eps_ptb), as diffusers' PAG pipelines: the guider's own formulation
        # without classifier-free guidance would start from eps_ptb instead.
        return PerturbedAttentionGuidance(
            guidance_scale=0.0,
            perturbed_guidance_scale=request.perturbed.scale,
            perturbed_guidance_layers=[0],
            use_original_formulation=True,
        )
    # The layers argument names the hooks' layers, which are never installed (see above).
    return PerturbedAttentionGuidance(
        guidance_scale=request.guidance_scale,
        perturbed_guidance_scale=request.perturbed.scale,
        perturbed_guidance_layers=[0],
    )


class Denoiser:
    """Runs the denoising of batches of DenoisingJobs on one pipeline's components."""

    def __init__(self, pipe, call: UNetCall, geometry: ModelGeometry, statistics_sample_rate: float = 0.0):
        self.pipe = pipe
        self.call = call
        self.geometry = geometry
        self.family = family_of(pipe)
        self.heatmap_layers = self.family.heatmap_layers(geometry)
        # The cross-attention share metric reads a UNet's cross-attention layers, over CLIP tokens
        # that start with a start token (SD3 has none: its image tokens meet the text in joint
        # attention; PixArt's T5 tokens have no start token; neither exports shares).
        self.cross_layers = frozenset(
            layer.index
            for layer in geometry.layers
            if layer.kind is AttentionKind.CROSS and layer.component is Component.UNET_BLOCK
        )
        # Which steps (and which image's conditional row) feed the cross-attention share metric.
        self._share_sampler = StatisticsSampler(statistics_sample_rate)
        self.device = self.family.network.device
        self.dtype = self.family.network.dtype

    @torch.inference_mode()
    def encode(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, T, D) text embeddings of the ids and the encoding's second part: (1, P) pooled
        embeddings (SD3), the (1, T) text attention mask (PixArt), None (a UNet); as the family's
        diffusers pipeline encodes a prompt."""
        return self.family.encode(token_ids)

    def start(self, request: ImageRequest) -> DenoisingJob:
        branches = branches_of(request)
        n = request.num_images
        conditional = self.encode(request.prompt_token_ids)
        by_branch = {
            Branch.UNCONDITIONAL: self.encode(request.negative_token_ids),
            Branch.CONDITIONAL: conditional,
            Branch.PERTURBED: conditional,
        }
        generator = (
            torch.Generator(self.device).manual_seed(request.seed) if request.seed is not None else None
        )
        scale = self.pipe.vae_scale_factor
        latent = (request.height // scale, request.width // scale)
        # Timesteps first, as the pipelines set them: a scheduler's starting noise (Euler's
        # init_noise_sigma) depends on them.
        self.family.set_timesteps(request.steps, latent)
        shape = (n, self.family.network.config.in_channels, *latent)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        heatmaps = (
            [HeatmapAccumulator(latent, len(self.heatmap_layers)) for _ in range(n)]
            if request.reads_heatmaps
            else []
        )
        perturbation = (
            self.family.perturbation(request.perturbed.layer_ops, self.geometry)
            if Branch.PERTURBED in branches
            else {}
        )
        return DenoisingJob(
            request=request,
            branches=branches,
            text_embeddings=torch.cat([by_branch[b][0] for b in branches]).repeat_interleave(n, dim=0),
            latents=self.family.initial_latents(latents),
            generator=generator,
            guider=guider_of(request),
            heatmaps=heatmaps,
            pooled_embeddings=None
            if conditional[1] is None
            else torch.cat([by_branch[b][1] for b in branches]).repeat_interleave(n, dim=0),
            perturbation=perturbation,
        )

    @torch.inference_mode()
    def run(
        self,
        jobs: Sequence[DenoisingJob],
        steps: int,
        on_step: Callable[[DenoisingJob, int, int], None],
        cancelled: Callable[[DenoisingJob], bool] = lambda job: False,
        on_step_seconds: Callable[[float], None] = lambda seconds: None,
        on_guidance_norm: Callable[[float], None] = lambda norm: None,
        on_cross_attention_shares: Callable[[tuple[float, ...]], None] = lambda shares: None,
    ) -> None:
        """Denoise the jobs together for `steps` steps; on_step(job, step, timestep) after each,
        on_step_seconds(seconds) once per step with the step's time, on_guidance_norm(norm) for
        each image under perturbed-attention guidance at each step (perturbed_guidance_norm),
        on_cross_attention_shares(shares) for each sampled step (one image's conditional row:
        prompt_part_shares, averaged over the cross-attention layers). A job that is cancelled
        (set by another thread) leaves the batch before the next step."""
        scheduler = self.pipe.scheduler
        self.family.set_timesteps(steps, tuple(jobs[0].latents.shape[-2:]))
        for step, t in enumerate(scheduler.timesteps):
            started = time.monotonic()
            active = [job for job in jobs if not cancelled(job)]
            if not active:
                return
            latents = torch.cat([job.latents.repeat(len(job.branches), 1, 1, 1) for job in active])
            pooled = (
                None
                if active[0].pooled_embeddings is None
                else torch.cat([job.pooled_embeddings for job in active])
            )
            self.call.row_plans = _row_plans(active, step)
            shares: list[torch.Tensor] = []
            self.call.readers = _readers(
                active, self.heatmap_layers, self.cross_layers, self._sampled_share(active, shares.append)
            )
            try:
                noise = self.family.predict(
                    latents, t, torch.cat([job.text_embeddings for job in active]), pooled
                )
            finally:
                self.call.row_plans = None
                self.call.readers = None
            if shares:
                on_cross_attention_shares(tuple(torch.stack(shares).mean(dim=0).tolist()))
            guided = []
            for job, rows in zip(active, noise.split([job.num_rows for job in active])):
                guided.append(_guide(job, rows, step, t, on_guidance_norm))
            # One scheduler step for the whole batch: some schedulers count their steps.
            stepped = scheduler.step(
                torch.cat(guided), t, torch.cat([job.latents for job in active]), return_dict=False
            )[0]
            on_step_seconds(time.monotonic() - started)
            for job, latents in zip(active, stepped.split([job.request.num_images for job in active])):
                job.latents = latents
                on_step(job, step, int(t))

    def _sampled_share(self, jobs: Sequence[DenoisingJob], record: Callable[[torch.Tensor], None]):
        """(batch row, its reader) of this step's cross-attention share sample, or None: one of
        the images' conditional rows, taken in turn."""
        rows = []
        start = 0
        for job in jobs:
            first = start + job.branches.index(Branch.CONDITIONAL) * job.request.num_images
            length = len(job.request.prompt_token_ids)
            rows += [(first + image, length) for image in range(job.request.num_images)]
            start += job.num_rows
        sampled = self._share_sampler.sampled_row(len(rows))
        if sampled < 0:
            return None
        row, length = rows[sampled]
        return row, lambda probs: record(prompt_part_shares(probs, length))

    @torch.inference_mode()
    def decode(self, job: DenoisingJob):
        """The job's images as PIL images, as the pipelines postprocess them."""
        return self.images(job, "pil")

    @torch.inference_mode()
    def images(self, job: DenoisingJob, output_type: str):
        image = self.family.decode(job.latents, job.generator)
        return self.pipe.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=[True] * image.shape[0]
        )


def perturbed_guidance_norm(conditional: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Per image, the root mean square of eps_c - eps_ptb, the direction PAG pushes along (a
    mean over elements, so that sizes compare)."""
    return (conditional - perturbed).double().pow(2).flatten(1).mean(dim=1).sqrt()


def _guide(
    job: DenoisingJob,
    rows: torch.Tensor,
    step: int,
    t: torch.Tensor,
    on_guidance_norm: Callable[[float], None] = lambda norm: None,
) -> torch.Tensor:
    """eps of each image from its branches' predictions, by the request's guider."""
    by_branch = dict(zip(job.branches, rows.chunk(len(job.branches))))
    guider = job.guider
    # No step count: the guider applies its guidance at every step, as diffusers' PAG pipelines do
    # (its own start/stop window would skip step 0).
    guider.set_state(step, None, t)
    if isinstance(guider, PerturbedAttentionGuidance):
        guider.skip_layer_guidance_scale = job.request.perturbed.scale_at(float(t))
        for norm in perturbed_guidance_norm(by_branch[Branch.CONDITIONAL], by_branch[Branch.PERTURBED]):
            on_guidance_norm(float(norm))
        return guider.forward(
            by_branch[Branch.CONDITIONAL], by_branch.get(Branch.UNCONDITIONAL), by_branch[Branch.PERTURBED]
        ).pred
    return guider.forward(by_branch[Branch.CONDITIONAL], by_branch.get(Branch.UNCONDITIONAL)).pred


def _row_plans(jobs: Sequence[DenoisingJob], step: int) -> Callable[[int], list[RowPlan | None]]:
    """layer -> each batch row's plan in this step: the unconditional branch is left untouched,
    the conditional branch gets the request's interventions, the perturbed branch those and the
    guidance's identity blends."""

    def plans(layer: int) -> list[RowPlan | None]:
        out: list[RowPlan | None] = []
        for job in jobs:
            request = job.request
            conditional = request.plan.for_call(layer, step)
            for branch in job.branches:
                if branch is Branch.UNCONDITIONAL:
                    plan = None
                elif branch is Branch.CONDITIONAL:
                    plan = conditional
                else:
                    plan = _with_ops(conditional, job.perturbation.get(layer, ()))
                out.extend([plan] * request.num_images)
        return out

    return plans


def _readers(jobs: Sequence[DenoisingJob], heatmap_layers, cross_layers, sampled):
    """layer -> {batch row: what reads its cross-attention}: each heatmap request's conditional
    rows in the heatmap layers, and the sampled row (batch row, reader) in every cross-attention
    layer."""
    heatmap_readers = {}
    start = 0
    for job in jobs:
        if job.heatmaps:
            first = start + job.branches.index(Branch.CONDITIONAL) * job.request.num_images
            heatmap_readers |= {first + image: heatmap.record for image, heatmap in enumerate(job.heatmaps)}
        start += job.num_rows

    def of_layer(layer: int):
        readers = dict(heatmap_readers) if layer in heatmap_layers else {}
        if sampled is not None and layer in cross_layers:
            row, read = sampled
            readers[row] = _both(readers[row], read) if row in readers else read
        return readers

    return of_layer


def _both(first, second):
    def read(probs: torch.Tensor) -> None:
        first(probs)
        second(probs)

    return read


def _with_ops(plan: RowPlan | None, ops) -> RowPlan | None:
    if not ops:
        return plan
    if plan is None:
        return RowPlan(ops=tuple(ops))
    return RowPlan(ops=plan.ops + tuple(ops), needs=plan.needs)
