"""What differs between the pipeline families the diffusers engine serves, one small adapter each:
how prompts become conditioning, how the denoising network is called, how latents start and end.

- UNetFamily: Stable Diffusion 1.x / 2.x (StableDiffusionPipeline): a UNet over CLIP text
  embeddings, its own attention processors (attention.py);
- SDXLFamily: Stable Diffusion XL (StableDiffusionXLPipeline): the same UNet attention over two
  CLIP encoders' hidden states side by side, and the second's pooled output with the image's
  size and crop as the UNet's added conditioning;
- SD3Family: Stable Diffusion 3 (StableDiffusion3Pipeline): an SD3Transformer2DModel with joint
  attention (joint_attention.py) over two CLIP encoders' embeddings and their pooled outputs, a
  flow-matching scheduler and a VAE with a shift factor. The T5 encoder is not loaded: diffusers
  then feeds zeros in its place, as here;
- PixArtFamily: PixArt-Sigma (PixArtSigmaPipeline): a PixArtTransformer2DModel whose blocks have
  self-attention over the image tokens and cross-attention over T5 tokens (attention.py's
  processors, the text padding masked), predicting a learned sigma beside the noise.
Each mirrors its diffusers pipeline step by step, so a request alone gives what the pipeline gives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers import PixArtTransformer2DModel
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from ...attention.plan import ScopedOp
from ...spec.geometry import AttentionKind, Component, ModelGeometry
from .attention import UNetCall, install_processors, query_downsamplings
from .joint_attention import install_joint_processors, joint_perturbation

#: diffusers' default max_sequence_length: the T5 token slots its SD3 pipelines fill with zeros
#: when the T5 encoder is not loaded.
T5_TOKENS = 256
#: PixArt-Sigma pipelines' max_sequence_length: the T5 tokens a prompt is padded to.
PIXART_TEXT_TOKENS = 300


class UNetFamily:
    """Stable Diffusion 1.x / 2.x: UNet2DConditionModel, one CLIP text encoder."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.network = pipe.unet

    def install_processors(self) -> tuple[ModelGeometry, UNetCall]:
        return install_processors(self.pipe.unet)

    @property
    def size_multiple(self) -> int:
        """Image sides: multiples of 8, as diffusers' SD pipelines ask."""
        return 8

    @property
    def default_size(self) -> tuple[int, int]:
        side = self.network.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    @property
    def tokenizer(self):
        """What tokenizes prompts for encode."""
        return self.pipe.tokenizer

    @property
    def max_text_tokens(self) -> int:
        """The most tokens a prompt may have (start and end tokens included)."""
        return self.pipe.tokenizer.model_max_length

    def encode(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, None]:
        """(1, T, D) text embeddings of ids padded to the text encoder's length, as diffusers'
        encode_prompt pads them; no pooled embeddings."""
        ids = _padded(token_ids, self.pipe.tokenizer, self.network.device)
        return self.pipe.text_encoder(ids)[0].to(self.network.dtype), None

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.pipe.scheduler.init_noise_sigma

    def set_timesteps(self, steps: int, latent_size: tuple[int, int]) -> None:
        self.pipe.scheduler.set_timesteps(steps, device=self.network.device)

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, pooled: None
    ) -> torch.Tensor:
        latents = self.pipe.scheduler.scale_model_input(latents, t)
        return self.network(latents, t, encoder_hidden_states=embeddings, return_dict=False)[0]

    def decode(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]

    def heatmap_layers(self, geometry: ModelGeometry) -> frozenset[int]:
        """The layers DAAM reads: the cross-attention of the down and up blocks."""
        return frozenset(
            layer.index
            for layer in geometry.layers
            if layer.kind is AttentionKind.CROSS and not layer.name.startswith("mid_block")
        )

    def perturbation(
        self, layer_ops: Mapping[int, tuple[ScopedOp, ...]], geometry: ModelGeometry
    ) -> Mapping[int, tuple[ScopedOp, ...]]:
        """The perturbed branch's ops: PAG's identity blends on self-attention as they are."""
        return layer_ops

    def query_downsamplings(self, geometry: ModelGeometry) -> dict[int, int]:
        """Cross-attention layer -> times the latent grid is halved there (layout binding)."""
        return query_downsamplings(self.network, geometry)


