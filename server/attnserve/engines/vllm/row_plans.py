"""What the attnserve attention backends share. Each runs the engine's own fused kernel for
the whole batch, then recomputes the rows of planned requests with attention.core
(worker.apply_row_plans). The plugin (plugin.py) registers them (cpu_backend.py,
flash_backend.py) in place of the platform's backend: only the impl's forward changes;
metadata builders, KV layouts and kernels stay vLLM's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from . import worker

#: (kv_cache, the row's block ids, seq_len) -> k, v (num_kv_heads, seq_len, head_dim).
PagedKVReader = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class PlannedRowsMixin:
    """The per-request correction, mixed in before a vLLM attention impl: its forward, then the
    planned rows. Uses the impl's scale, attn_type, sliding_window, logits_soft_cap,
    alibi_slopes and sinks (as vLLM's impls set them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        worker.install_runner_hook()
        # attention.core computes softmax(q k^T * scale) over every earlier key; the engine
        # refuses interventions for models whose attention is anything else (see engine.py).
        self._plain_softmax = not (
            getattr(self, "sliding_window", None) not in (None, -1)
            or getattr(self, "logits_soft_cap", None)
            or getattr(self, "alibi_slopes", None) is not None
            or getattr(self, "sinks", None) is not None
        )

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        output = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        if worker.current_step() is not None:
            self._apply_plans(layer, query, output, kv_cache, attn_metadata)
        return output

    def paged_kv_reader(self, layer) -> PagedKVReader:
        """How this backend's KV cache is read back (paged_kv.py)."""
        raise NotImplementedError

    def _apply_plans(self, layer, query, output, kv_cache, attn_metadata) -> None:
        if attn_metadata is None or self.attn_type != AttentionType.DECODER:
            return
        if not self._plain_softmax:
            raise RuntimeError(
                "attnserve recomputes plain softmax attention only (no window, softcap, ALiBi or sinks)"
            )
        read = self.paged_kv_reader(layer)
        block_table = attn_metadata.block_table
        worker.apply_row_plans(
            _layer_index(layer.layer_name),
            query,
            output,
            scale=self.scale,
            query_start_loc=attn_metadata.query_start_loc,
            seq_lens=attn_metadata.seq_lens,
            metadata_id=id(attn_metadata),
            read_kv=lambda row, seq_len: read(kv_cache, block_table[row], seq_len),
        )


@functools.cache
def _layer_index(layer_name: str) -> int:
    return extract_layer_index(layer_name)
