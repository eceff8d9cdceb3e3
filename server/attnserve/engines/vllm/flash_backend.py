"""vLLM's FlashAttention backend with attnserve's per-request plans applied after its kernel.

Written from vLLM 0.32's source for GPU nodes; it has NOT run on a GPU yet (the CPU build of
vLLM cannot import FlashAttention). Its only GPU-specific part is the KV layout
(paged_kv.read_flash); the planning and the math are the CPU-tested ones. Per-request Python
runs inside the attention op, so the engine serves it with piecewise CUDA graphs (attention
outside the graphs), never full ones.
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from .paged_kv import read_flash
from .planned_rows import PagedKVReader, PlannedRowsMixin


class AttnserveFlashAttentionImpl(PlannedRowsMixin, FlashAttentionImpl):
    def paged_kv_reader(self, layer) -> PagedKVReader:
        return read_flash


class AttnserveFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[AttnserveFlashAttentionImpl]:
        return AttnserveFlashAttentionImpl
