"""The UNet's attention layers as attnserve sees them: a geometry, and a processor per layer
that hands each batch row's RowPlan to attention.core.attend_rows.

The engine sets the plans of every row before each UNet call (UNetCall); a layer whose rows all
have none computes exactly what diffusers' AttnProcessor2_0 computes (one SDPA call, bit-identical
to the unmodified pipeline). Otherwise the whole batch goes to attend_rows, self-attention (attn1)
laid out as full rows over the image tokens, cross-attention (attn2) as image queries over the
text keys (attention/layout.py). A cross-attention mask that hides padded text keys (PixArt's)
is honoured: the row's keys are its unpadded ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ...attention.core import attend_rows
from ...attention.heatmaps import cross_attention_probabilities
from ...attention.layout import MaskKind, RowLayout
from ...attention.plan import RowPlan
from ...spec.geometry import AttentionKind, AttentionLayer, Component, ModelGeometry

#: layer index -> the RowPlan of each batch row in this call (None: the row is left untouched).
RowPlans = Callable[[int], Sequence[RowPlan | None]]
#: layer index -> batch row -> what reads that row's unedited cross-attention probabilities.
Readers = Callable[[int], Mapping[int, Callable[[torch.Tensor], None]]]


def attention_modules(unet: torch.nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's attention modules with their paths, in module order."""
    return [(name, module) for name, module in unet.named_modules() if isinstance(module, Attention)]


def unet_geometry(unet: torch.nn.Module, component: Component = Component.UNET_BLOCK) -> ModelGeometry:
    """Every attention layer of the UNet (or of a DiT with cross-attention, PixArt's: component
    DIT_BLOCK): attn1 (self over the image tokens), attn2 (cross over the text tokens), named by
    module path ("mid_block.attentions.0.transformer_blocks.0.attn1")."""
    return ModelGeometry(
        tuple(
            AttentionLayer(
                name=name,
                index=index,
                kind=AttentionKind.CROSS if module.is_cross_attention else AttentionKind.SELF,
                causal=False,
                component=component,
                num_heads=module.heads,
                num_kv_heads=module.heads,
                head_dim=module.inner_dim // module.heads,
            )
            for index, (name, module) in enumerate(attention_modules(unet))
        )
    )


class UNetCall:
    """The row plans of the UNet call in progress, shared by every layer's processor. The engine's
    worker thread is the only one that runs the UNet, so one slot is enough."""

    def __init__(self) -> None:
        self.row_plans: RowPlans | None = None
        self.readers: Readers | None = None


@dataclass
class PlannedAttnProcessor:
    """AttnProcessor2_0 with each row's plan applied through attention.core."""

    layer: AttentionLayer
    call: UNetCall

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attention_mask is not None:
            # PixArt's text padding: an additive mask over the cross-attention's keys.
            num_keys = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, num_keys, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        num_keys = key.shape[2]
        lengths = [num_keys] * batch_size if attention_mask is None else self._key_lengths(attention_mask)
        if self.call.readers is not None:
            for row, read in self.call.readers(self.layer.index).items():
                read(cross_attention_probabilities(query[row], key[row, :, : lengths[row]], attn.scale))
        plans = self.call.row_plans(self.layer.index) if self.call.row_plans is not None else None
        if plans is None or all(plan is None for plan in plans):
            # diffusers' own call (scale left to SDPA's default, as AttnProcessor2_0 does).
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        else:
            if attention_mask is not None:
                # Each row's valid keys moved last: the padding before them is the layout's.
                key, value = (
                    torch.stack([row.roll(num_keys - n, dims=-2) for row, n in zip(tensor, lengths)])
                    for tensor in (key, value)
                )
            hidden_states, _ = attend_rows(
                query,
                key,
                value,
                scale=attn.scale,
                layouts=[self._layout(num_keys, n) for n in lengths],
                plans=[plan or RowPlan() for plan in plans],
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _key_lengths(self, attention_mask: torch.Tensor) -> list[int]:
        """How many keys each row sees under an additive mask that hides its padded text keys
        (0 on the first n keys, a large negative bias after them: right padding)."""
        if self.layer.kind is not AttentionKind.CROSS:
            raise ValueError("attnserve's attention takes masks on cross-attention (text padding) only")
        visible = attention_mask[:, 0, 0] == 0
        lengths = visible.sum(dim=-1)
        positions = torch.arange(visible.shape[-1], device=visible.device)
        if not torch.equal(visible, positions[None, :] < lengths[:, None]):
            raise ValueError("a cross-attention mask must hide the text keys after each row's first n")
        return lengths.tolist()

    def _layout(self, num_keys: int, length: int) -> RowLayout:
        """A row of `length` keys (its first ones; the rest padding), laid out as padding first."""
        if self.layer.kind is AttentionKind.CROSS:
            return RowLayout(
                key_start=num_keys - length,
                num_prompt_tokens=length,
                mask=MaskKind.FULL,
                cross_attention=True,
            )
        return RowLayout(key_start=0, num_prompt_tokens=num_keys, mask=MaskKind.FULL)


def query_downsamplings(unet: torch.nn.Module, geometry: ModelGeometry) -> dict[int, int]:
    """Cross-attention layer -> how many times the UNet has halved the latent grid where it runs:
    down block i after i downsamplers, the mid block after all of them, and up block j where the
    down path was at the same depth (its upsamplers match the skip connections' sizes)."""
    deepest = len(unet.down_blocks) - 1
    levels = {}
    for layer in geometry.layers:
        if layer.kind is not AttentionKind.CROSS:
            continue
        block, index = layer.name.split(".")[:2]
        if block == "down_blocks":
            levels[layer.index] = int(index)
        elif block == "up_blocks":
            levels[layer.index] = len(unet.up_blocks) - 1 - int(index)
        else:  # mid_block
            levels[layer.index] = deepest
    return levels


def install_processors(
    unet: torch.nn.Module, component: Component = Component.UNET_BLOCK
) -> tuple[ModelGeometry, UNetCall]:
    """Give every attention layer of the UNet (or DiT) a PlannedAttnProcessor sharing one UNetCall."""
    geometry = unet_geometry(unet, component)
    call = UNetCall()
    for layer, (_, module) in zip(geometry.layers, attention_modules(unet)):
        module.set_processor(PlannedAttnProcessor(layer, call))
    return geometry, call
