"""A DiT's (SD3's) joint attention layers as attnserve sees them: a geometry, and a processor per
layer that hands each batch row's RowPlan to attention.core.attend_rows.

Joint attention is one self-attention over the image tokens and the text tokens together
(diffusers' JointAttnProcessor2_0 concatenates them, image first). A layer whose rows all have no
plan computes exactly what JointAttnProcessor2_0 computes (bit-identical to the unmodified
pipeline). Otherwise the rows go to attend_rows laid out text first: the T text tokens are the
keys 0..T-1 (the prompt, so a plan's key ranges, text-token positions, select them as they are)
and the N image tokens follow them as keys T..T+N-1, which a KeySet reaches only as the tokens
after the prompt (IMAGE_KEYS); every token sees every token (MaskKind.FULL), and query row i is
token i, its own key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ...attention.core import attend_rows
from ...attention.heatmaps import key_probabilities
from ...attention.layout import MaskKind, RowLayout
from ...attention.plan import IdentityBlend, KeyMask, KeySet, QueryRows, RowPlan, ScopedOp
from ...spec.geometry import AttentionKind, AttentionLayer, Component, ModelGeometry
from .attention import UNetCall, attention_modules

#: The image tokens of a joint row: every key after the text (the prompt).
IMAGE_KEYS = KeySet(invert=True, include_generated=True)


def image_rows(num_text_tokens: int) -> QueryRows:
    """The image tokens' query rows of a joint row laid out text first."""
    return QueryRows(ranges=((0, num_text_tokens),), invert=True)


def joint_perturbation(scoped: ScopedOp, num_text_tokens: int) -> ScopedOp:
    """PAG's perturbation of a joint layer, from the identity blend PerturbedGuidance names: the
    image-to-image block of the map masked to its diagonal, image-to-text and the text rows kept
    (diffusers' PAGJointAttnProcessor2_0). That is a KeyMask over the image keys on the image
    query rows (a query keeps its own key); weight 1 only (spec/guidance.py refuses others)."""
    if not isinstance(scoped.op, IdentityBlend) or scoped.op.weight != 1.0:
        raise ValueError(
            f"a joint layer's perturbation is PAG's (identity blend of weight 1), not {scoped.op}"
        )
    return ScopedOp(KeyMask(), heads=scoped.heads, keys=IMAGE_KEYS, query_rows=image_rows(num_text_tokens))


def dit_geometry(transformer: torch.nn.Module) -> ModelGeometry:
    """Every attention layer of the transformer, named by module path ("transformer_blocks.0.attn"):
    joint attention where the layer projects the text stream too (add_q_proj), self-attention over
    the image tokens otherwise (SD3.5's second attention of a block)."""
    return ModelGeometry(
        tuple(
            AttentionLayer(
                name=name,
                index=index,
                kind=AttentionKind.JOINT if module.add_q_proj is not None else AttentionKind.SELF,
                causal=False,
                component=Component.DIT_BLOCK,
                num_heads=module.heads,
                num_kv_heads=module.heads,
                head_dim=module.inner_dim // module.heads,
            )
            for index, (name, module) in enumerate(attention_modules(transformer))
        )
    )


@dataclass
class PlannedJointAttnProcessor:
    """JointAttnProcessor2_0 with each row's plan applied through attention.core."""

    layer: AttentionLayer
    call: UNetCall
    #: The text tokens word heatmaps read: the prompt's encoder tokens, first in the text stream
    #: (SD3's CLIP tokens; the T5 slots after them hold no prompt word). None: every text token.
    num_prompt_tokens: int | None = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("attention masks are not supported by attnserve's DiT attention")
        batch_size = hidden_states.shape[0]
        num_image_tokens = hidden_states.shape[1]
        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(hidden_states), attn.heads)
        value = _heads(attn.to_v(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = None
        if encoder_hidden_states is not None:
            text_query = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
            text_key = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
            text_value = _heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            text = (text_query, text_key, text_value)

        if self.call.readers is not None and text is not None:
            # Word heatmaps: the image queries' unedited probabilities at the text keys.
            keys = torch.cat([key, text[1]], dim=2)
            end = (
                keys.shape[2] if self.num_prompt_tokens is None else num_image_tokens + self.num_prompt_tokens
            )
            text_keys = range(num_image_tokens, end)
            for row, read in self.call.readers(self.layer.index).items():
                read(key_probabilities(query[row], keys[row], attn.scale, text_keys))
        plans = self.call.row_plans(self.layer.index) if self.call.row_plans is not None else None
        if plans is None or all(plan is None for plan in plans):
            # diffusers' own call: image tokens first.
            if text is not None:
                query, key, value = (torch.cat([x, t], dim=2) for x, t in zip((query, key, value), text))
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            text_first = False
        else:
            if text is not None:
                query, key, value = (torch.cat([t, x], dim=2) for x, t in zip((query, key, value), text))
            # The text is the prompt; an image-only layer's tokens are all prompt, as a UNet's.
            num_prompt_tokens = query.shape[2] - num_image_tokens if text is not None else num_image_tokens
            hidden_states, _ = attend_rows(
                query,
                key,
                value,
                scale=attn.scale,
                layouts=[RowLayout(key_start=0, num_prompt_tokens=num_prompt_tokens, mask=MaskKind.FULL)]
                * batch_size,
                plans=[plan or RowPlan() for plan in plans],
            )
            text_first = True
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.inner_dim)
        hidden_states = hidden_states.to(query.dtype)

        if text is not None:
            if text_first:
                encoder_hidden_states = hidden_states[:, :-num_image_tokens]
                hidden_states = hidden_states[:, -num_image_tokens:]
            else:
                encoder_hidden_states = hidden_states[:, num_image_tokens:]
                hidden_states = hidden_states[:, :num_image_tokens]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states if text is None else (hidden_states, encoder_hidden_states)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def install_joint_processors(
    transformer: torch.nn.Module, num_prompt_tokens: int | None = None
) -> tuple[ModelGeometry, UNetCall]:
    """Give every attention layer of the transformer a PlannedJointAttnProcessor sharing one call
    (num_prompt_tokens: the text tokens word heatmaps read, PlannedJointAttnProcessor)."""
    geometry = dit_geometry(transformer)
    call = UNetCall()
    for layer, (_, module) in zip(geometry.layers, attention_modules(transformer)):
        module.set_processor(PlannedJointAttnProcessor(layer, call, num_prompt_tokens))
    return geometry, call
