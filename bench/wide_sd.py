"""A Stable-Diffusion-1.5-width pipeline with seeded random weights, built in code for
bench_diffusion.py --wide: no real weights can be had here, and tiny-sd's UNet is too small for
its ratios to mean anything. The UNet has SD 1.5's configuration (block widths 320/640/1280/1280,
two layers per block, 8 heads, cross-attention over 768-wide text states: 860M parameters), the
text encoder CLIP ViT-L/14's text width and depth, the VAE SD's; only the tokenizer is tiny-sd's
(a small vocabulary, which changes nothing downstream of the embeddings). Its images are noise;
its timings are a real model's at the same size.
"""

from __future__ import annotations

from pathlib import Path


def build_wide_sd(out_dir: Path, tiny_sd: Path, seed: int = 0) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer", local_files_only=True)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    scheduler = DDIMScheduler.from_pretrained(tiny_sd / "scheduler", local_files_only=True)
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out_dir, safe_serialization=True)
