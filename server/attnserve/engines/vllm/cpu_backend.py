"""vLLM's CPU attention (CPU_ATTN) with attnserve's per-request plans applied after its kernel.

Tested on CPU machines: recomputed rows match the kernel's output, and greedy tokens match the
transformers engine's for every operation.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .paged_kv import read_cpu_vec
from .planned_rows import PagedKVReader, PlannedRowsMixin


class AttnserveCPUAttentionImpl(PlannedRowsMixin, CPUAttentionBackendImpl):
    def paged_kv_reader(self, layer) -> PagedKVReader:
        # The engine refuses plans up front where vLLM picks another kernel (engine.py).
        if layer.isa != "vec":
            raise RuntimeError(
                f"attnserve reads the CPU KV cache of the 'vec' kernel only, not {layer.isa!r}"
            )
        return read_cpu_vec


class AttnserveCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[AttnserveCPUAttentionImpl]:
        return AttnserveCPUAttentionImpl
