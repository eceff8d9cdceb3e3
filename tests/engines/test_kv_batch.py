"""KVBatch over a real DynamicCache of a tiny random Llama: rows merged, kept and grown give the
same logits as each prompt run alone."""

from __future__ import annotations

import pytest
import torch
from attnserve.engines.hf.kv_batch import KVBatch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

ATOL = 1e-5

PROMPT_A = [5, 17, 3, 42, 8]
PROMPT_B = [9, 1, 60, 33, 12, 7, 25, 2]
PROMPT_C = [14, 50]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def prefill(model, prompts: list[list[int]]) -> tuple[KVBatch, torch.Tensor]:
    """Left-padded prefill of several prompts, as the engine does it; (KVBatch, last logits)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return KVBatch(cache, mask), out.logits[:, -1]


@torch.inference_mode()
def decode(model, kv: KVBatch, tokens: list[int], lengths: list[int]) -> torch.Tensor:
    """One decode step: each row gets one token at position = its number of tokens so far."""
    kv.extend_mask()
    out = model(
        input_ids=torch.tensor([[t] for t in tokens]),
        attention_mask=kv.mask,
        position_ids=torch.tensor([[n] for n in lengths]),
        past_key_values=kv.cache,
        use_cache=True,
    )
    return out.logits[:, -1]


def solo_logits(model, prompt: list[int], then: list[int] = ()) -> list[torch.Tensor]:
    """Next-token logits of one prompt alone: after the prefill, then after each token of `then`."""
    kv, logits = prefill(model, [prompt])
    steps = [logits[0]]
    for i, token in enumerate(then):
        steps.append(decode(model, kv, [token], [len(prompt) + i])[0])
    return steps


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


def cache_length(kv: KVBatch) -> int:
    return kv.cache.layers[0].keys.shape[2]


def test_joint_prefill_matches_each_prompt_alone(model):
    _, logits = prefill(model, [PROMPT_A, PROMPT_B])
    assert_close(logits[0], solo_logits(model, PROMPT_A)[0])
    assert_close(logits[1], solo_logits(model, PROMPT_B)[0])


def test_merge_left_pads_the_shorter_batch(model):
    kv_a, _ = prefill(model, [PROMPT_A])
    kv_b, _ = prefill(model, [PROMPT_B])
    keys_a = kv_a.cache.layers[1].keys.clone()
    keys_b = kv_b.cache.layers[1].keys.clone()
    kv_a.merge(kv_b)
    assert kv_a.length == len(PROMPT_B)
    assert kv_a.mask.tolist() == [[0] * 3 + [1] * 5, [1] * 8]
    assert kv_a.row_lengths().tolist() == [5, 8]
    for layer in kv_a.cache.layers:
        assert layer.keys.shape[:3] == (2, 2, 8)
        assert layer.values.shape == layer.keys.shape
        assert torch.count_nonzero(layer.keys[0, :, :3]) == 0
        assert torch.count_nonzero(layer.values[0, :, :3]) == 0
    assert torch.equal(kv_a.cache.layers[1].keys[0, :, 3:], keys_a[0])
    assert torch.equal(kv_a.cache.layers[1].keys[1], keys_b[0])
    assert cache_length(kv_a) == kv_a.length


def test_merge_into_a_longer_batch_pads_the_newcomer(model):
    kv_b, _ = prefill(model, [PROMPT_B])
    kv_c, _ = prefill(model, [PROMPT_C])
    kv_b.merge(kv_c)
    assert kv_b.mask.tolist() == [[1] * 8, [0] * 6 + [1] * 2]


def test_decoding_after_merge_matches_each_prompt_alone(model):
    kv, logits_a = prefill(model, [PROMPT_A])
    kv_b, logits_b = prefill(model, [PROMPT_B])
    kv.merge(kv_b)
    next_a, next_b = [11, 4, 40], [21, 36, 0]
    lengths = [len(PROMPT_A), len(PROMPT_B)]
    steps = [torch.stack([logits_a[0], logits_b[0]])]
    for token_a, token_b in zip(next_a, next_b):
        steps.append(decode(model, kv, [token_a, token_b], lengths))
        lengths = [n + 1 for n in lengths]
    for step, (alone_a, alone_b) in enumerate(
        zip(solo_logits(model, PROMPT_A, next_a), solo_logits(model, PROMPT_B, next_b))
    ):
        assert_close(steps[step][0], alone_a)
        assert_close(steps[step][1], alone_b)
    assert kv.row_lengths().tolist() == [len(PROMPT_A) + 3, len(PROMPT_B) + 3]
    assert cache_length(kv) == kv.length


def test_merge_mid_generation_matches_solo(model):
    """A request joins after the running one has decoded two tokens."""
    kv, _ = prefill(model, [PROMPT_C])
    decode(model, kv, [30], [2])
    decode(model, kv, [31], [3])  # PROMPT_C row now has 4 tokens
    kv_a, _ = prefill(model, [PROMPT_A])
    kv.merge(kv_a)
    assert kv.mask.tolist() == [[0] + [1] * 4, [1] * 5]
    logits = decode(model, kv, [32, 11], [4, len(PROMPT_A)])
    assert_close(logits[0], solo_logits(model, PROMPT_C, [30, 31, 32])[-1])
    assert_close(logits[1], solo_logits(model, PROMPT_A, [11])[-1])


def test_keep_rows_drops_rows_and_trims_shared_padding(model):
    kv, _ = prefill(model, [PROMPT_A])
    for prompt in (PROMPT_B, PROMPT_C):
        kv.merge(prefill(model, [prompt])[0])
    assert kv.length == 8
    keys_before = kv.cache.layers[0].keys.clone()
    kv.keep_rows([2, 0])  # drop the longest (PROMPT_B), and swap the order
    assert kv.length == len(PROMPT_A)
    assert kv.mask.tolist() == [[0] * 3 + [1] * 2, [1] * 5]
    for layer in kv.cache.layers:
        assert layer.keys.shape[0] == 2 and layer.keys.shape[2] == 5
        assert layer.values.shape == layer.keys.shape
    assert torch.equal(kv.cache.layers[0].keys[0], keys_before[2, :, 3:])
    assert torch.equal(kv.cache.layers[0].keys[1], keys_before[0, :, 3:])


def test_keep_rows_without_shared_padding_keeps_the_length(model):
    kv, _ = prefill(model, [PROMPT_A, PROMPT_B, PROMPT_C])
    kv.keep_rows([1, 2])
    assert kv.length == len(PROMPT_B)
    assert kv.mask.tolist() == [[1] * 8, [0] * 6 + [1] * 2]


def test_decoding_after_keep_rows_matches_solo(model):
    kv, _ = prefill(model, [PROMPT_B, PROMPT_A, PROMPT_C])
    decode(model, kv, [1, 11, 30], [len(PROMPT_B), len(PROMPT_A), len(PROMPT_C)])
    kv.keep_rows([2, 1])
    assert kv.length == len(PROMPT_A) + 1  # the B row's extra slots were shared padding
    logits = decode(model, kv, [31, 4], [len(PROMPT_C) + 1, len(PROMPT_A) + 1])
    assert_close(logits[0], solo_logits(model, PROMPT_C, [30, 31])[-1])
    assert_close(logits[1], solo_logits(model, PROMPT_A, [11, 4])[-1])


def test_extend_mask_adds_one_real_slot_per_row(model):
    kv, _ = prefill(model, [PROMPT_A, PROMPT_C])
    kv.extend_mask()
    assert kv.mask.tolist() == [[1] * 5 + [1], [0] * 3 + [1] * 2 + [1]]
    assert kv.mask.dtype == torch.int64
