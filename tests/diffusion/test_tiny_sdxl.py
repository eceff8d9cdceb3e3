"""The built-in tiny-sdxl is a real SDXL-style pipeline: diffusers' SDXL pipeline loads it from its
directory, its UNet takes SDXL's added text and time conditioning, and a seed gives the same image
twice."""

from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from .helpers import assert_seeds_reproduce


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

    assert_seeds_reproduce(pipe)
