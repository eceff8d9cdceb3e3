"""The built-in tiny-sd3 is a real SD3-style pipeline: diffusers' SD3 pipeline loads it from its
directory, its transformer's blocks use joint attention, and a seed gives the same image twice."""

from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from .helpers import assert_seeds_reproduce


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

    assert_seeds_reproduce(pipe)
