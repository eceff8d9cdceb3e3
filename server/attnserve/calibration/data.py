"""Labelled examples from JSONL files (one file per task), their calibration/validation split or
folds, and content hashes.

One JSON object per line:
    {"prompt": "...", "candidates": [" yes", " no"], "answer": " yes", "split": "calibration"}
    {"messages": [{"role": "user", "content": "..."}], "candidates": ["yes", "no"], "answer": "no"}
Exactly one of prompt and messages; candidates are two or more distinct answers, answer is one of
them; split ("calibration" or "validation") is set on every line or on none (then the split is
drawn from a seed). Blank lines are skipped. Errors name the line and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("calibration", "validation")
ROLES = ("system", "user", "assistant")
_KEYS = ("prompt", "messages", "candidates", "answer", "split")


class DataError(ValueError):
    """A labelled data file that cannot be used."""


@dataclass(frozen=True)
class LabelledExample:
    """One question with its candidate answers and the correct one."""

    #: 1-based line in the data file.
    line: int
    #: Exactly one of prompt and messages is set.
    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None
    candidates: tuple[str, ...]
    #: Index of the correct answer in candidates.
    answer: int
    #: "calibration", "validation" or None (drawn by split_examples).
    split: str | None
    #: The task the example belongs to: its data file's name ("" when there is one file).
    task: str = ""


@dataclass(frozen=True)
class Split:
    calibration: tuple[LabelledExample, ...]
    validation: tuple[LabelledExample, ...]
    #: How the split was made, for provenance.
    description: str


def load_examples(path: Path) -> list[LabelledExample]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: {err}") from None
    examples = []
    for number, text in enumerate(lines, start=1):
        if text.strip():
            examples.append(_parse_line(text, number, path))
    if not examples:
        raise DataError(f"{path}: no examples")
    with_split = sum(e.split is not None for e in examples)
    if 0 < with_split < len(examples):
        first = next(e for e in examples if e.split is None)
        raise DataError(
            f"{path}:{first.line}: split: set split on every line or on none "
            f"({with_split} of {len(examples)} lines have one)"
        )
    return examples


def load_tasks(paths: Sequence[Path]) -> list[LabelledExample]:
    """The examples of every file, in file order; with several files each example's task is its
    file's name (the stem, or the path when two files share a stem)."""
    if len(paths) == 1:
        return load_examples(paths[0])
    stems = [Path(path).stem for path in paths]
    if len(set(map(str, paths))) < len(paths):
        raise DataError("a data file is given twice")
    examples = []
    for path, stem in zip(paths, stems, strict=True):
        task = stem if stems.count(stem) == 1 else str(path)
        examples += [dataclasses.replace(e, task=task) for e in load_examples(path)]
    return examples


def tasks_of(examples: Sequence) -> list[str]:
    """The tasks of the examples (labelled or tokenized: anything with a task), in first-appearance
    order."""
    return list(dict.fromkeys(e.task for e in examples))


def _parse_line(text: str, line: int, path: Path) -> LabelledExample:
    where = f"{path}:{line}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for key in data:
        if key not in _KEYS:
            raise DataError(f"{where}: {key}: unknown field (allowed: {', '.join(_KEYS)})")
    if ("prompt" in data) == ("messages" in data):
        raise DataError(f"{where}: set exactly one of prompt and messages")

    prompt, messages = None, None
    if "prompt" in data:
        prompt = data["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: prompt: expected a non-empty string")
    else:
        messages = _messages(data["messages"], where)

    candidates = data.get("candidates")
    if not isinstance(candidates, list) or len(candidates) < 2:
        raise DataError(f"{where}: candidates: expected a list of at least two answers")
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, str) or not candidate:
            raise DataError(f"{where}: candidates[{i}]: expected a non-empty string")
    if len(set(candidates)) != len(candidates):
        raise DataError(f"{where}: candidates: answers must be distinct")
    if "answer" not in data:
        raise DataError(f"{where}: answer: missing (the correct candidate)")
    if data["answer"] not in candidates:
        raise DataError(f"{where}: answer: {data['answer']!r} is not one of the candidates")

    split = data.get("split")
    if split is not None and split not in SPLITS:
        raise DataError(f"{where}: split: expected one of {', '.join(SPLITS)}, got {split!r}")
    return LabelledExample(
        line=line,
        prompt=prompt,
        messages=messages,
        candidates=tuple(candidates),
        answer=candidates.index(data["answer"]),
        split=split,
    )


def _messages(value, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: messages: expected a non-empty list of {{role, content}} objects")
    out = []
    for i, message in enumerate(value):
        field = f"{where}: messages[{i}]"
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise DataError(f"{field}: expected an object with exactly role and content")
        if message["role"] not in ROLES:
            raise DataError(f"{field}.role: expected one of {', '.join(ROLES)}, got {message['role']!r}")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise DataError(f"{field}.content: expected a non-empty string")
        out.append((message["role"], message["content"]))
    return tuple(out)


def fold_indices(examples: Sequence, folds: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """k folds of the indices of examples (labelled or tokenized), stratified by task: each
    task's examples shuffled with the seed and dealt round-robin, so every fold holds each task's
    examples and fold sizes differ by at most 1 per task."""
    dealt: list[list[int]] = [[] for _ in range(folds)]
    for task in tasks_of(examples):
        indices = [i for i, e in enumerate(examples) if e.task == task]
        if not 2 <= folds <= len(indices):
            name = f"task {task}: " if task else ""
            raise DataError(
                f"{name}{folds}-fold cross-validation needs 2 <= folds <= examples ({len(indices)})"
            )
        random.Random(seed).shuffle(indices)
        for f in range(folds):
            dealt[f] += indices[f::folds]
    return tuple(tuple(sorted(fold)) for fold in dealt)


def split_examples(examples: Sequence[LabelledExample], validation_fraction: float, seed: int) -> Split:
    """Each task split on its own (see _split_task), so every task has held-out examples."""
    tasks = tasks_of(examples)
    if len(tasks) == 1:
        return _split_task(examples, validation_fraction, seed)
    splits = [_split_task([e for e in examples if e.task == t], validation_fraction, seed) for t in tasks]
    return Split(
        tuple(e for split in splits for e in split.calibration),
        tuple(e for split in splits for e in split.validation),
        "; ".join(f"{task}: {split.description}" for task, split in zip(tasks, splits, strict=True)),
    )


def _split_task(examples: Sequence[LabelledExample], validation_fraction: float, seed: int) -> Split:
    """The file's own split when its lines carry one; otherwise a seeded shuffle puts
    round(validation_fraction * n) examples in validation."""
    if examples[0].split is not None:
        calibration = tuple(e for e in examples if e.split == "calibration")
        validation = tuple(e for e in examples if e.split == "validation")
        description = "from the data file's split field"
    else:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        num_validation = round(validation_fraction * len(examples))
        chosen = set(order[:num_validation])
        calibration = tuple(e for i, e in enumerate(examples) if i not in chosen)
        validation = tuple(e for i, e in enumerate(examples) if i in chosen)
        lines = ",".join(str(e.line) for e in validation)
        description = (
            f"seeded: validation_fraction {validation_fraction}, seed {seed}; validation lines {lines}"
        )
    if not calibration or not validation:
        name = f"task {examples[0].task}: " if examples[0].task else ""
        raise DataError(
            f"{name}both splits need examples: {len(calibration)} calibration, {len(validation)} validation"
        )
    return Split(calibration, validation, description)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_sha256(path: Path) -> str:
    """One hash over a model directory: each file's relative path and content, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(file_sha256(file).encode() + b"\n")
    return digest.hexdigest()
