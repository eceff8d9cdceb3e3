"""vLLM's compiled mode (torch.compile, vLLM's default): the attention op stays opaque in the
compiled graph, so per-request plans must still run. About 3 minutes to start on 2 cores."""

from __future__ import annotations

import pytest
import pytest_asyncio
from attnserve.engines.vllm.engine import VllmEngine
from attnserve.models.config import VllmSettings

from .cases import READOUT_PROMPT, generate, generate_all, operation_plans, prompt_ids, readout_plan

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPTS = 4


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def compiled_engine(smollm2_path, tmp_path_factory, transformers_outputs):
    engine = VllmEngine(
        smollm2_path,
        settings=VllmSettings(enforce_eager=False, kv_cache_gib=1),
        cache_dir=tmp_path_factory.mktemp("vllm-compiled-cache"),
    )
    await engine.start()
    yield engine
    await engine.shutdown()


def tokens(outputs) -> list[int]:
    return [out.token_id for out in outputs]


async def test_compiled_mode_applies_plans(compiled_engine, transformers_outputs):
    prompts = prompt_ids(compiled_engine)[:PROMPTS]
    for operation in ("sink_calibration", "key_emphasis"):
        ours = await generate_all(
            compiled_engine, prompts, operation_plans(compiled_engine, prompts, operation)
        )
        assert [tokens(o) for o in ours] == [tokens(o) for o in transformers_outputs[operation][:PROMPTS]]
    all_prompts = prompt_ids(compiled_engine)
    ours = await generate(
        compiled_engine, all_prompts[READOUT_PROMPT], readout_plan(compiled_engine, all_prompts)
    )
    theirs = transformers_outputs["readouts"]
    assert tokens(ours) == tokens(theirs)
    ours_rows = [r.weights for o in ours for r in o.step_readouts.get("attention_rows", [])]
    theirs_rows = [r.weights for o in theirs for r in o.step_readouts.get("attention_rows", [])]
    assert len(ours_rows) == len(theirs_rows) == 18
    for a, b in zip(ours_rows, theirs_rows):
        assert a == pytest.approx(b, abs=1e-4)
