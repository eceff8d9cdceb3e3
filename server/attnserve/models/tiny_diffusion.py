"""Tiny Stable-Diffusion-style pipelines built in code (random weights, seeded).

No real diffusion weights can be had offline here, so the built-in `tiny-sd` is this pipeline:
a CLIP tokenizer trained on a small corpus, a 2-layer CLIP text encoder (hidden 32), a UNet with
block_out_channels (32, 64) and cross-attention over the 77 text tokens, a tiny VAE and a DDIM
scheduler, saved as safetensors so engines load it like any local diffusers directory.

The built-in `tiny-sd3` is an SD3-style DiT pipeline of the same spirit: two CLIP text encoders
with projection (hidden 32) sharing that tokenizer, no T5 (diffusers' SD3 pipeline then feeds
zeros in its place), an SD3Transformer2DModel of two joint-attention blocks, a tiny VAE and a
flow-matching Euler scheduler.

The built-in `tiny-sdxl` is an SDXL-style UNet pipeline: two CLIP text encoders sharing that
tokenizer (the second with a projection, whose pooled output SDXL's UNet takes with the image's
size and crop as its added conditioning), a UNet over both encoders' hidden states side by side
with two transformer layers in its deeper blocks, a tiny VAE and SDXL's Euler scheduler.

The built-in `tiny-pixart` is a PixArt-Sigma-style DiT pipeline: a T5 tokenizer built in code
(a Unigram model over the corpus words and single letters), a 2-layer T5 encoder (d_model 32), a
PixArtTransformer2DModel of two blocks (self-attention over the image tokens, cross-attention over
the T5 tokens), a tiny VAE and a DDIM scheduler.
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


def _tokenizer():
    """A fresh CLIPTokenizer (no vocabulary file: none can be downloaded) trained on the corpus."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer().train_new_from_iterator(_corpus(), vocab_size=400)
    tokenizer.model_max_length = TEXT_LENGTH
    return tokenizer


def _text_config(tokenizer, **extra):
    """The tiny CLIP text encoder's config (extra: e.g. a projection for SD3's pooled output)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _vae(**extra):
    """The tiny VAE both pipelines share (8x8 latents of 4 channels for 16x16 images)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        **extra,
    )


def build_tiny_sd(out_dir: Path, seed: int = 0) -> None:
    """Build the tiny pipeline with weights from `seed` and save it into out_dir."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
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
    vae = _vae()
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


def build_tiny_sd3(out_dir: Path, seed: int = 0) -> None:
    """Build the tiny SD3-style pipeline with weights from `seed` and save it into out_dir."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    text_config = _text_config(tokenizer, projection_dim=32)
    text_encoder = CLIPTextModelWithProjection(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        # The two CLIP encoders' hidden states side by side (2 x 32), and their pooled outputs.
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    vae = _vae(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


#: PixArt-Sigma's max_sequence_length: the T5 tokens its pipelines encode a prompt into.
PIXART_TEXT_LENGTH = 300


def _t5_tokenizer():
    """A T5 tokenizer (no vocabulary file: none can be downloaded): a Unigram model whose pieces
    are the corpus words and single letters, so every lowercase prompt tokenizes; </s> ends it."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = [f"\u2581{word}" for word in dict.fromkeys(_CORPUS_WORDS)]
    letters = ["\u2581", *string.ascii_lowercase]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(word, -1.0) for word in words] + [(letter, -5.0) for letter in letters]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=PIXART_TEXT_LENGTH,
    )


def build_tiny_pixart(out_dir: Path, seed: int = 0) -> None:
    """Build the tiny PixArt-Sigma-style pipeline with weights from `seed` into out_dir."""
    import torch
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    transformer = PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        # Learned sigma: the pipeline keeps the first 4 channels.
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        use_additional_conditions=False,
        caption_channels=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae(),
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_sdxl(out_dir: Path, seed: int = 0) -> None:
    """Build the tiny SDXL-style pipeline with weights from `seed` and save it into out_dir."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=32))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # The two encoders' hidden states side by side (2 x 32).
        cross_attention_dim=64,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # The pooled projection, then the six size and crop numbers, each embedded.
        projection_class_embeddings_input_dim=32 + 6 * time_embed_dim,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(force_upcast=False),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_clip(out_dir: Path, seed: int = 0) -> None:
    """A tiny CLIP (text and vision towers, hidden 32, 32 px images) with its processor, saved
    into out_dir: the model HeadHunter's clip-score objective loads in tests and benchmarks, where
    no real CLIP weights can be had. It shares tiny-sd's tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    config = CLIPConfig(
        text_config=_text_config(tokenizer).to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    CLIPModel(config).save_pretrained(out_dir, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
