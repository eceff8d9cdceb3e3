"""The built-in tiny-pixart is a real PixArt-Sigma-style pipeline: diffusers' PixArt-Sigma pipeline
loads it from its directory (the T5 tokenizer built in code included), its transformer's blocks
have self- and cross-attention, and a seed gives the same image twice."""

from diffusers import PixArtSigmaPipeline
from diffusers.models.attention_processor import Attention
from transformers import T5TokenizerFast

from .helpers import assert_seeds_reproduce


def test_tiny_pixart_loads_and_generates_deterministically(tiny_pixart_path):
    pipe = PixArtSigmaPipeline.from_pretrained(tiny_pixart_path, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    attention = {
        name: module.is_cross_attention
        for name, module in pipe.transformer.named_modules()
        if isinstance(module, Attention)
    }
    assert attention == {
        "transformer_blocks.0.attn1": False,
        "transformer_blocks.0.attn2": True,
        "transformer_blocks.1.attn1": False,
        "transformer_blocks.1.attn2": True,
    }
    assert pipe.transformer.config.out_channels == 2 * pipe.transformer.config.in_channels  # learned sigma

    assert_seeds_reproduce(pipe, use_resolution_binning=False, clean_caption=False)


def test_the_t5_tokenizer_round_trips_and_pads_as_the_pipeline_asks(tiny_pixart_path):
    tokenizer = T5TokenizerFast.from_pretrained(tiny_pixart_path / "tokenizer")
    ids = tokenizer("a photo of a cat").input_ids
    assert len(ids) == 6 and ids[-1] == tokenizer.eos_token_id  # one piece per word, then </s>
    assert tokenizer("a zebra").input_ids.count(tokenizer.unk_token_id) == 0  # spelled in letters
    padded = tokenizer("a cat", padding="max_length", max_length=300, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, 300) and padded.attention_mask.sum() == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
