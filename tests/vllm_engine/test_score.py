"""Score on the vLLM engine against the transformers engine, on the real SmolLM2: equal to 1e-4
without a plan and under every operation (the cases in cases.py run on both engines)."""

from __future__ import annotations

import pytest

from .cases import OPERATION_SPECS, SCORE_CANDIDATES, SCORE_PROMPTS

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.mark.parametrize("case", ["plain", *OPERATION_SPECS])
async def test_scores_equal_transformers(vllm_outputs, transformers_outputs, case):
    ours, theirs = vllm_outputs["scores"][case], transformers_outputs["scores"][case]
    assert len(ours) == len(SCORE_PROMPTS) and all(len(s) == len(SCORE_CANDIDATES) for s in ours)
    for our_scores, their_scores in zip(ours, theirs):
        assert our_scores == pytest.approx(their_scores, abs=1e-4)


@pytest.mark.parametrize("operation", list(OPERATION_SPECS))
async def test_operations_move_scores(vllm_outputs, operation):
    """Each operation's plan acted on the scored rows (the parity above is not plain vs plain)."""
    plain, edited = vllm_outputs["scores"]["plain"], vllm_outputs["scores"][operation]
    moved = [abs(e - p) > 1e-4 for es, ps in zip(edited, plain) for e, p in zip(es, ps)]
    assert sum(moved) >= len(moved) // 2
