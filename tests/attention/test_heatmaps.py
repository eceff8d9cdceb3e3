"""DAAM's aggregation (attention/heatmaps.py) against an eager reference written from the paper:
per step, layer, head and token, the head's softmax map over the image tokens, upsampled,
clamped; mean over heads and layers, sum over steps; a word = mean of its tokens, upsampled to
the image, min-max normalised."""

import math

import torch
import torch.nn.functional as F
from attnserve.attention.heatmaps import (
    IOU_THRESHOLDS,
    cross_attention_probabilities,
    heatmap_iou,
    key_probabilities,
    query_grid,
    token_maps,
    word_heatmap,
    word_set_heatmap,
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


def test_word_set_heatmap_is_the_normalised_mean_of_its_words_maps():
    torch.manual_seed(1)
    summed = torch.rand(KEYS, *LATENT)
    words = [[2], [1, 4], [5]]
    mean = sum(sum(summed[p].double() for p in positions) / len(positions) for positions in words) / 3
    image = F.interpolate(mean[None, None].float(), size=IMAGE, mode="bicubic", align_corners=False)[0, 0]
    expected = (image - image.min()) / (image.max() - image.min())
    torch.testing.assert_close(word_set_heatmap(summed, words, IMAGE), expected, atol=1e-5, rtol=0)
    # One word is that word's heatmap.
    torch.testing.assert_close(word_set_heatmap(summed, [[1, 4]], IMAGE), word_heatmap(summed, [1, 4], IMAGE))


def iou_reference(a, b, thresholds):
    """From the definition: pixel by pixel, A = {a >= t}, B = {b >= t}, |A & B| / |A | B|."""
    out = []
    for t in thresholds:
        pixels = [(float(x) >= t, float(y) >= t) for x, y in zip(a.flatten(), b.flatten())]
        both = sum(1 for x, y in pixels if x and y)
        either = sum(1 for x, y in pixels if x or y)
        out.append(both / either if either else 0.0)
    return torch.tensor(out)


def normalised(x):
    return (x - x.min()) / (x.max() - x.min())


def test_heatmap_iou_matches_the_definition_at_each_threshold():
    torch.manual_seed(2)
    a = normalised(torch.rand(*IMAGE))
    b = normalised(0.5 * a + torch.rand(*IMAGE))
    got = heatmap_iou(a, b)
    assert got.shape == (9,) and IOU_THRESHOLDS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    torch.testing.assert_close(got, iou_reference(a, b, IOU_THRESHOLDS), atol=1e-5, rtol=0)
    assert 0 < float(got.min()) < float(got.max()) < 1


def test_heatmap_iou_of_equal_disjoint_and_empty_maps():
    a = torch.zeros(4, 4)
    a[:2] = 1.0
    torch.testing.assert_close(heatmap_iou(a, a), torch.ones(9))
    torch.testing.assert_close(heatmap_iou(a, 1 - a), torch.zeros(9))
    # Nothing reaches any threshold: no union, IoU 0.
    torch.testing.assert_close(heatmap_iou(torch.zeros(4, 4), torch.full((4, 4), 0.05)), torch.zeros(9))


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
