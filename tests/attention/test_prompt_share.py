"""prompt_part_shares (attention/prompt_share.py) against an eager reference from its definition:
the mean over heads and query rows of the probability on the start token, the prompt's own
tokens and the end token with the padding."""

import torch
from attnserve.attention.prompt_share import prompt_part_shares

HEADS, QUERIES, KEYS = 3, 10, 12


def reference(probs, num_prompt_tokens):
    parts = [0.0, 0.0, 0.0]
    for h in range(HEADS):
        for i in range(QUERIES):
            for j in range(KEYS):
                part = 0 if j == 0 else 1 if j < num_prompt_tokens - 1 else 2
                parts[part] += float(probs[h, i, j]) / (HEADS * QUERIES)
    return torch.tensor(parts)


def test_prompt_part_shares_match_the_definition():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(HEADS, QUERIES, KEYS) * 3, dim=-1)
    for num_prompt_tokens in (2, 5, KEYS):
        got = prompt_part_shares(probs, num_prompt_tokens)
        torch.testing.assert_close(got, reference(probs, num_prompt_tokens), atol=1e-5, rtol=0)
        assert abs(float(got.sum()) - 1) < 1e-5
    # A prompt of just its start and end tokens has no words.
    assert float(prompt_part_shares(probs, 2)[1]) == 0
