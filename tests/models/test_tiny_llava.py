"""The built-in tiny-llava: built in code, seeded, saved as safetensors and reloaded."""

import hashlib

import pytest
from attnserve.models.builtin import COMPLETE_MARKER, ensure_builtin
from attnserve.models.tiny_llava import IMAGE_SIZE, PATCH_SIZE
from PIL import Image


@pytest.fixture(scope="module")
def loaded(tiny_llava_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_llava_path, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_path, local_files_only=True, use_safetensors=True
    ).eval()
    return processor, model


def test_saved_as_a_marked_safetensors_directory(tiny_llava_path):
    names = {p.name for p in tiny_llava_path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json"} <= names
    assert COMPLETE_MARKER in names


def test_geometry_fits_vllm_cpu(loaded):
    _, model = loaded
    text, vision = model.config.text_config, model.config.vision_config
    assert text.head_dim >= 32  # vLLM's CPU kernel: no head size under 32
    assert (vision.image_size, vision.patch_size) == (IMAGE_SIZE, PATCH_SIZE)


def test_seeded_build_is_reproducible(tmp_path, tiny_llava_path):
    again = ensure_builtin("tiny-llava", tmp_path)

    def digest(directory):
        return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()

    assert digest(again) == digest(tiny_llava_path)


def test_image_tokens_expand_and_the_answer_depends_on_the_image(loaded):
    processor, model = loaded
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image?"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answers = []
    for colour in ("red", "blue"):
        inputs = processor(images=[Image.new("RGB", (48, 40), colour)], text=text, return_tensors="pt")
        grid = IMAGE_SIZE // PATCH_SIZE
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == grid * grid
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answers.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    assert answers[0] != answers[1]
