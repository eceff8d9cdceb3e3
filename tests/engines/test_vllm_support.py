"""What the vLLM engine offers per deployment, decided without starting vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from attnserve.engines.vllm.engine import _why_no_interventions, cpu_thread_binding
from attnserve.models.config import VllmSettings


@pytest.mark.parametrize(
    ("config", "settings", "reason"),
    [
        ({}, VllmSettings(), None),
        ({}, VllmSettings(tensor_parallel_size=2), None),
        ({}, VllmSettings(pipeline_parallel_size=2), "pipeline parallelism"),
        ({"sliding_window": 4096}, VllmSettings(), "sliding_window"),
        ({"attn_logit_softcapping": 50.0}, VllmSettings(), "attn_logit_softcapping"),
        ({"sliding_window": None}, VllmSettings(), None),
    ],
)
def test_why_no_interventions(config, settings, reason):
    found = _why_no_interventions(SimpleNamespace(**config), settings)
    assert found == reason if reason is None else reason in found


@pytest.mark.parametrize(
    ("cores", "workers", "binding"),
    [
        ([0, 1], 1, "0,1"),
        ([0, 1], 2, "0|1"),
        ([2, 3, 5, 6, 7], 2, "2,3,5|6,7"),
        ([4], 2, "4|4"),
    ],
)
def test_cpu_thread_binding_gives_each_worker_its_cores(cores, workers, binding):
    """VLLM_CPU_OMP_THREADS_BIND as vLLM's OMPProcessManager parses it: one list per worker."""
    assert cpu_thread_binding(cores, workers) == binding


def test_cpu_kv_layout_other_than_vec_is_refused():
    pytest.importorskip("vllm")
    from attnserve.engines.vllm.engine import _why_no_cpu_kv_reader

    # Head sizes that are multiples of 16 but not 32 make vLLM pick its "vec16" kernel.
    assert "'vec16' kernel" in _why_no_cpu_kv_reader("float32", 80)
    # SmolLM2's head size in fp32 on an x86 CPU without AMX: the "vec" kernel, readable.
    assert _why_no_cpu_kv_reader("float32", 64) is None
