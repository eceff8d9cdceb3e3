"""tiny-llava: a seeded, random-weight LLaVA built in code, the vision-language model that tests,
examples and benchmarks run here (no real VLM weights can be downloaded on these machines).

A CLIP vision tower (32 px images, 4 px patches: 64 patch tokens and a CLS token, 3 layers), a
linear-GELU projector and a Llama language model (4 layers, 2 query heads, 1 KV head, head size
32: vLLM's CPU attention kernel accepts no head size under 32), with a byte-level BPE tokenizer
that has an `<image>` special token and a chat template that places one `<image>` per image
part, saved in the llava-hf layout that both transformers and vLLM load. The weights are drawn
with a wide initialisation (std 0.2, not 0.02) so that attention is
peaked rather than uniform and the answer depends on the image.
"""

from __future__ import annotations

from pathlib import Path

SEED = 1234
IMAGE_SIZE = 32
PATCH_SIZE = 4
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
#: What the tokenizer is trained on: a few words the tests' prompts use.
CORPUS = (
    "what is in the image? describe the picture. a photo of a red square on a blue background. "
    "the cat sat on the mat. which colour is the circle? user: assistant: yes no left right "
    "top bottom green yellow black white one two three"
)


def build_tiny_llava(out_dir: Path) -> None:
    """Build the model, its tokenizer and image processor, and save them (safetensors) in out_dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([CORPUS] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        initializer_factor=10.0,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        initializer_range=0.2,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    _vision_tower_keys_as_vllm_expects(out_dir / "model.safetensors")


def _vision_tower_keys_as_vllm_expects(weights: Path) -> None:
    """transformers 5 saves the CLIP tower as `vision_tower.embeddings...`; vLLM's LLaVA loader
    wants the llava-hf layout `vision_tower.vision_model.embeddings...`, which transformers
    loads too: one directory serves both engines."""
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    prefix = "vision_tower."
    renamed = {
        f"{prefix}vision_model.{key[len(prefix) :]}" if key.startswith(prefix) else key: value
        for key, value in state.items()
    }
    save_file(renamed, weights, metadata={"format": "pt"})
