"""What the vLLM engine offers per deployment, decided without starting vLLM."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from attnserve.engines.vllm import engine as vllm_engine_module
from attnserve.engines.vllm.engine import _why_no_interventions, cpu_thread_binding, set_cpu_environment
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


def test_each_engine_gets_the_thread_binding_of_its_workers_unless_the_user_set_one(monkeypatch):
    """Models load one after another in one server process: a tensor-parallel model after a
    single-worker one must not inherit its binding; a binding the user exported always wins."""
    # A private environment and module state, so that nothing leaks into later engines' tests.
    monkeypatch.setattr(os, "environ", {})
    monkeypatch.setattr(vllm_engine_module, "_thread_binding_set_here", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    set_cpu_environment(1, None, num_workers=1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    set_cpu_environment(1, None, num_workers=2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "1"
    set_cpu_environment(1, None, num_workers=2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_cpu_kv_layout_other_than_vec_is_refused():
    pytest.importorskip("vllm")
    from attnserve.engines.vllm.engine import _why_no_cpu_kv_reader

    # Head sizes that are multiples of 16 but not 32 make vLLM pick its "vec16" kernel.
    assert "'vec16' kernel" in _why_no_cpu_kv_reader("float32", 80)
    # SmolLM2's head size in fp32 on an x86 CPU without AMX: the "vec" kernel, readable.
    assert _why_no_cpu_kv_reader("float32", 64) is None
