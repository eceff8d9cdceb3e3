"""vLLM's CPU attention (CPU_ATTN) with attnserve's per-request plans applied after its kernel.

Tested on CPU machines: recomputed rows match the kernel's output, and greedy tokens match the
transformers engine's for every operation.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from . import worker
from .paged_kv import read_cpu_vec
from .row_plans import PlannedRowsMixin


class AttnserveCPUAttentionImpl(PlannedRowsMixin, CPUAttentionBackendImpl):
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
        if worker.current_step() is not None:
            if layer.isa != "vec":
                raise RuntimeError(
                    f"attnserve reads the CPU KV cache of the 'vec' kernel only, not {layer.isa!r}"
                )
            self._apply_plans(layer, query, output, kv_cache, attn_metadata, read_cpu_vec)
        return output


class AttnserveCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[AttnserveCPUAttentionImpl]:
        return AttnserveCPUAttentionImpl