class SDXLFamily(UNetFamily):
    """Stable Diffusion XL: UNet2DConditionModel with added text and time conditioning, two CLIP
    encoders (the second with projection)."""

    def encode(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, T, D) text embeddings and (1, P) pooled embeddings, as diffusers' SDXL encode_prompt
        makes them: both encoders' penultimate hidden states side by side, the second's pooled
        (projected) output. An empty text (start and end tokens only) is zeros where the pipeline
        forces zeros for an empty negative prompt: the API refuses empty prompts, so only a
        negative prompt can be empty."""
        pipe, device, dtype = self.pipe, self.network.device, self.network.dtype
        hidden = []
        for tokenizer, encoder in (
            (pipe.tokenizer, pipe.text_encoder),
            (pipe.tokenizer_2, pipe.text_encoder_2),
        ):
            out = encoder(_padded(token_ids, tokenizer, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(dtype))
        embeddings, pooled = torch.cat(hidden, dim=-1), out[0].to(dtype)  # out: the second's
        if pipe.config.force_zeros_for_empty_prompt and list(token_ids) == pipe.tokenizer("").input_ids:
            return torch.zeros_like(embeddings), torch.zeros_like(pooled)
        return embeddings, pooled

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """The UNet with SDXL's added conditioning: the pooled embeddings, and the time ids the
        pipeline makes by default (original size and target size the image's, crop at 0, 0)."""
        height, width = (side * self.pipe.vae_scale_factor for side in latents.shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=latents.device)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(embeddings.dtype).expand(len(latents), -1)}
        latents = self.pipe.scheduler.scale_model_input(latents, t)
        return self.network(
            latents, t, encoder_hidden_states=embeddings, added_cond_kwargs=added, return_dict=False
        )[0]

    def decode(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """As the pipeline decodes: a float16 VAE that asks for it (force_upcast: SDXL's overflows
        in float16) decodes in float32."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
        try:
            return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)


class SD3Family:
    """Stable Diffusion 3: SD3Transformer2DModel, two CLIP encoders with projection, no T5."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.network = pipe.transformer

    def install_processors(self) -> tuple[ModelGeometry, UNetCall]:
        return install_joint_processors(self.network, self.pipe.tokenizer.model_max_length)

    @property
    def size_multiple(self) -> int:
        """Image sides: multiples of 8 whose latents the patches tile (diffusers' SD3 pipelines
        ask for multiples of the VAE's downsampling times the patch size: 16 for SD3)."""
        return math.lcm(8, self.pipe.vae_scale_factor * self.network.config.patch_size)

    @property
    def default_size(self) -> tuple[int, int]:
        side = self.network.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    @property
    def num_text_tokens(self) -> int:
        """The joint attention's text tokens: the CLIP tokens, then the T5 slots (zeros)."""
        return self.pipe.tokenizer.model_max_length + T5_TOKENS

    @property
    def tokenizer(self):
        """What tokenizes prompts for encode."""
        return self.pipe.tokenizer

    @property
    def max_text_tokens(self) -> int:
        """The most tokens a prompt may have (start and end tokens included)."""
        return self.pipe.tokenizer.model_max_length

    def encode(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, T, D) joint text embeddings and (1, P) pooled embeddings, as diffusers' SD3
        encode_prompt makes them without T5: each CLIP encoder's penultimate hidden states side by
        side, padded to the transformer's width, then zeros for the T5 tokens; the pooled
        (projected) outputs side by side."""
        device, dtype = self.network.device, self.network.dtype
        hidden, pooled = [], []
        for tokenizer, encoder in (
            (self.pipe.tokenizer, self.pipe.text_encoder),
            (self.pipe.tokenizer_2, self.pipe.text_encoder_2),
        ):
            out = encoder(_padded(token_ids, tokenizer, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(dtype))
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        width = self.network.config.joint_attention_dim
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        t5 = torch.zeros(1, T5_TOKENS, width, device=device, dtype=dtype)
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def set_timesteps(self, steps: int, latent_size: tuple[int, int]) -> None:
        scheduler = self.pipe.scheduler
        extra = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = self.network.config.patch_size
            extra["mu"] = calculate_shift(
                (latent_size[0] // patch) * (latent_size[1] // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(steps, device=self.network.device, **extra)

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        return self.network(
            hidden_states=latents,
            timestep=t.expand(latents.shape[0]),
            encoder_hidden_states=embeddings,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]

    def heatmap_layers(self, geometry: ModelGeometry) -> frozenset[int]:
        """The layers word heatmaps read: every joint layer (its image-to-text block)."""
        return frozenset(layer.index for layer in geometry.layers if layer.kind is AttentionKind.JOINT)

    def perturbation(
        self, layer_ops: Mapping[int, tuple[ScopedOp, ...]], geometry: ModelGeometry
    ) -> Mapping[int, tuple[ScopedOp, ...]]:
        """The perturbed branch's ops: on joint layers PAG's joint perturbation (the image block
        masked to its diagonal) for each blend that changes anything, on self-attention layers the
        identity blends as they are."""
        layers = geometry.layers
        return {
            index: tuple(
                joint_perturbation(scoped, self.num_text_tokens)
                if layers[index].kind is AttentionKind.JOINT
                else scoped
                for scoped in ops
                if not scoped.op.is_identity
            )
            for index, ops in layer_ops.items()
        }

    def query_downsamplings(self, geometry: ModelGeometry) -> dict[int, int]:
        """None: layout binding acts on cross-attention layers, which an SD3 transformer lacks."""
        return {}


class PixArtFamily:
    """PixArt-Sigma: PixArtTransformer2DModel with cross-attention over a T5 encoder's tokens.
    No resolution binning: the image is denoised at the asked size."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.network = pipe.transformer

    def install_processors(self) -> tuple[ModelGeometry, UNetCall]:
        return install_processors(self.network, Component.DIT_BLOCK)

    @property
    def size_multiple(self) -> int:
        """Image sides: multiples of 8 whose latents the patches tile."""
        return math.lcm(8, self.pipe.vae_scale_factor * self.network.config.patch_size)

    @property
    def default_size(self) -> tuple[int, int]:
        side = self.network.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    @property
    def tokenizer(self) -> CaptionTokenizer:
        """The T5 tokenizer of the prompt lowercased and stripped, as the PixArt pipelines
        preprocess captions (without clean_caption)."""
        return CaptionTokenizer(self.pipe.tokenizer)

    @property
    def max_text_tokens(self) -> int:
        """The most tokens a prompt may have (its end token included)."""
        return PIXART_TEXT_TOKENS

    def encode(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, T, D) T5 embeddings of the ids padded to PIXART_TEXT_TOKENS and their (1, T)
        attention mask (the padding 0), as diffusers' PixArt encode_prompt makes them; the mask
        travels as the encoding's second part, where SD3 has its pooled embeddings."""
        device = self.network.device
        ids = _padded(token_ids, self.pipe.tokenizer, device, PIXART_TEXT_TOKENS)
        mask = (torch.arange(PIXART_TEXT_TOKENS, device=device) < len(token_ids)).long()[None]
        embeddings = self.pipe.text_encoder(ids, attention_mask=mask)[0]
        return embeddings.to(self.pipe.text_encoder.dtype), mask

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.pipe.scheduler.init_noise_sigma

    def set_timesteps(self, steps: int, latent_size: tuple[int, int]) -> None:
        self.pipe.scheduler.set_timesteps(steps, device=self.network.device)

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The noise: the first in_channels of the output (the rest is the learned sigma)."""
        latents = self.pipe.scheduler.scale_model_input(latents, t)
        noise = self.network(
            latents,
            encoder_hidden_states=embeddings,
            encoder_attention_mask=mask,
            timestep=t[None].expand(latents.shape[0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        return noise[:, : self.network.config.in_channels]

    def decode(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    def heatmap_layers(self, geometry: ModelGeometry) -> frozenset[int]:
        """The layers word heatmaps read: every cross-attention layer (one per block)."""
        return frozenset(layer.index for layer in geometry.layers if layer.kind is AttentionKind.CROSS)

    def perturbation(
        self, layer_ops: Mapping[int, tuple[ScopedOp, ...]], geometry: ModelGeometry
    ) -> Mapping[int, tuple[ScopedOp, ...]]:
        """The perturbed branch's ops: PAG's identity blends on self-attention as they are."""
        return layer_ops

    def query_downsamplings(self, geometry: ModelGeometry) -> dict[int, int]:
        """Cross-attention layer -> times the latent grid is halved there (layout binding): every
        block sees the grid of patches, row-major; none for a patch size that is no power of 2."""
        patch = self.network.config.patch_size
        if patch & (patch - 1):
            return {}
        return {
            layer.index: patch.bit_length() - 1
            for layer in geometry.layers
            if layer.kind is AttentionKind.CROSS
        }


def family_of(pipe) -> UNetFamily | SDXLFamily | SD3Family | PixArtFamily:
    """The adapter of a loaded pipeline: by its denoising network's class, and a UNet one with a
    second text encoder is SDXL's."""
    network = getattr(pipe, "transformer", None)
    if network is not None:
        return PixArtFamily(pipe) if isinstance(network, PixArtTransformer2DModel) else SD3Family(pipe)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXLFamily(pipe)
    return UNetFamily(pipe)


@dataclass(frozen=True)
class CaptionTokenizer:
    """A tokenizer called on text lowercased and stripped."""

    tokenizer: object

    def __call__(self, text: str, **kwargs):
        return self.tokenizer(text.lower().strip(), **kwargs)


def _padded(
    token_ids: Sequence[int], tokenizer, device: torch.device, length: int | None = None
) -> torch.Tensor:
    """(1, length) ids padded with the tokenizer's pad token (length: its model_max_length)."""
    length = length or tokenizer.model_max_length
    padded = list(token_ids) + [tokenizer.pad_token_id] * (length - len(token_ids))
    return torch.tensor([padded], device=device)
