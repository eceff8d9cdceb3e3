"""Selector keys by prompt words on the tiny pipeline: the API layer resolves them to the prompt's
text-encoder positions, so they edit exactly what the same explicit ranges edit."""

from __future__ import annotations

import numpy as np
import pytest
from attnserve.api.image_inputs import to_image_request
from attnserve.spec.errors import InvalidRequest
from attnserve_client.v1 import image_generation_pb2 as gpb
from attnserve_client.v1 import intervention_pb2 as ipb

from .helpers import GUIDANCE, PROMPT, SIZE, STEPS, generate, image_request


def emphasis_request(keys: ipb.KeySelector) -> gpb.GenerateImageRequest:
    selector = ipb.Selector(attention=ipb.ATTENTION_KIND_CROSS, keys=keys)
    return gpb.GenerateImageRequest(
        model="tiny-sd",
        prompt=PROMPT,
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=0,
        interventions=ipb.InterventionSpec(
            interventions=[ipb.Intervention(selector=selector, key_emphasis=ipb.KeyEmphasis(alpha=50.0))]
        ),
    )


def test_key_emphasis_by_words_is_key_emphasis_by_ranges(served_model, served):
    denoiser, _ = served
    # "<start> a photo of a cat <end>": "a" at 1 and 4, "cat" at 5.
    by_words = to_image_request(
        emphasis_request(ipb.KeySelector(words=["a", "cat"])), served_model, served_model.engine
    )
    ranges = [ipb.TokenRange(start=1, end=2), ipb.TokenRange(start=4, end=6)]
    by_ranges = to_image_request(
        emphasis_request(ipb.KeySelector(ranges=ranges)), served_model, served_model.engine
    )
    [[with_words]], [[with_ranges]], [[plain]] = (
        generate(denoiser, [request]) for request in (by_words, by_ranges, image_request(denoiser))
    )
    assert np.array_equal(with_words, with_ranges)
    assert not np.allclose(with_words, plain, atol=1e-3)


def test_words_not_in_the_prompt_are_refused_by_field(served_model):
    keys = ipb.KeySelector(words=["cat", "dog", "a photo", "photo of a cat" * 20])
    with pytest.raises(InvalidRequest) as caught:
        to_image_request(emphasis_request(keys), served_model, served_model.engine)
    words = "interventions.interventions[0].selector.keys.words"
    assert [v.field for v in caught.value.violations] == [f"{words}[1]", f"{words}[3]"]
