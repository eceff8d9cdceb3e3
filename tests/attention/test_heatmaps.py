"""DAAM's aggregation (attention/heatmaps.py) against an eager reference written from the paper:
per step, layer, head and token, the head's softmax map over the image tokens, upsampled,
clamped; mean over heads and layers, sum over steps; a word = mean of its tokens, upsampled to
the image, min-max normalised."""

import math

import torch
import torch.nn.functional as F
from attnserve.attention.heatmaps import (
    cross_attention_probabilities,
    key_probabilities,
    query_grid,
    token_maps,
    word_heatmap,
)

LATENT = (8, 12)
IMAGE = (16, 24)
KEYS = 7
HEADS = 3
HEAD_DIM = 4


def reference(calls, positions):
    """calls: per step, a list of (q, k) per layer; eager loops over steps, layers, heads, tokens."""
    total = torch.zeros(KEYS, *LATENT, dtype=torch.float64)
    for layers in calls:
        for q, k in layers:
            rows = int(math.sqrt(q.shape[1] * LATENT[0] / LATENT[1]))
            cols = q.shape[1] // rows
            layer_sum = torch.zeros(KEYS, *LATENT, dtype=torch.float64)
            for h in range(HEADS):
                for j in range(KEYS):
                    logits = [
                        [float(q[h, i] @ k[h, jj]) / math.sqrt(HEAD_DIM) for jj in range(KEYS)]
                        for i in range(q.shape[1])
                    ]
                    column = torch.tensor(
                        [math.exp(row[j]) / sum(math.exp(x) for x in row) for row in logits]
                    )
                    grid = column.reshape(1, 1, rows, cols)
                    up = F.interpolate(grid, size=LATENT, mode="bicubic", align_corners=False)[0, 0]
                    layer_sum[j] += up.clamp_min(0).double()
            total += layer_sum / HEADS / len(layers)
    word = sum(total[p] for p in positions) / len(positions)
    image = F.interpolate(word[None, None].float(), size=IMAGE, mode="bicubic", align_corners=False)[0, 0]
    return (image - image.min()) / (image.max() - image.min())


def test_word_heatmap_matches_the_eager_reference():
    torch.manual_seed(0)
    grids = [(8, 12), (4, 6)]
    calls = [
        [(torch.randn(HEADS, r * c, HEAD_DIM), torch.randn(HEADS, KEYS, HEAD_DIM)) for r, c in grids]
        for _ in range(3)
    ]
    summed = torch.zeros(KEYS, *LATENT)
    for layers in calls:
        for q, k in layers:
            probs = cross_attention_probabilities(q, k, 1 / math.sqrt(HEAD_DIM))
            summed += token_maps(probs, query_grid(q.shape[1], LATENT), LATENT) / len(layers)
    for positions in ([2], [1, 4]):
        got = word_heatmap(summed, positions, IMAGE)
        torch.testing.assert_close(got, reference(calls, positions), atol=1e-5, rtol=0)
        assert got.min() == 0 and abs(float(got.max()) - 1) < 1e-6


def test_query_grid():
    assert query_grid(96, LATENT) == (8, 12)
    assert query_grid(24, LATENT) == (4, 6)
    assert query_grid(6, LATENT) == (2, 3)


def test_key_probabilities_are_the_softmax_over_every_key_at_the_chosen_keys():
    """A joint row: 12 image queries over 12 image and 5 text keys; the text columns of the full
    softmax, written out per query and key."""
    torch.manual_seed(1)
    q, k = torch.randn(HEADS, 12, HEAD_DIM), torch.randn(HEADS, 17, HEAD_DIM)
    scale = 1 / math.sqrt(HEAD_DIM)
    got = key_probabilities(q, k, scale, range(12, 17))
    assert got.shape == (HEADS, 12, 5) and got.dtype == torch.float32
    for h in range(HEADS):
        for i in range(12):
            logits = [float(q[h, i] @ k[h, j]) * scale for j in range(17)]
            total = sum(math.exp(x) for x in logits)
            expected = torch.tensor([math.exp(logits[j]) / total for j in range(12, 17)])
            torch.testing.assert_close(got[h, i], expected.float(), atol=1e-6, rtol=0)
