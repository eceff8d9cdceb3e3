"""vLLM's FlashAttention backend with attnserve's per-request plans applied after its kernel.

Written from vLLM 0.32's source for GPU nodes; it has NOT run on a GPU yet (the CPU build of
vLLM cannot import FlashAttention). Its only GPU-specific part is the KV layout
(paged_kv.read_flash); the planning and the math are the CPU-tested ones. Per-request Python
runs inside the attention op, so the engine serves it with piecewise CUDA graphs (attention
outside the graphs), never full ones.
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from . import worker
from .paged_kv import read_flash
from .row_plans import PlannedRowsMixin


class AttnserveFlashAttentionImpl(PlannedRowsMixin, FlashAttentionImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        worker.install_runner_hook()

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
        self._apply_plans(layer, query, output, kv_cache, attn_metadata, read_flash)
        return output


class AttnserveFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[AttnserveFlashAttentionImpl]:
        return AttnserveFlashAttentionImpl
