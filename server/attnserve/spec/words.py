"""Prompt words resolved to the text encoder's tokens (diffusion models): a word is tokenized alone
and found in the prompt's tokens, every occurrence counting. Shared by the key selector
(compile.py) and the word heatmaps (readouts/word_heatmaps.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import Violations, quoted

MAX_WORDS = 16
#: Longer than any prompt the text encoder takes (77 tokens); bounds the tokenizer's work.
MAX_WORD_LENGTH = 256


def word_positions(word: str, prompt_token_ids: Sequence[int], tokenizer) -> tuple[int, ...]:
    """Positions covered by every occurrence of the word's tokens (no start or end token) in the
    prompt's tokens; () for a blank word or one not found."""
    ids = tokenizer(word, add_special_tokens=False).input_ids if word.strip() else []
    n = len(ids)
    if n == 0:
        return ()
    found: list[int] = []
    for start in range(len(prompt_token_ids) - n + 1):
        if list(prompt_token_ids[start : start + n]) == list(ids):
            found.extend(range(start, start + n))
    return tuple(sorted(set(found)))


def resolve_words(
    words: Sequence[str],
    field: str,
    positions_of: Callable[[str], tuple[int, ...]],
    violations: Violations,
) -> list[tuple[str, tuple[int, ...]]]:
    """Each word found with its positions (positions_of(word)); a violation on field[i] for a
    word that is too long or not in the prompt, and on field for too many words."""
    if len(words) > MAX_WORDS:
        violations.add(field, f"{len(words)} words exceed the limit of {MAX_WORDS}")
        return []
    resolved = []
    for i, word in enumerate(words):
        if len(word) > MAX_WORD_LENGTH:
            violations.add(f"{field}[{i}]", f"longer than {MAX_WORD_LENGTH} characters")
            continue
        positions = positions_of(word)
        if not positions:
            violations.add(f"{field}[{i}]", f"{quoted(word)} is not among the prompt's tokens")
            continue
        resolved.append((word, positions))
    return resolved


def position_ranges(positions: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Sorted positions as half-open ranges of consecutive positions."""
    ranges: list[tuple[int, int]] = []
    for position in positions:
        if ranges and ranges[-1][1] == position:
            ranges[-1] = (ranges[-1][0], position + 1)
        else:
            ranges.append((position, position + 1))
    return tuple(ranges)
