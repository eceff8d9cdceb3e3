"""The built-in tiny-sd3 is a real SD3-style pipeline: diffusers' SD3 pipeline loads it from its
directory, its transformer's blocks use joint attention, and a seed gives the same image twice."""

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0


def test_tiny_sd3_loads_and_generates_deterministically(tiny_sd3_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tiny_sd3_path, local_files_only=True, use_safetensors=True, text_encoder_3=None, tokenizer_3=None
    )
    pipe.set_progress_bar_config(disable=True)
    joint = [name for name, module in pipe.transformer.named_modules() if isinstance(module, Attention)]
    assert joint == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    for name in joint:
        module = pipe.transformer.get_submodule(name)
        assert isinstance(module.processor, JointAttnProcessor2_0) and module.add_q_proj is not None

    def image(seed):
        return pipe(
            "a photo of a cat",
            num_inference_steps=2,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images

    first, again, other = image(0), image(0), image(1)
    assert first.shape == (1, 32, 32, 3)
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
