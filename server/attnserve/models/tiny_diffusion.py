"""A tiny Stable-Diffusion-style pipeline built in code (random weights, seeded).

No real diffusion weights can be had offline here, so the built-in `tiny-sd` is this pipeline:
a CLIP tokenizer trained on a small corpus, a 2-layer CLIP text encoder (hidden 32), a UNet with
block_out_channels (32, 64) and cross-attention over the 77 text tokens, a tiny VAE and a DDIM
scheduler, saved as safetensors so engines load it like any local diffusers directory.
"""

from __future__ import annotations

from pathlib import Path

#: Words the tokenizer is trained on; prompts outside it still tokenize (into characters).
_CORPUS_WORDS = [
    "a",
    "photo",
    "of",
    "an",
    "astronaut",
    "riding",
    "a",
    "horse",
    "on",
    "the",
    "moon",
    "cat",
    "dog",
    "painting",
    "by",
    "rembrandt",
    "in",
    "the",
    "style",
    "of",
    "van",
    "gogh",
    "red",
    "blue",
    "green",
    "yellow",
    "house",
    "tree",
    "mountain",
    "river",
    "sky",
    "sunset",
    "portrait",
    "landscape",
    "oil",
    "watercolor",
    "sketch",
    "city",
    "night",
    "street",
    "car",
    "boat",
    "sea",
    "beach",
    "forest",
    "flower",
    "bird",
    "cow",
    "field",
]


#: The text encoder's sequence length, as in Stable Diffusion.
TEXT_LENGTH = 77


def _corpus():
    for i in range(200):
        yield " ".join(_CORPUS_WORDS[(i * 7 + j) % len(_CORPUS_WORDS)] for j in range(8))


def build_tiny_sd(out_dir: Path, seed: int = 0) -> None:
    """Build the tiny pipeline with weights from `seed` and save it into out_dir."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # A fresh CLIPTokenizer (no vocabulary file: none can be downloaded) trained on the corpus.
    tokenizer = CLIPTokenizer().train_new_from_iterator(_corpus(), vocab_size=400)
    tokenizer.model_max_length = TEXT_LENGTH
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
