"""The built-in tiny-sdxl is a real SDXL-style pipeline: diffusers' SDXL pipeline loads it from its
directory, its UNet takes SDXL's added text and time conditioning, and a seed gives the same image
twice."""

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline


def test_tiny_sdxl_loads_and_generates_deterministically(tiny_sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl_path, local_files_only=True, use_safetensors=True, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert (
        unet.cross_attention_dim
        == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert (
        pipe.unet.add_embedding.linear_1.in_features
        == pipe.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim
    )
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)

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
