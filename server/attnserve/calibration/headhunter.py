"""HeadHunter (arXiv 2506.10978): the greedy search for the self-attention heads whose SoftPAG
perturbation serves an objective best.

Candidates are (layer, head) pairs. Round r scores every candidate not chosen yet, each added to
the heads chosen in rounds 1..r-1 (a head set's score is the mean objective over the prompts of
the images generated with SoftPAG on it), and adds the k best; R rounds. The empty set (no
perturbed branch) is scored first as the baseline and the final set last, so the preset records
what the chosen heads do. Equal scores keep candidate order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

#: The paper's settings: quality M = 20 prompts, k = 24 heads per round; style R = 5, k = 3.
DEFAULT_ROUNDS = 5
DEFAULT_PER_ROUND = 3

Head = tuple[int, int]
HeadSet = frozenset[Head]

#: score(description, head sets) -> each set's mean objective over the prompts, in order.
ScoreHeadSets = Callable[[str, Sequence[HeadSet]], list[float]]


@dataclass(frozen=True)
class Round:
    number: int
    #: Every candidate scored this round (added to the heads chosen before it) with its score.
    scores: tuple[tuple[Head, float], ...]
    #: The heads added, best first.
    added: tuple[Head, ...]


@dataclass(frozen=True)
class HeadHunterResult:
    #: The mean objective with no perturbation (classifier-free guidance alone).
    baseline: float
    #: The chosen heads, in the order they were added.
    heads: tuple[Head, ...]
    #: The mean objective of SoftPAG on the chosen heads.
    final: float
    rounds: tuple[Round, ...]


def headhunter(
    candidates: Sequence[Head], rounds: int, per_round: int, score: ScoreHeadSets
) -> HeadHunterResult:
    if not candidates:
        raise ValueError("no candidate heads to search over")
    if len(set(candidates)) != len(candidates):
        raise ValueError("a candidate head is given twice")
    if rounds < 1 or per_round < 1:
        raise ValueError(f"rounds and per_round must be >= 1, got {rounds} and {per_round}")
    [baseline] = score("baseline: no perturbation", [frozenset()])
    chosen: list[Head] = []
    history = []
    for number in range(1, rounds + 1):
        remaining = [head for head in candidates if head not in chosen]
        if not remaining:
            break
        description = f"round {number}/{rounds}: {len(remaining)} heads added to {len(chosen)}"
        scores = score(description, [frozenset(chosen) | {head} for head in remaining])
        ranked = sorted(range(len(remaining)), key=lambda i: -scores[i])  # stable: ties keep order
        added = tuple(remaining[i] for i in ranked[:per_round])
        chosen.extend(added)
        history.append(Round(number, tuple(zip(remaining, scores, strict=True)), added))
    [final] = score(f"final: {len(chosen)} heads", [frozenset(chosen)])
    return HeadHunterResult(baseline, tuple(chosen), final, tuple(history))


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    """layer -> its heads, both sorted."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(heads):
        by_layer.setdefault(layer, []).append(head)
    return by_layer


def describe_heads(heads: Iterable[Head]) -> str:
    """ "2:5 6:0,3": each layer's heads."""
    by_layer = heads_by_layer(heads)
    return " ".join(f"{layer}:{','.join(map(str, hs))}" for layer, hs in by_layer.items()) or "none"
